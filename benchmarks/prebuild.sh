#!/usr/bin/env bash
# Builds the extension for the GPU machine on this one, ahead of a device run, so that the run
# does not spend 60-90 s of its device time building (benchmarks/gpu_check.sh takes the result
# with GPU_CHECK_PREBUILT=OUT_DIR when the folder is carried to the machine).
#
#   PYTHON=/path/to/python benchmarks/prebuild.sh OUT_DIR
#
# PYTHON must have the device's torch (2.11.0+cu130 for the lent H100/H200 machines, from PyPI:
# python3 -m venv V && V/bin/pip install torch==2.11.0 setuptools wheel ninja pybind11 numpy),
# and nvcc must be here. The library is a plain shared library without Python symbols, so one
# built under this Python loads under the device's (3.12 there). Writes OUT_DIR/_C.so (debug
# information stripped) and OUT_DIR/_build_info.json, and checks that the library loads under
# PYTHON's torch with a CUDA kernel for every operator.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: PYTHON=... $0 OUT_DIR" >&2
  exit 2
fi
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT

# The working tree as git sees it (tracked and untracked, not ignored), without the build
# outputs of this checkout's own Python.
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$TREE"
(cd "$TREE" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace)
LIB=$(ls "$TREE"/fused_cbam/_C*.so)
strip --strip-debug -o "$OUT/_C.so" "$LIB"
cp "$TREE/fused_cbam/_build_info.json" "$OUT/"

"$PY" - "$OUT/_C.so" <<'EOF'
import sys
import torch

torch.ops.load_library(sys.argv[1])
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fused_cbam::")]
missing = [name for name in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")]
if not ops or missing:
    sys.exit(f"the prebuilt library lacks CUDA kernels: {missing or 'no operators'}")
print(f"prebuilt for torch {torch.__version__}: {sys.argv[1]}, {len(ops)} operators with CUDA kernels")
EOF
