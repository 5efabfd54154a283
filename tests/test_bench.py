"""The main job runs end to end on a tiny problem: gate, timing, record, table, plot, README."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import fused_cbam
from fused_cbam.bench import __main__ as bench
from fused_cbam.bench import providers, record, report, timing

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_records_and_plots(tmp_path, capsys):
    bench.main([
        "--device", "cpu", "--quick", "--shapes", "32x6x6", "--batch", "2", "--backends", "reference,timm,cpu,cpu-3ops",
        "--out", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    records = list(tmp_path.glob("bench-*.jsonl"))
    assert len(records) == 1 and records[0].with_suffix(".png").exists()
    rows = [json.loads(line) for line in records[0].read_text().splitlines()]
    providers = {r["provider"] for r in rows}
    assert providers == {"reference", "timm", "cpu", "cpu-3ops"}
    # The three-operator forward beside the one-operator one; its training step is cpu's.
    assert {r["mode"] for r in rows if r["provider"] == "cpu-3ops" and r["target"] == "cbam"} == {"forward"}
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
    assert "| nchw | 32x6x6 | cpu-3ops |" in text


def test_a_backend_that_disagrees_is_refused(tmp_path, monkeypatch, capsys):
    # The fused module 1% off on the cpu backend, whichever path (inference or training) it takes.
    forward = fused_cbam.nn.CBAM.forward
    monkeypatch.setattr(
        fused_cbam.nn.CBAM, "forward", lambda self, x: forward(self, x) * (1.01 if self.backend == "cpu" else 1)
    )
    bench.main(["--device", "cpu", "--quick", "--shapes", "32x6x6", "--batch", "2", "--backends", "reference,cpu", "--formats", "nchw", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "REFUSED cpu" in out
    rows = [json.loads(line) for line in next(tmp_path.glob("bench-*.jsonl")).read_text().splitlines()]
    assert {r["mode"] for r in rows if r["provider"] == "cpu"} == {"refused"}


def test_the_gate_checks_the_inference_path_that_the_forward_timing_takes(tmp_path, monkeypatch, capsys):
    # Only the one-operator eval path 1% off: the training path, forward and backward, is right.
    inference = fused_cbam.nn.FusedBlock._inference

    def off(self, x):
        out = inference(self, x)
        return None if out is None else out * 1.01

    monkeypatch.setattr(fused_cbam.nn.FusedBlock, "_inference", off)
    bench.main(["--device", "cpu", "--quick", "--shapes", "32x6x6", "--batch", "2", "--backends", "reference,cpu", "--formats", "nchw", "--out", str(tmp_path)])
    assert "REFUSED cpu" in capsys.readouterr().out
    # The training step, which agrees, is still timed; the table says which mode was refused.
    rows = [json.loads(line) for line in next(tmp_path.glob("bench-*.jsonl")).read_text().splitlines()]
    cpu = {r["mode"]: r for r in rows if r["provider"] == "cpu"}
    assert set(cpu) == {"refused", "forward+backward"} and list(cpu["refused"]["errors"]) == ["forward"]
    assert "| nchw | 32x6x6 | cpu | refused |" in report.block_table(rows)


def test_report_uses_the_latest_full_run_and_refuses_what_it_cannot_use(tmp_path, capsys):
    base = dict(device="cpu-x", device_type="cpu", dtype="float32", batch=2, torch="t", triton=None, cuda=None,
                commit="c", copy_bandwidth=1e9, format="nchw", shape="16x4x4", provider="cpu", target="cbam",
                mode="forward", p20_ms=1.0, p80_ms=1.0)  # fmt: skip
    path = tmp_path / "bench-cpu-x.jsonl"
    rows = [dict(base, date="2026-01-01T00:00:00", median_ms=1.0), dict(base, date="2026-01-02T00:00:00", median_ms=9.0, quick=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["median_ms"] for r in report.latest_run(rows)] == [1.0]  # not the later --quick run
    assert [r["median_ms"] for r in report.latest_run(rows[1:])] == [9.0]
    section = report.readme_section({path: report.latest_run(rows)})
    assert "| 1.000 |" in section and "--quick" not in section
    quick_only = tmp_path / "bench-cpu-quick.jsonl"
    assert "(a --quick run: short timings)" in report.readme_section({quick_only: rows[1:]})
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    empty = tmp_path / "bench-empty.jsonl"
    empty.write_text("")
    for argv, message in (
        ([str(path), "--readme", str(readme)], "--readme: " + str(readme) + " lacks the markers"),
        ([str(path), "--readme", str(tmp_path / "none.md")], "--readme: cannot read"),
        ([str(empty), "--readme", str(readme)], "is not a record with measurements"),
    ):
        with pytest.raises(SystemExit):
            report.main(argv)
        assert message in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"


def test_the_record_names_the_checkout_commit_from_any_directory(tmp_path, monkeypatch):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    monkeypatch.chdir(tmp_path)
    assert record._commit().removesuffix("-dirty") == head.stdout.strip()


def test_tables_show_the_gpu_columns_when_rows_have_them():
    """GPU rows carry CUDA-graph replay times (or why capture failed) and kernels per call, for
    the forward and the training step; the tables grow those columns for them only."""
    base = dict(format="channels_last", shape="8x4x4", target="cbam")
    rows = [
        dict(base, provider="reference", mode="forward", median_ms=2.0, graph_ms=0.5, graph_capture_mode="global",
             kernels=12, device_busy_ms=0.4),
        dict(base, provider="cuda", mode="forward", median_ms=1.0, graph_error="capture failed: X", kernels=5,
             device_busy_ms=0.2),
        dict(base, provider="cuda", mode="forward+backward", median_ms=3.0, saved_over_x=1.02, peak_bytes=2**20,
             graph_ms=1.5, graph_capture_mode="thread_local", kernels=30, device_busy_ms=1.2),
        dict(base, provider="triton", mode="refused", errors={"forward": {}, "forward+backward": {}}),
        dict(base, provider="timm", mode="forward", median_ms=1.5, graph_ms=0.7),  # the profiler failed
        dict(base, provider="cuda", target="gate_apply", mode="forward", median_ms=0.1, bandwidth=2e12,
             bandwidth_fraction=0.5, graph_ms=0.05, kernels=1, device_busy_ms=0.05, graph_bandwidth_fraction=0.9),
    ]  # fmt: skip
    block = report.block_table(rows).splitlines()
    assert block[0].endswith("| graph ms | kernels | busy ms | fwd+bwd graph ms | kernels | busy ms |")
    assert "| 2.000 | 1.00 |" in block[2] and block[2].endswith("| 0.500 | 12 | 0.400 |  |  |  |")
    assert block[3].endswith("| capture failed: X | 5 | 0.200 | 1.500 (thread_local) | 30 | 1.200 |") and "| 1.02 | 1.0 |" in block[3]
    assert "refused" in block[4]
    assert block[5].endswith("| 0.700 |  |  |  |  |  |")
    assert all(line.count("|") == block[0].count("|") for line in block)
    ops = report.operator_table(rows).splitlines()
    assert ops[2].endswith("| 50% | 0.050 | 1 | 0.050 | 90% |")
    assert all(line.count("|") == ops[0].count("|") for line in ops)
    cpu_rows = [{k: v for k, v in r.items() if k not in ("graph_ms", "graph_error", "kernels", "device_busy_ms")} for r in rows]
    assert "graph ms" not in report.block_table(cpu_rows)


def test_the_summary_is_the_geometric_mean_over_the_resnet_shapes():
    """Per format and fused provider, its speedup over each baseline as the geometric mean over
    the ResNet-50 shapes (another shape left out); a cell stays empty unless both were timed at
    every one of them; graph_ms gives the CUDA-graph replays' table."""
    rows = []
    for shape, cpu_ms in zip(providers.RESNET50_SHAPES, (1.0, 2.0, 4.0, 8.0)):
        base = dict(format="nchw", shape=shape, target="cbam")
        rows += [dict(base, provider="reference", mode="forward", median_ms=8.0),
                 dict(base, provider="compile", mode="forward", median_ms=4.0, graph_ms=2.0),
                 dict(base, provider="cpu", mode="forward", median_ms=cpu_ms, graph_ms=1.0),
                 dict(base, provider="reference", mode="forward+backward", median_ms=9.0)]  # fmt: skip
    rows.append(dict(format="nchw", shape="128x80x80", target="cbam", provider="cpu", mode="forward", median_ms=1e-3))
    rows.append(dict(rows[2], mode="forward+backward", median_ms=3.0))  # at one shape only
    lines = report.summary_table(rows).splitlines()
    assert lines[0] == ("| format | provider | forward × reference | forward × compile | forward+backward × reference "
                        "| forward+backward × compile |")  # fmt: skip
    # 8 / (1, 2, 4, 8): geometric mean of 8, 4, 2, 1 is 8 / 64 ** 0.25
    assert lines[2:] == [f"| nchw | cpu | {8 / 64 ** 0.25:.2f} | {4 / 64 ** 0.25:.2f} |  |  |"]
    graph = report.summary_table(rows, "graph_ms").splitlines()
    assert graph[2:] == ["| nchw | cpu |  | 2.00 |  |  |"]
    assert report.summary_table([dict(rows[0], shape="8x4x4")]) is None
    # the README's section and the bench's printout show both, titled
    env = dict(device="CPU", dtype="float32", batch=8, date="2026-11-28T00:00", commit="abc", torch="t", triton="t",
               cuda="c", copy_bandwidth=1e10)  # fmt: skip
    section = report.readme_section({Path("r.jsonl"): [dict(r, **env) for r in rows]})
    titles = [title for title, _ in report.summaries(rows)]
    assert len(titles) == 2 and "CUDA-graph replay" in titles[1] and all(title in section for title in titles)


