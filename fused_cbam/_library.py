"""Loads the compiled operator library (fused_cbam._C) once, and says why when it cannot."""

import importlib.machinery
import json
import warnings
from pathlib import Path

import torch

_BUILD_INFO = Path(__file__).with_name("_build_info.json")
REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e .  (from the fused_cbam checkout)"


def build_info() -> dict:
    """What the compiled library was built with (torch, CUDA, arch list), or {} if not built."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def library_path() -> str | None:
    """The compiled library's file beside this one (named as Python names an extension module of
    this interpreter), or None if it was not built. It is a plain shared library, no Python module:
    C++ programs load it too."""
    here = Path(__file__).parent
    found = (here / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return next((str(path) for path in found if path.is_file()), None)


def _load() -> str | None:
    """Load the library (its operators register themselves); None on success, else the reason it
    is unavailable."""
    built_for = build_info().get("torch")
    if built_for is not None and built_for != torch.__version__:
        return f"fused_cbam._C was built for torch {built_for}, but torch {torch.__version__} is installed"
    path = library_path()
    if path is None:
        return "fused_cbam._C is not built"
    try:
        torch.ops.load_library(path)
    except OSError as error:
        return f"fused_cbam._C could not be loaded ({error})"
    return None


LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(
        f"{LOAD_ERROR}; the compiled backends (cpu, cuda) are unavailable, reference and triton (where it "
        f"runs) still work. To fix, {REBUILD_HINT}",
        stacklevel=2,
    )


def has_kernels(dispatch_key: str) -> bool:
    """Whether the compiled library registered kernels for this dispatch key ("CPU", "CUDA")."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_cbam::channel_pool", dispatch_key
    )
