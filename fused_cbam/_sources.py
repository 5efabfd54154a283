"""A digest of the C++/CUDA sources (csrc/), recorded by setup.py beside the library it builds,
so that a checkout whose sources changed after its build (pulled, not rebuilt) says so. It imports
nothing of the package: setup.py loads this file on its own, before the package is built."""

import hashlib
from pathlib import Path

_SUFFIXES = {".cpp", ".h", ".cu", ".cuh"}


def digest(csrc: Path) -> str:
    """sha256 over the sources' relative paths and contents, in path order."""
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in _SUFFIXES and p.is_file()):
        h.update(path.relative_to(csrc).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()
