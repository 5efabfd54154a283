#!/usr/bin/env bash
# One pass of every GPU check, for a fresh H100/H200 machine without internet.
#
#   benchmarks/gpu_check.sh LOG_DIR
#
# Builds the extension (sm_90), records the environment, runs the tests that use the GPU, runs
# compute-sanitizer (memcheck, racecheck) over benchmarks/sanitizer_smoke.py, runs the
# benchmark (benchmarks/training_paths.py first), times the fused block's passes kernel by kernel
# and the host's side of them, for CUDA and Triton (benchmarks/kernel_times.py --host), lists
# the kernels torch.compile generates for the reference (benchmarks/inductor_passes.py), and
# writes LOG_DIR/gpu-check-<device>.txt with the verdicts.
# Each step logs to LOG_DIR/<step>.log under its own time limit; the test-suite and the two
# sanitizer runs share the GPU at once (correctness only), the benchmark runs alone after them.
# At worst the sum of the limits of the steps run (about 14 minutes for the default steps; a build
# step that finds the library current takes seconds), plus a few seconds to start Python for the
# environment and the summary. A failing step does not
# stop the later ones, but the script exits non-zero if any failed. On the device tool, whose
# $OUT takes 8 files at most, tar LOG_DIR into $OUT.
#
#   BENCH_ARGS       arguments of python -m fused_cbam.bench (default: --quick)
#   BENCH_LIMIT      seconds for the benchmark (default 150; the record keeps each shape that
#                    finished)
#   GPU_CHECK_STEPS  the steps to run, comma-separated, of build, tests, sanitizers, bench,
#                    kernels, inductor, rest (default: all but rest). Two calls on one warm
#                    machine can share the work: "build,tests,sanitizers", then
#                    "build,bench,kernels,inductor,rest"
#                    (the second call's build step finds the library built from the same
#                    sources and skips). Each call writes its own summary.
#   PYTEST_LIMIT     seconds for the GPU tests (default 230)
#   REST_LIMIT       seconds for the tests that use no GPU (default 100; on an H200 machine's 16
#                    CPUs 70 s ran about 97% of them)
#   GPU_CHECK_DEADLINE  seconds from the start by which the script must have written its
#                    summary: each step's limit is clipped to the time left (set it a little
#                    under the device call's limit, so that a late start or a slow build
#                    shortens the last steps instead of losing the summary and the logs)
#   GPU_CHECK_REST=1 also run the tests that use no GPU (CI runs them), after the others
#                    (the same as naming rest in GPU_CHECK_STEPS)
#   GPU_CHECK_PREBUILT  a folder written by benchmarks/prebuild.sh on a CPU machine against the
#                    device's torch, carried to this one: the build step takes its library when
#                    it was built from these sources and loads, instead of building (60-90 s)
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 LOG_DIR" >&2
  exit 2
fi
mkdir -p "$1"
LOG=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# The package is this checkout's, whether pip installed it (editable) or the build step took a
# prebuilt library, which leaves it uninstalled.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
START=$(date +%s)
STEPS=",${GPU_CHECK_STEPS:-build,tests,sanitizers,bench,kernels,inductor},"
if [[ "${GPU_CHECK_REST:-0}" == 1 ]]; then STEPS="${STEPS}rest,"; fi
IFS=, read -r -a NAMED <<<"${STEPS:1:-1}"
for name in "${NAMED[@]}"; do
  case "$name" in
    build | tests | sanitizers | bench | kernels | inductor | rest) ;;
    *) echo "GPU_CHECK_STEPS: unknown step '$name' (known: build, tests, sanitizers, bench, kernels, inductor, rest)" >&2; exit 2 ;;
  esac
done
wanted() { [[ "$STEPS" == *",$1,"* ]]; }

elapsed() { echo $(($(date +%s) - START)); }

