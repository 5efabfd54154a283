"""Without a usable compiled library, import still works, on the reference backend, and says why."""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fused_cbam

PACKAGE = Path(fused_cbam.__file__).parent


def _run_with_build_info(tmp_path, torch_version: str, code: str, library: bool = True) -> subprocess.CompletedProcess:
    """``code`` run with a copy of the package whose build info names ``torch_version`` (and
    without its compiled library unless ``library``)."""
    copy = tmp_path / "fused_cbam"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", *([] if library else ["_C.*"])))
    (copy / "_build_info.json").write_text(json.dumps({"torch": torch_version}))
    return _run_beside_copy(tmp_path, code)


def _run_beside_copy(tmp_path, code: str) -> subprocess.CompletedProcess:
    """``code`` run in a fresh Python that imports the package copied to ``tmp_path``."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
        | {k: v for k, v in os.environ.items() if k == "CUDA_VISIBLE_DEVICES"},
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
    import torch

    assert result.returncode == 0, result.stderr
    assert reason in result.stderr
    assert "the compiled backends (cpu, cuda) are unavailable, reference and triton" in result.stderr
    # Triton's backend needs no library: on a GPU, with Triton installed, it stays (the child
    # has no TRITON_INTERPRET).
    triton = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
    expected = (["triton"] if triton else []) + ["reference"]
    assert f"backends {expected}" in result.stdout
    assert "cbam torch.Size([2, 8, 3, 3])" in result.stdout
    assert "error backend 'cpu' is unavailable" in result.stdout and "pip install --no-build-isolation" in result.stdout


def test_library_built_for_another_torch(tmp_path):
    import torch

    result = _run_with_build_info(tmp_path, "0.0.1", _CODE)
    _assert_falls_back_to_the_reference(result, f"built for torch 0.0.1, but torch {torch.__version__} is installed")


def test_a_checkout_whose_sources_changed_since_the_build_says_so(tmp_path):
    """An editable install pulled but not rebuilt: its library lacks what the Python side expects
    (e.g. an operator's autograd), so import says to rebuild."""
    from fused_cbam import _library

    if _library.LOAD_ERROR is not None or not (PACKAGE.parent / "csrc").is_dir():
        pytest.skip("needs the compiled library of a source checkout")
    shutil.copytree(PACKAGE, tmp_path / "fused_cbam", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PACKAGE.parent / "csrc", tmp_path / "csrc")
    run = functools.partial(_run_beside_copy, tmp_path, "import fused_cbam")
    result = run()
    assert result.returncode == 0 and "other sources" not in result.stderr, result.stderr
    with open(tmp_path / "csrc" / "ops.cpp", "a") as f:
        f.write("// changed after the build\n")
    result = run()
    assert result.returncode == 0, result.stderr
    assert "fused_cbam._C was built from other sources than this checkout's" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def _run_with_registrations(tmp_path, old: str, new: str) -> subprocess.CompletedProcess:
    """``_CODE`` run with a copy of the package whose ``_registrations.py`` has ``new`` for ``old``."""
    copy = tmp_path / "fused_cbam"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy / "_registrations.py").read_text()
    assert old in source
    (copy / "_registrations.py").write_text(source.replace(old, new))
    return _run_beside_copy(tmp_path, _CODE)


def test_a_library_that_lacks_an_operator_is_refused(tmp_path):
    """A library built before an operator existed (a checkout pulled, not rebuilt, here one whose
    package has a fake kernel for one operator more): refused as a whole, with the rebuild hint,
    rather than failing at import or at the operator's first call."""
    from fused_cbam import _library

    if _library.LOAD_ERROR is not None:
        pytest.skip("needs the compiled library")
    old = '    "cbam_inference": _fake_cbam_inference,\n}'
    result = _run_with_registrations(tmp_path, old, old[:-1] + '    "added_later": _fake_gate_apply,\n}')
    _assert_falls_back_to_the_reference(result, "fused_cbam._C lacks the operators added_later (built from older sources)")


def test_a_library_whose_operator_takes_other_arguments_is_refused(tmp_path):
    """A library built before an operator took an argument the package passes (as spatial_pool's
    max_first): refused at import, not at the first call with a schema error."""
    from fused_cbam import _library

    if _library.LOAD_ERROR is not None:
        pytest.skip("needs the compiled library")
    old = "def _fake_spatial_pool(x, scale, max_first=False):"
    result = _run_with_registrations(tmp_path, old, old.replace("):", ", added_later=None):"))
    _assert_falls_back_to_the_reference(
        result, "fused_cbam._C has other arguments for the operators spatial_pool (built from older sources)"
    )


def test_a_library_that_fails_to_load_says_why(tmp_path):
    """The loader's own reason (here: not a shared library at all), not only that it failed."""
    import torch

    from fused_cbam import _library

    if _library.library_path() is None:
        pytest.skip("needs the compiled library")
    name = Path(_library.library_path()).name
    code = f"(__import__('pathlib').Path('fused_cbam') / {name!r}).write_bytes(b'not a library'); " + _CODE
    result = _run_with_build_info(tmp_path, torch.__version__, code)
    _assert_falls_back_to_the_reference(result, "fused_cbam._C could not be loaded")
    assert "file too short" in result.stderr  # (the loader's words for it)


def test_library_not_built(tmp_path):
    import torch

    result = _run_with_build_info(tmp_path, torch.__version__, _CODE, library=False)
    _assert_falls_back_to_the_reference(result, "fused_cbam._C is not built")
