"""The GPU check's scripts run here, on the CPU: a GPU is lent for minutes, rarely, and should not
be the first to find their own mistakes (benchmarks/gpu_check.sh runs them on the GPU)."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import skip_unless_available

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


def test_spatial_conv_layouts_times_both_layouts(tmp_path):
    text = _script_output(tmp_path, "spatial_conv_layouts.py", "--dtype", "float32", "--batch", "2", "--sizes", "9")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1:3] for row in rows] == [[" 2 ", " 9 "], [" 1 ", " 9 "]]