# step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, output to $LOG/NAME.log, exit
# status to $LOG/NAME.rc (safe to run in the background: nothing is kept in shell variables).
# At the limit COMMAND gets STEP_SIGNAL (default TERM; pytest gets INT, on which it still prints
# its durations and the counts of what ran), then KILL 10 s later.
# With GPU_CHECK_DEADLINE, the limit is clipped to the time left before it, less 20 s for the
# kill grace and the summary; a step with under 10 s left is skipped (rc "skipped").
step() {
  local name=$1 limit=$2
  shift 2
  if [[ -n "${GPU_CHECK_DEADLINE:-}" ]]; then
    local left=$((GPU_CHECK_DEADLINE - $(elapsed) - 20))
    if ((left < 10)); then
      echo "== ${name} skipped: ${left}s left before GPU_CHECK_DEADLINE"
      echo "skipped: the deadline was near" >"$LOG/$name.log"
      echo skipped >"$LOG/$name.rc"
      return 0
    fi
    ((left < limit)) && limit=$left
  fi
  echo "== ${name} (t=$(elapsed)s, limit ${limit}s)"
  local rc=0
  timeout --signal="${STEP_SIGNAL:-TERM}" --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1 || rc=$?
  echo "$rc" >"$LOG/$name.rc"
  if [[ $rc -ne 0 ]]; then
    echo "   ${name} failed (rc=$rc, t=$(elapsed)s); last lines of $LOG/$name.log:"
    tail -n 15 "$LOG/$name.log" | sed 's/^/   | /'
  else
    echo "   ${name} passed (t=$(elapsed)s)"
  fi
  return 0
}

# ---- environment
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo "no-commit")
if [[ -n "$(git status --porcelain 2>/dev/null || true)" ]]; then COMMIT="$COMMIT (dirty)"; fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $COMMIT"
  echo "host: $(hostname)  cpus: $(nproc)"
  nvidia-smi || true
  command -v nvcc >/dev/null && nvcc --version || echo "nvcc not on PATH"
  "$PY" - <<'EOF' || true
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: unavailable", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
EOF
} >"$LOG/env.log" 2>&1
cat "$LOG/env.log"

DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)
DEVICE_TAG=$(echo "$DEVICE" | tr -c 'A-Za-z0-9._-' '_' | sed 's/_*$//')
VERSIONS=$("$PY" -c "
import torch
try:
    import triton; t = triton.__version__
except Exception:
    t = 'none'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {t}')" 2>/dev/null || echo unknown)

# ---- build (sm_90 only, all cores), unless the library there is built, with CUDA, from this
# checkout's csrc/ (a later call on a warm machine: pip builds anew in a fresh folder each time,
# 80 to 120 s, where an import tells in a few seconds that nothing changed)
built_from_these_sources() {
  "$PY" - 2>/dev/null <<'EOF'
import sys
from pathlib import Path
from fused_cbam import _library
sys.exit(_library.LOAD_ERROR is not None or not _library.build_info().get("cuda") or _library.built_from_other_sources(Path("csrc")))
EOF
}
take_prebuilt() {
  local dir=${GPU_CHECK_PREBUILT:-} suffix
  [[ -n "$dir" && -f "$dir/_C.so" ]] || return 1
  suffix=$("$PY" -c "import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])") || return 1
  cp "$dir/_C.so" "fused_cbam/_C$suffix" && cp "$dir/_build_info.json" fused_cbam/ && built_from_these_sources
}
if wanted build && built_from_these_sources; then
  echo "== build: the library is built from these sources (skipped)"
  echo "up to date: built from these sources" >"$LOG/build.log"
  echo 0 >"$LOG/build.rc"
elif wanted build && take_prebuilt; then
  echo "== build: took the prebuilt library of $GPU_CHECK_PREBUILT (built from these sources, loads)"
  echo "prebuilt: $GPU_CHECK_PREBUILT, built from these sources for $VERSIONS" >"$LOG/build.log"
  echo 0 >"$LOG/build.rc"
elif wanted build; then
  step build 180 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi

# ---- tests, in parallel workers when pytest-xdist is there (Triton compiles its autotuning
# configurations in each), each test under a time limit when pytest-timeout is there
# (seen on an H200, 16 cores: 8 workers ran 93% of the suite in 240 s). Only the tests that use
# the GPU (ids naming cuda or triton: 1305 of 2650 at 2026-11-26) run by default; the rest run
# in CI, and here too after them with GPU_CHECK_REST=1. Failures'
# tracebacks go to failures.log as they happen, so a run cut off by its limit still says what
# failed; the run lists its 30 slowest tests, to size the next one (a cut one too: pytest gets
# SIGINT at the limit).
# The files in order of what a GPU run must not miss, the operators' own tests first: xdist
# hands tests out in collection order, so a run cut by its limit has run those. Files not
# named here follow.
TEST_FILES=()
for name in ops inference_cluster one_grad training channel_gate triton nn errors properties reliability inference layouts cam; do
  TEST_FILES+=("tests/test_$name.py")
done
for file in tests/test_*.py; do
  [[ " ${TEST_FILES[*]} " == *" $file "* ]] || TEST_FILES+=("$file")
done
PYTEST_ARGS=("${TEST_FILES[@]}" -q -p no:cacheprovider -rfEs --durations=30)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n "$(($(nproc) > 4 ? $(nproc) - 2 : 2))"); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout 150); fi
GPU_TESTS="cuda or triton"
# ---- every kernel once, plainly, before the parallel steps (seconds): a kernel that hangs (the
# cluster kernel's barriers, never run before 2026-11-28) is killed here, at 60 s, rather than
# holding every test worker and sanitizer for their whole limits; its tests are then left out.
if wanted tests || wanted sanitizers; then
  step smoke 60 "$PY" benchmarks/sanitizer_smoke.py
  if [[ "$(cat "$LOG/smoke.rc")" == 124 || "$(cat "$LOG/smoke.rc")" == 137 ]]; then
    GPU_TESTS="($GPU_TESTS) and not test_inference_cluster"
  fi