def test_a_failed_capture_names_the_call_refused_inside_it():
    """Ending a capture after a refused call raises again, with the refused call's error as its
    context: the record keeps both, the first first (the H200's record of the nineteenth session
    kept only the second, which says nothing of the cause)."""
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        failure = timing.capture_failure(e)
    assert failure == (
        "RuntimeError: CUDA error: operation not permitted when stream is capturing <- "
        "RuntimeError: CUDA error: operation failed due to a previous error during capture"
    )


def test_activity_summary_counts_device_work_and_the_hosts_launch_calls():
    """What the GPU columns are made of, from profiler events (faked here: a CPU has no CUDA
    activities): CUDA activities but not user ranges, and the host's runtime and driver launch
    calls (Triton launches through the driver), per call; and kernel_times.py's table of them."""
    from types import SimpleNamespace

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device_type, us, user=False):
        return SimpleNamespace(name=name, device_type=device_type, is_user_annotation=user,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))  # fmt: skip

    events = [
        event("aten::add", cpu, 50), event("cudaLaunchKernel", cpu, 6), event("cuLaunchKernelEx", cpu, 8),
        event("cudaLaunchKernelExC", cpu, 4), event("cudaMemsetAsync", cpu, 3),
        event("void add_kernel<float>", cuda, 10), event("triton_poi_fused_0", cuda, 20), event("Memset (Device)", cuda, 2),
        event("## Call CompiledFxGraph f0 ##", cuda, 90, user=True),  # Inductor's range around a call
    ]  # fmt: skip
    summary = timing.activity_summary(events, reps=2)
    assert summary == {"kernels": 1.5, "device_busy_ms": 0.016, "launch_calls": 1.5, "launch_api_ms": 0.009}
    # kernel_times.py's table: the same activities by name, the longest first, per call
    events.append(event("void add_kernel<float>", cuda, 30))
    table = timing.activity_table(events, reps=2, device=True)
    assert table == [("void add_kernel<float>", 1.0, 20.0), ("triton_poi_fused_0", 0.5, 10.0), ("Memset (Device)", 0.5, 1.0)]
    host = timing.activity_table([SimpleNamespace(name="aten::add", device_type=cpu, self_cpu_time_total=8)], 2, False)
    assert host == [("aten::add", 0.5, 4.0)]


