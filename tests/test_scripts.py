"""The GPU check's scripts run here, on the CPU: a GPU is lent for minutes, rarely, and should not
be the first to find their own mistakes (benchmarks/gpu_check.sh runs them on the GPU)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import skip_unless_available

from fused_cbam import _library

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    """The command's result; each test reads its return code and output itself."""
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"},
    )  # fmt: skip


def test_gpu_check_is_valid_bash():
    result = _run("bash", "-n", "benchmarks/gpu_check.sh")
    assert result.returncode == 0, result.stderr


def test_device_calls_parses_and_names_its_calls(tmp_path):
    """The device session's script, run to its usage message (parsing all of it: bash -n passes
    an unmatched quote inside a parameter expansion)."""
    result = subprocess.run(["bash", "benchmarks/device_calls.sh", "3"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False, env={**os.environ, "OUT": str(tmp_path)})  # fmt: skip
    assert result.returncode == 2 and "usage: benchmarks/device_calls.sh 1|2" in result.stderr, result.stderr


def test_sanitizer_smoke_runs_every_call_on_the_cpu_operators():
    skip_unless_available("cpu")
    result = _run(sys.executable, "benchmarks/sanitizer_smoke.py", "--device", "cpu")
    assert result.returncode == 0 and "sanitizer_smoke: OK (18 cases on cpu)" in result.stdout, result.stderr


def _script_output(tmp_path, script, *args) -> str:
    """What ``benchmarks/<script> --device cpu ... --out FILE`` writes, after it exits cleanly."""
    out = tmp_path / "out.txt"
    result = _run(sys.executable, f"benchmarks/{script}", "--device", "cpu", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out.read_text()


def test_inductor_passes_lists_the_kernels_over_x(tmp_path):
    text = _script_output(tmp_path, "inductor_passes.py", "--dtype", "bfloat16", "--batch", "2", "--shape", "16x5x5")
    counts = [int(line.split(":")[1].split(";")[0]) for line in text.splitlines() if "kernels touching x-sized tensors" in line]
    assert len(counts) == 2 and all(n >= 1 for n in counts), text  # the eval forward, the training step


def test_kernel_times_lists_each_pass_of_each_provider(tmp_path):
    skip_unless_available("cpu")
    text = _script_output(tmp_path, "kernel_times.py", "--dtype", "float32", "--batch", "2", "--shape", "16x5x5",
                          "--providers", "cpu,reference", "--reps", "2", "--host")  # fmt: skip
    sections = _sections(text)
    assert list(sections) == [heading for provider in ("reference", "cpu") for title in ("eval forward", "training step")
                              for heading in (f"## {provider}, {title}", f"### {provider}, {title}, host")], text
    assert "fused_cbam::cbam_inference" in sections["## cpu, eval forward"], text
    assert "fused_cbam::cbam_training" in sections["## cpu, training step"], text
    # --host: each pass's Python functions, the operator's call and the module's among them
    host = sections["### cpu, eval forward, host"]
    assert "torch._ops.fused_cbam.cbam_inference" in host and "fused_cbam/nn/core.py" in host, text


def _sections(text: str) -> dict[str, str]:
    """A report's sections by their headings' titles (the text before the first colon)."""
    sections, title = {}, None
    for line in text.splitlines():
        if line.startswith("#") and ":" in line:
            title = line.split(":")[0]
            sections[title] = ""
        elif title is not None:
            sections[title] += line + "\n"
    return sections


def test_spatial_conv_layouts_times_both_layouts(tmp_path):
    text = _script_output(tmp_path, "spatial_conv_layouts.py", "--dtype", "float32", "--batch", "2", "--sizes", "9")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1:3] for row in rows] == [[" 2 ", " 9 "], [" 1 ", " 9 "]]


def test_triton_mlp_layer_loops_have_no_reduction_across_lanes(tmp_path):
    """Read in its sm_90 SASS (benchmarks/triton_loops.py), each configuration of Triton's MLP
    layer loops over L without a warp shuffle: one there is a sum across lanes in every step,
    which the next step waits for (320 a step before 77134ae). Its barriers, 0-4 a step by
    configuration, are layout conversions of the loaded blocks, not sums."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("needs no GPU: left to CI, out of a GPU session's minutes")
    out = tmp_path / "loops.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "benchmarks/triton_loops.py", "--kernel", "_mlp_layer_kernel", "--dtype", "bfloat16",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = out.read_text().splitlines()
    # The autotuner's five, for each variant the blocks launch: two layers over both pools (first,
    # last), the first over their mix, the last alone over one pool, with and without a bias.
    configurations = 5 * 5
    assert len(lines) == configurations and all("*bf16" in line for line in lines), lines
    for line in lines:  # each configuration's loop over L (the loops that load), without a shuffle
        cells = [dict(re.findall(r"([A-Z]+) (\d+)", cell)) for cell in line.split("loops: ")[1].split("; ")]
        streaming = [c for c in cells if int(c.get("LDG", 0)) + int(c.get("LDGSTS", 0)) > 0]
        assert streaming and all(c["SHFL"] == "0" for c in streaming), line


@pytest.mark.parametrize("precision", [[], ["--autocast", "--dtype", "bfloat16"]], ids=["float32", "autocast"])
def test_training_paths_times_the_three_paths(precision):
    skip_unless_available("cpu")
    shape = ["--shapes", "2x16x3x3", "--steps", "2", "--rounds", "1"]
    result = _run(sys.executable, "benchmarks/training_paths.py", *shape, *precision)
    assert result.returncode == 0, result.stderr
    rows = [line.strip("| ").split(" | ") for line in result.stdout.splitlines() if line.startswith("| 2x16x3x3")]
    assert [row[1] for row in rows] == ["forward", "forward+backward"], result.stdout
    assert all(cell.endswith(" µs") and cell[:-3].isdigit() for row in rows for cell in row[2:]), result.stdout


def _checkout_copy(tmp_path) -> Path:
    """The working tree as git sees it (no build outputs), as a device run receives it."""
    tree = tmp_path / "tree"
    files = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((ROOT / name).read_bytes())
    return tree


@pytest.mark.parametrize("torch_version", ["current", "other"])
def test_gpu_check_takes_a_prebuilt_library_built_for_its_torch(tmp_path, torch_version):
    """The build step takes the library of GPU_CHECK_PREBUILT (benchmarks/prebuild.sh's folder)
    when it loads and was built from these sources; one built for another torch is refused (the
    build then runs; here the deadline skips it)."""
    if _library.LOAD_ERROR is not None or not _library.build_info().get("cuda"):
        pytest.skip("needs the library built with its CUDA kernels (FORCE_CUDA=1)")
    tree, prebuilt = _checkout_copy(tmp_path), tmp_path / "prebuilt"
    prebuilt.mkdir()
    (prebuilt / "_C.so").write_bytes(Path(_library.library_path()).read_bytes())
    info = _library.build_info() | ({} if torch_version == "current" else {"torch": "0.0.1"})
    (prebuilt / "_build_info.json").write_text(json.dumps(info))
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_STEPS": "build", "GPU_CHECK_DEADLINE": "25",
           "GPU_CHECK_PREBUILT": str(prebuilt)}  # fmt: skip
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path / "logs")],
        cwd=tree, capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    taken = "== build: took the prebuilt library" in result.stdout
    assert taken == (torch_version == "current"), result.stdout + result.stderr
    assert taken or "== build skipped" in result.stdout, result.stdout