fi
(
  # FUSED_CBAM_TRITON_AUTOTUNE=0: each Triton kernel compiles its first configuration only,
  # instead of compiling and timing all of them for every new test shape in every worker.
  export OMP_NUM_THREADS=1 FUSED_CBAM_FAILURE_LOG="$LOG/failures.log" FUSED_CBAM_TRITON_AUTOTUNE=0
  if wanted tests; then
    STEP_SIGNAL=INT step pytest "${PYTEST_LIMIT:-230}" "$PY" -m pytest "${PYTEST_ARGS[@]}" -k "$GPU_TESTS"
  fi
  # the CPU's >2^31-element tests are left to CI: about 50 s on two threads, longer on one
  if wanted rest; then
    STEP_SIGNAL=INT step pytest_rest "${REST_LIMIT:-100}" "$PY" -m pytest "${PYTEST_ARGS[@]}" -k "not ($GPU_TESTS) and not 2_31_elements"
  fi
) &

# ---- compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || true)
if [[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
if ! wanted sanitizers; then
  :
elif [[ -n "$SANITIZER" ]]; then
  # Without the caching allocator every tensor is its own allocation, so memcheck sees
  # out-of-bounds accesses that would otherwise land inside a cached block.
  step memcheck 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 1 "$PY" benchmarks/sanitizer_smoke.py &
  step racecheck 180 "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "$PY" benchmarks/sanitizer_smoke.py &
else
  for name in memcheck racecheck; do
    echo "compute-sanitizer not found" >"$LOG/$name.log"
    echo missing >"$LOG/$name.rc"
  done
fi
wait

# ---- benchmark (alone on the GPU): first a training step of the official layout in one
# operator, on its three operators and in the official code (eager, seconds), then the record
wanted bench && step training_paths 40 "$PY" benchmarks/training_paths.py --device cuda --dtype bfloat16 \
  --format channels_last --shapes 64x512x28x28,64x2048x7x7 --steps 20 --rounds 3
wanted bench && step training_paths_amp 30 "$PY" benchmarks/training_paths.py --device cuda --dtype float16 \
  --autocast --format channels_last --shapes 64x512x28x28 --steps 20 --rounds 3
read -r -a BENCH <<<"${BENCH_ARGS:---quick}"
wanted bench && step bench "${BENCH_LIMIT:-150}" "$PY" -m fused_cbam.bench "${BENCH[@]}" --out "$LOG/bench"

# ---- the fused block's passes kernel by kernel, bf16 at a bench shape
# (and where the host's time goes: the Triton forward took 2.2 ms eager, 0.4 ms in graph replays)
wanted kernels && step kernel_times 70 "$PY" benchmarks/kernel_times.py --device cuda --dtype bfloat16 --batch 64 \
  --shape 512x28x28 --format channels_last --providers cuda,triton --host --out "$LOG/kernel_times.txt"

# ---- what torch.compile generates for the reference (its passes over x), bf16 at a bench shape
wanted inductor && step inductor 60 "$PY" benchmarks/inductor_passes.py --dtype bfloat16 --batch 64 --shape 512x28x28 \
  --out "$LOG/inductor.txt"

# ---- summary
verdict() {  # verdict NAME PATTERN: the step's rc and its matching summary line
  local rc="missing"
  [[ -f "$LOG/$1.rc" ]] && rc=$(cat "$LOG/$1.rc")
  local line
  line=$(grep -E "$2" "$LOG/$1.log" 2>/dev/null | tail -n 1 || true)
  echo "rc=$rc ${line:-(no summary line)}"
}
# pytest's last line ("3 failed, 1200 passed, ... in 280.00s", "no tests ran"), not a test's
# output or a short-summary line that names an error; a run cut by its limit (rc 124) prints it
# too, for the tests that ran.
PYTEST_SUMMARY='^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran'
FAILED=()
for rc_file in "$LOG"/*.rc; do
  [[ -f "$rc_file" ]] || continue  # (no step ran)
  rc=$(cat "$rc_file")
  [[ "$rc" == 0 ]] || FAILED+=("$(basename "$rc_file" .rc)(rc=$rc)")
done
SUMMARY="$LOG/gpu-check-${DEVICE_TAG}.txt"
{
  echo "device: $DEVICE"
  echo "versions: $VERSIONS"
  echo "commit: $COMMIT"
  echo "steps: ${STEPS:1:-1}"
  wanted build && echo "build: $(verdict build 'Successfully installed|up to date|prebuilt|error|Error')"
  (wanted tests || wanted sanitizers) && echo "smoke: $(verdict smoke 'sanitizer_smoke')"
  wanted tests && echo "pytest ($GPU_TESTS): $(verdict pytest "$PYTEST_SUMMARY")"
  wanted rest && echo "pytest (the rest): $(verdict pytest_rest "$PYTEST_SUMMARY")"
  wanted sanitizers && echo "memcheck: $(verdict memcheck 'ERROR SUMMARY|sanitizer_smoke')"
  wanted sanitizers && echo "racecheck: $(verdict racecheck 'RACECHECK SUMMARY|ERROR SUMMARY|sanitizer_smoke')"
  wanted bench && echo "training paths: $(verdict training_paths 'forward\+backward')"
  wanted bench && echo "training paths under autocast: $(verdict training_paths_amp 'forward\+backward')"
  wanted bench && echo "bench: $(verdict bench '.')"
  wanted kernels && echo "kernel times: $(verdict kernel_times '^## ')"
  wanted inductor && echo "inductor: $(verdict inductor 'kernels touching')"
  echo "failed steps: ${FAILED[*]:-none}"
  echo "test failures:"
  # (xdist reports a failure twice; each once)
  grep -E "^==== " "$LOG/failures.log" 2>/dev/null | sed 's/^==== /  /' | awk '!seen[$0]++' | head -n 40 || true
  if wanted tests; then
    echo "skipped (cuda, triton), by place and reason:"
    grep -E "^SKIPPED" "$LOG/pytest.log" 2>/dev/null | sed 's/^/  /' | head -n 20 || true
  fi
  echo "total time: $(elapsed)s"
} >"$SUMMARY"
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
[[ ${#FAILED[@]} -eq 0 ]]
