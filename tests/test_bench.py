"""The main job runs end to end on a tiny problem: gate, timing, record, table, plot, README."""

import json
from pathlib import Path

from fused_cbam.bench import __main__ as bench
from fused_cbam.bench import report

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_records_and_plots(tmp_path, capsys):
    bench.main(["--device", "cpu", "--quick", "--shapes", "32x6x6", "--batch", "2", "--backends", "reference,timm,cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    records = list(tmp_path.glob("bench-*.jsonl"))
    assert len(records) == 1 and records[0].with_suffix(".png").exists()
    rows = [json.loads(line) for line in records[0].read_text().splitlines()]
    providers = {r["provider"] for r in rows}
    assert providers == {"reference", "timm", "cpu"}
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        for key in ("device", "torch", "commit", "dtype", "format", "shape", "mode"):
            assert r[key]
    assert "| cpu |" in out.replace("| channels_last | 32x6x6 ", "")

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\noutro\n")
    report.main([str(records[0]), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "| nchw | 32x6x6 | cpu |" in text and text.endswith("outro\n")


def test_a_backend_that_disagrees_is_refused(tmp_path, monkeypatch, capsys):
    from fused_cbam import backends

    wrong = backends.OperatorBackend("cpu", "fused_cbam")
    wrong.gate_apply = lambda x, g, h: backends.ReferenceBackend.gate_apply(x, g, h) * 1.01
    monkeypatch.setitem(backends._INSTANCES, "cpu", wrong)
    bench.main(["--device", "cpu", "--quick", "--shapes", "32x6x6", "--batch", "2", "--backends", "reference,cpu", "--formats", "nchw", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "REFUSED cpu" in out
    rows = [json.loads(line) for line in next(tmp_path.glob("bench-*.jsonl")).read_text().splitlines()]
    assert {r["mode"] for r in rows if r["provider"] == "cpu"} == {"refused"}