def test_full_mode_times_each_operator_of_each_backend(tmp_path):
    """Without --quick: the block for every provider named (a compiled fused block too), and each
    operator alone for the reference and each fused backend (a compiled block is no backend)."""
    bench.main(["--device", "cpu", "--shapes", "16x5x5", "--batch", "2", "--formats", "nchw",
                "--backends", "reference,cpu,compile+cpu", "--out", str(tmp_path)])  # fmt: skip
    rows = [json.loads(line) for line in next(tmp_path.glob("bench-*.jsonl")).read_text().splitlines()]
    block = {(r["provider"], r["mode"]) for r in rows if r["target"] == "cbam"}
    assert block == {(p, m) for p in ("reference", "cpu", "compile+cpu") for m in ("forward", "forward+backward")}
    ops = {(r["provider"], r["target"]) for r in rows if r["target"] != "cbam"}
    assert ops == {(p, op) for p in ("reference", "cpu") for op in ("channel_pool", "spatial_pool", "gate_apply")}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--shapes", "8x4x4"], "--shapes: expected C >= 16"),
        (["--shapes", "32x4"], "--shapes: expected CxHxW"),
        (["--batch", "0"], "--batch: expected a positive batch size, got 0"),
        (["--formats", "nhwc"], "--formats: expected channels_last and/or nchw, got nhwc"),
        (["--device", "bogus"], "--device: expected cpu or cuda (cuda:N), got 'bogus'"),
        (["--device", "meta"], "--device: expected cpu or cuda (cuda:N), got 'meta'"),
        (["--device", "cuda:99"], "--device: 'cuda:99' asked for, but"),
    ],
)
def test_bad_arguments_are_refused_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_a_provider_sets_its_environment_for_its_calls_only(monkeypatch):
    """``cuda-cluster``'s module: FUSED_CBAM_CUDA_INFERENCE is set while it runs (the CUDA
    operator reads it at each call) and is as before afterwards, also after an error."""
    from fused_cbam.bench.providers import WithEnvironment

    monkeypatch.delenv("FUSED_CBAM_CUDA_INFERENCE", raising=False)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(os.environ.get("FUSED_CBAM_CUDA_INFERENCE"))
            if x is None:
                raise ValueError("no input")
            return x

    module = WithEnvironment(Probe(), FUSED_CBAM_CUDA_INFERENCE="cluster")
    assert module(torch.ones(1)).item() == 1
    assert "FUSED_CBAM_CUDA_INFERENCE" not in os.environ
    monkeypatch.setenv("FUSED_CBAM_CUDA_INFERENCE", "chunks")
    with pytest.raises(ValueError, match="no input"):
        module(None)
    assert os.environ["FUSED_CBAM_CUDA_INFERENCE"] == "chunks"
    assert seen == ["cluster", "cluster"]
