#!/usr/bin/env bash
# The two calls of a GPU session on the device tool (15 minutes of device time in all, the
# machine's start included), each one short command, run in the repository root there:
#
#   call 1, timeout_s 450, carry ["prebuilt"]:  bash benchmarks/device_calls.sh 1
#   call 2, timeout_s 340:                      bash benchmarks/device_calls.sh 2
#
# Before call 1, on this machine (csrc changed since the last prebuild, or the folder is gone):
#   [ -x /work/venv211/bin/python ] || { python3 -m venv /work/venv211 &&
#     /work/venv211/bin/pip install -q torch==2.11.0 setuptools wheel ninja pybind11 numpy; }
#   PYTHON=/work/venv211/bin/python bash benchmarks/prebuild.sh prebuilt
#
# Call 1: the library (prebuilt, else built), the tests that use the GPU, compute-sanitizer.
# Call 2: the library again (found current: seconds), the training paths, the benchmark at the
# four ResNet-50 shapes in channels_last, each pass kernel by kernel with the host's side
# (kernel_times --host, CUDA and Triton); then, with the time left, CUDA's and Triton's eval
# forward without chunks, to set against the chunked operators of the same run. Each call
# writes its logs to $OUT/gpu-logs-<call>.tgz (the summary is gpu-check-<device>.txt inside) and
# prints gpu_check.sh's summary. Each limit below sits under the call's timeout_s, so that the
# logs come back even when a step is cut.
set -uo pipefail

call=${1:-}
: "${OUT:?set by the device tool: the folder whose files come back}"
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
LOGS=/tmp/gpu-logs-$call
SHAPES=512x28x28,1024x14x14,256x56x56,2048x7x7

case "$call" in
  1)
    GPU_CHECK_PREBUILT=prebuilt GPU_CHECK_STEPS=build,tests,sanitizers PYTEST_LIMIT=380 \
      GPU_CHECK_DEADLINE=425 timeout 440 bash benchmarks/gpu_check.sh "$LOGS"
    rc=$?
    ;;
  2)
    GPU_CHECK_STEPS=build,bench,kernels BENCH_LIMIT=160 GPU_CHECK_DEADLINE=300 \
      BENCH_ARGS="--shapes $SHAPES --formats channels_last --backends reference,timm,compile,cuda,cuda-cluster,cuda-3ops,triton,triton-3ops,compile+cuda" \
      timeout 310 bash benchmarks/gpu_check.sh "$LOGS"
    rc=$?
    left=$((325 - SECONDS))
    if ((left > 40)); then
      echo "== one chunk (${left}s left)"
      FUSED_CBAM_CUDA_CHUNK_BYTES=0 FUSED_CBAM_TRITON_CHUNK_BYTES=0 timeout "$((left - 10))" \
        "$PYTHON" -m fused_cbam.bench --shapes 512x28x28,256x56x56 --formats channels_last \
        --backends cuda,triton --out "$LOGS/one-chunk" >"$LOGS/one-chunk.log" 2>&1
      echo "   one chunk: rc=$?"
    fi
    ;;
  *)
    echo "usage: $0 1|2" >&2
    exit 2
    ;;
esac
tar czf "$OUT/gpu-logs-$call.tgz" -C /tmp "gpu-logs-$call"
exit $rc
