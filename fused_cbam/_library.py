"""Loads the compiled operator library (fused_cbam._C) once, and says why when it cannot."""

import importlib.machinery
import json
import warnings
from pathlib import Path

import torch

from fused_cbam import _registrations, _sources

_BUILD_INFO = Path(__file__).with_name("_build_info.json")
REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e .  (from the fused_cbam checkout)"
# Every operator of csrc/ops.cpp, which the Python package calls, is one that has a fake kernel,
# whose parameters are the operator's arguments as the package passes them: a library built
# before an operator existed, or before it took those arguments (a checkout pulled, not rebuilt),
# is refused, with the rebuild hint, instead of failing at the first call.
OPERATORS = tuple(_registrations.LIBRARY_FAKES)


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
    except OSError as error:  # (torch keeps the loader's own message, e.g. a missing symbol, as the cause)
        return f"fused_cbam._C could not be loaded ({error.__cause__ or error})"
    missing = [name for name in OPERATORS if not hasattr(torch.ops.fused_cbam, name)]
    if missing:
        return f"fused_cbam._C lacks the operators {', '.join(missing)} (built from older sources)"
    changed = [name for name in OPERATORS if _arguments(name) != _registrations.arguments(name)]
    if changed:
        return f"fused_cbam._C has other arguments for the operators {', '.join(changed)} (built from older sources)"
    return None


def _arguments(name: str) -> list[str]:
    return [argument.name for argument in getattr(torch.ops.fused_cbam, name).default._schema.arguments]


def built_from_other_sources(csrc: Path) -> bool:
    """Whether the library was built from other sources than ``csrc`` holds now (a checkout
    pulled, or edited, and not rebuilt): it then lacks what the Python side expects of it."""
    return build_info().get("sources") != _sources.digest(csrc)


def _warn_if_stale() -> None:
    """``built_from_other_sources`` of this package's checkout, where there is one (not for an
    installed wheel)."""
    csrc = Path(__file__).parent.parent / "csrc"
    if csrc.is_dir() and built_from_other_sources(csrc):
        warnings.warn(
            f"fused_cbam._C was built from other sources than this checkout's {csrc} (changed since "
            f"the build); {REBUILD_HINT}",
            stacklevel=3,
        )


LOAD_ERROR = _load()
if LOAD_ERROR is None:
    _warn_if_stale()
else:
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
