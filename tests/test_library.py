"""Without a usable compiled library, import still works, on the reference backend, and says why."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fused_cbam

PACKAGE = Path(fused_cbam.__file__).parent


def _run_with_build_info(tmp_path, torch_version: str, code: str, library: bool = True) -> subprocess.CompletedProcess:
    """``code`` run with a copy of the package whose build info names ``torch_version`` (and
    without its compiled library unless ``library``)."""
    copy = tmp_path / "fused_cbam"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", *([] if library else ["_C.*"])))
    (copy / "_build_info.json").write_text(json.dumps({"torch": torch_version}))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )


_CODE = (
        "import torch, fused_cbam\n"
        "print('backends', fused_cbam.available_backends())\n"
        "x = torch.randn(2, 8, 3, 3)\n"
        "print('cbam', fused_cbam.nn.CBAM(8, reduction_ratio=2)(x).shape)\n"
        "try:\n"
        "    fused_cbam.channel_pool(x, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    print('error', e)\n"
)


def _assert_falls_back_to_the_reference(result, reason: str) -> None:
    assert result.returncode == 0, result.stderr
    assert reason in result.stderr
    assert "the compiled backends (cpu, cuda) are unavailable, reference and triton" in result.stderr
    assert "backends ['reference']" in result.stdout
    assert "cbam torch.Size([2, 8, 3, 3])" in result.stdout
    assert "error backend 'cpu' is unavailable" in result.stdout and "pip install --no-build-isolation" in result.stdout


def test_library_built_for_another_torch(tmp_path):
    import torch

    result = _run_with_build_info(tmp_path, "0.0.1", _CODE)
    _assert_falls_back_to_the_reference(result, f"built for torch 0.0.1, but torch {torch.__version__} is installed")


def test_library_not_built(tmp_path):
    import torch

    result = _run_with_build_info(tmp_path, torch.__version__, _CODE, library=False)
    _assert_falls_back_to_the_reference(result, "fused_cbam._C is not built")
