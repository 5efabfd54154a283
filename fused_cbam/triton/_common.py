"""Helpers shared by the Triton kernel families.

- Input checks and the (n, c, p) strides of x in either memory format.
- Interpreter-aware autotuning: Triton's interpreter cannot benchmark, so it gets exactly one
  configuration (small blocks, so that its tests run every loop and mask path).
- How many programs share one long reduction (``num_splits``), and the deterministic second
  pass that adds their float32 partial sums in a fixed order (no atomics anywhere).
- The first-max rule as @triton.jit helpers: NaN is the maximum wherever it appears, and among
  tied maxima (or NaNs) the lowest index wins, like ``torch.max(dim)``.
"""

import contextlib
import functools
import os
import threading

import torch
import triton
import triton.language as tl

from .._layout import is_channels_last


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Read once: @triton.jit picks the interpreter at decoration time too.
INTERPRET = _interpreting()

# A reduction is split over several programs only if each still reduces this many elements.
_MIN_SPLIT_LENGTH = 16 if INTERPRET else 1024
# Small launches (finalize passes over [N, C] or [N, P] partials).
FINALIZE_BLOCK = 64 if INTERPRET else 1024

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest even), which
# would make its results differ from the reference by one bf16 ulp; ``cast_to`` emulates RTNE there.
_EMULATE_BF16_RTNE = tl.constexpr(INTERPRET)


# FUSED_CBAM_TRITON_AUTOTUNE=0: each kernel runs its first GPU configuration, untuned. For test
# runs on a GPU, where every new shape would compile and time every configuration.
TUNE = os.environ.get("FUSED_CBAM_TRITON_AUTOTUNE", "1") != "0"


def configs_to_try(gpu_configs, interpret_config) -> list:
    """``[interpret_config]`` in the interpreter; on a GPU ``gpu_configs``, or only the first of
    them when tuning is off."""
    if INTERPRET:
        return [interpret_config]
    return gpu_configs if TUNE else gpu_configs[:1]


# (tuner, its GPU configurations) for every autotuned kernel. In the interpreter the tuners hold
# only the interpreter's configuration; tests swap each GPU one in, so that every block shape a
# GPU may pick has run in CI (tests/test_triton.py).
TUNED_KERNELS: list = []

# Triton's Autotuner keeps the call it is timing on itself (its arguments, the copies it restores
# afterwards), so two threads tuning one kernel at once (nn.DataParallel's replicas, a threaded
# server) mix them up: an adding kernel's grad_x is restored from the other call's copy, or the
# tuner fails on the other call's arguments. Every launch of a tuned kernel holds this lock.
TUNER_LOCK = threading.Lock()


MAX_PROGRAMS = 2**31 - 1  # a CUDA grid's first dimension


def checked_grid(grid):
    """``grid`` (a tuple, or a function of the configuration's meta-parameters) that refuses more
    programs than a launch takes: Triton's launcher would raise an OverflowError that names
    nothing. Only rows of a few elements get there (one program per row, 2^31 elements or more)."""

    def checked(meta):
        dims = grid(meta) if callable(grid) else grid
        if dims[0] > MAX_PROGRAMS:
            raise ValueError(
                f"x: too large for the Triton kernels' grid ({dims[0]} programs, at most 2^31 - 1: "
                "2^31 elements or more in rows of a few); use backend='cuda' or split the batch"
            )
        return dims

    return checked


class _OneCallAtATime:
    """A tuned kernel whose launches (``kernel[grid](...)``) hold ``TUNER_LOCK`` and have their
    grid checked (``checked_grid``)."""

    def __init__(self, tuner):
        self.tuner = tuner

    def __getitem__(self, grid):
        launch = self.tuner[checked_grid(grid)]

        def locked(*args, **kwargs):
            with TUNER_LOCK:
                return launch(*args, **kwargs)

        return locked


def autotune(gpu_configs, interpret_config, key, restore_value=None):
    """``triton.autotune`` over ``configs_to_try(gpu_configs, interpret_config)``, recorded in
    ``TUNED_KERNELS``, launched one call at a time.

    Configurations only change block shapes and warps; every kernel accumulates in float32, so the
    choice changes results by rounding at most. ``restore_value`` names the arguments a kernel
    may add into: the tuner runs each configuration several times, and restores them after.
    """
    configs = configs_to_try(gpu_configs, interpret_config)

    def tune(kernel):
        tuner = triton.autotune(configs=configs, key=key, restore_value=restore_value)(kernel)
        TUNED_KERNELS.append((tuner, gpu_configs))
        return _OneCallAtATime(tuner)

    return tune


def config(num_warps: int = 4, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps)


# Tiles shared by the kernel families (autotuned among them, keyed on the shape).
# Reductions over P: NCHW reads rows of P (long BLOCK_P); channels_last reads rows of C.
REDUCE_NCHW = [
    config(BLOCK_C=1, BLOCK_P=1024, num_warps=4),
    config(BLOCK_C=2, BLOCK_P=512, num_warps=4),
    config(BLOCK_C=4, BLOCK_P=256, num_warps=4),
    config(BLOCK_C=4, BLOCK_P=512, num_warps=8),
    config(BLOCK_C=8, BLOCK_P=256, num_warps=8),
    config(BLOCK_C=16, BLOCK_P=128, num_warps=4),
]
REDUCE_CL = [
    config(BLOCK_C=32, BLOCK_P=32, num_warps=4),
    config(BLOCK_C=64, BLOCK_P=16, num_warps=4),
    config(BLOCK_C=64, BLOCK_P=32, num_warps=8),
    config(BLOCK_C=128, BLOCK_P=8, num_warps=4),
    config(BLOCK_C=128, BLOCK_P=16, num_warps=8),
    config(BLOCK_C=256, BLOCK_P=8, num_warps=8),
]
# Elementwise over [N, C, P].
POINTWISE_NCHW = [
    config(BLOCK_C=1, BLOCK_P=1024, num_warps=4),
    config(BLOCK_C=2, BLOCK_P=1024, num_warps=8),
    config(BLOCK_C=4, BLOCK_P=256, num_warps=4),
    config(BLOCK_C=8, BLOCK_P=512, num_warps=8),
]
POINTWISE_CL = [
    config(BLOCK_C=64, BLOCK_P=16, num_warps=4),
    config(BLOCK_C=128, BLOCK_P=8, num_warps=4),
    config(BLOCK_C=128, BLOCK_P=16, num_warps=8),
    config(BLOCK_C=256, BLOCK_P=8, num_warps=8),
]
INTERPRET_CONFIG = config(BLOCK_C=8, BLOCK_P=16)
# Stages of the kernels' loops over x (``tl.range(num_stages=...)``: Triton pipelines a loop's
# loads through shared memory): the plain loop keeps one block's loads in flight, and waits.
LOOP_STAGES = tl.constexpr(3)
SHAPE_KEY = ["N", "C", "P"]


def tuned_backward(kernel, nchw_configs, cl_configs) -> dict:
    """{(channels_last, accumulate): ``kernel`` autotuned} for a backward kernel with an
    ACCUMULATE variant: the accumulating ones have tuners of their own that restore dx between
    the configurations they time (the others need no copies of it)."""
    return {
        (cl, acc): autotune(cl_configs if cl else nchw_configs, INTERPRET_CONFIG, SHAPE_KEY,
                            restore_value=["dx_ptr"] if acc else None)(kernel)
        for cl in (False, True) for acc in (False, True)
    }  # fmt: skip


# Channels per program assumed by the split heuristic (the real BLOCK_C is autotuned).
ROWS_PER_PROGRAM = {False: 4, True: 64}


# Positions along H x W and C are int32 in the kernels' loops, which step one block past the last
# (at most 1024 long): they must not wrap past 2^31.
MAX_EXTENT = 2**31 - 1024


def check_x(x: torch.Tensor, op: str, name: str = "x") -> None:
    where = f"fused_cbam_triton::{op}: {name}"
    if x.dim() != 4:
        raise ValueError(f"{where} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    check_dtype(x, where)
    if x.shape[1] == 0 or x.shape[2] * x.shape[3] == 0:
        raise ValueError(
            f"{where} must have at least one channel and a non-empty spatial size, got shape {tuple(x.shape)}"
        )
    if max(x.shape[1], x.shape[2] * x.shape[3]) > MAX_EXTENT:
        raise ValueError(f"{where} must have C and H * W of at most 2^31 - 1024, got shape {tuple(x.shape)}")
    check_device(x, where)


def check_dtype(t: torch.Tensor, where: str) -> None:
    """``where``: "fused_cbam_triton::<op>: <argument>"."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where}: the Triton backend supports float16, bfloat16 and float32, "
            f"got {t.dtype}; use the fused_cbam C++/CUDA operators or fused_cbam.reference for it"
        )


def check_device(t: torch.Tensor, where: str) -> None:
    if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
        raise RuntimeError(
            f"{where} is on {t.device}; the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before import)"
        )


def check_like(t: torch.Tensor, x: torch.Tensor, shape, name: str, op: str, dtype=None) -> None:
    """A tensor that goes with x: the given shape, dtype (x's by default) and x's device."""
    dtype = x.dtype if dtype is None else dtype
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fused_cbam_triton::{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"fused_cbam_triton::{op}: {name} must have dtype {dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"fused_cbam_triton::{op}: {name} is on {t.device}, x on {x.device}")


def check_small(t: torch.Tensor, x: torch.Tensor, shape, name: str, op: str, dtype=None) -> torch.Tensor:
    """A gate, scale or upstream gradient of x: right shape, dtype and device; returned contiguous."""
    check_like(t, x, shape, name, op, dtype)
    return t.contiguous()


def grad_view(t: torch.Tensor, x: torch.Tensor, shape, name: str, op: str):
    """``(t', sample, step)``: a pooling's gradient [N, ...kept] (checked like ``check_like``)
    with element (n, k) at n * sample + k * step, k over the kept dimensions flattened. A view
    whose kept positions are evenly spaced (a channel of the spatial conv's input gradient, NCHW
    or channels_last) is read in place; any other is copied to contiguous."""
    check_like(t, x, shape, name, op)
    step, expected = 1, None
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size == 1:
            continue
        if expected is None:
            step = stride
        elif stride != expected:
            t = t.contiguous()
            return t, t.numel() // max(1, t.shape[0]), 1
        expected = stride * size
    return t, t.stride(0), step


def check_accumulator(grad_x: torch.Tensor, op: str, x: torch.Tensor = None) -> None:
    """A gradient of x that a backward kernel adds into: x's shape, dtype and device, and dense
    in x's memory format (the kernels index it with x's strides); without x, grad_x's own."""
    x = grad_x if x is None else x
    check_like(grad_x, x, x.shape, "grad_x", op)
    check_x(grad_x, op, "grad_x")
    channels_last = is_channels_last(x)
    if not grad_x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format):
        raise ValueError(
            f"fused_cbam_triton::{op}: grad_x: expected a tensor dense in x's memory format "
            f"({'channels_last' if channels_last else 'NCHW'})"
        )


def layout(x: torch.Tensor, like: torch.Tensor = None):
    """``(x', channels_last, (stride_n, stride_c, stride_p))`` with x' in the memory format of ``like``.

    ``like`` (default x) decides the format by the rule of ``_layout.empty_like_x``: channels_last
    when it is channels_last-contiguous and not contiguous, else NCHW-contiguous; x' is x itself
    when it already has that format (no copy of a channels_last x). P = H * W has a single stride
    in both formats (1 for NCHW, C for channels_last), which is all the kernels use.
    """
    like = x if like is None else like
    n, c, h, w = like.shape
    p = h * w
    if is_channels_last(like):
        return x.contiguous(memory_format=torch.channels_last), True, (p * c, 1, c)
    return x.contiguous(), False, (c * p, p, 1)


def device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(x: torch.Tensor, rows: int, length: int) -> int:
    """Programs per row for ``rows`` reductions of ``length`` elements each.

    Aims at about four programs per SM in all (few rows of long reductions, e.g. small N, are
    otherwise one program per SM at most), each still reducing ``_MIN_SPLIT_LENGTH`` elements.
    ``rows`` is the number of programs without splitting (a guess where the block is autotuned).
    """
    target = 4 if INTERPRET or not x.is_cuda else 4 * _sm_count(x.device.index or 0)
    want = triton.cdiv(target, max(rows, 1))
    return max(1, min(want, length // _MIN_SPLIT_LENGTH))


@triton.jit
def cast_to(v, ptr):
    """float32 ``v`` rounded to nearest even in the element type of ``ptr`` (for ``tl.store``)."""
    if _EMULATE_BF16_RTNE and ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, (u >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)


@triton.jit
def split_range(split, num_splits, length, BLOCK: tl.constexpr):
    """[start, end) of the ``split``-th of ``num_splits`` parts of [0, length), in whole BLOCKs.
    Computed in int64 (a length just under 2^31, rounded up to BLOCKs, would wrap in int32), then
    clamped to ``length`` (below 2^31, ``check_x``) and returned in int32 for the loops."""
    length = tl.cast(length, tl.int64)
    per = tl.cdiv(tl.cdiv(length, BLOCK), num_splits) * BLOCK
    start = tl.minimum(length, split * per)
    end = tl.minimum(length, start + per)
    return start.to(tl.int32), end.to(tl.int32)


@triton.jit
def first_max_merge(acc_val, acc_idx, val, idx):
    """Fold (val, idx) into the running (max, argmax); val comes from higher indices than acc.

    NaN beats everything and is never replaced; otherwise only a strictly larger value replaces
    the running max, so ties keep the lowest index.
    """
    take = (acc_val == acc_val) & ((val != val) | (val > acc_val))
    return tl.where(take, val, acc_val), tl.where(take, idx, acc_idx)


@triton.jit
def first_max_fold(acc_val, acc_idx, v, valid, idx):
    """Fold a float32 block ``v`` into running (max, argmax) pairs of the block's shape, element
    by element (``first_max_merge``; a masked element is -inf, which never takes over): no
    reduction across lanes inside the loop, one at the end (``first_max_reduce``), as Inductor's
    argmax reductions do. ``valid`` masks the block; ``idx`` (int32, broadcastable to v) is each
    element's index along the reduced dimension; blocks arrive in increasing index order."""
    return first_max_merge(acc_val, acc_idx, tl.where(valid, v, float("-inf")), idx)


@triton.jit
def ordered_max_fold(acc_val, acc_idx, v, valid, idx):
    """``first_max_fold`` without the NaN rule: a strictly larger value takes over, which keeps the
    lowest index on ties since each pair sees its positions in increasing order. One comparison
    an element instead of three; but NaN never takes over, so a kernel folds this way only while
    its data holds no NaN: it checks after its loop (a NaN makes the running sum NaN) and folds
    again with ``first_max_fold`` where one was seen."""
    take = valid & (v > acc_val)
    return tl.where(take, v, acc_val), tl.where(take, idx, acc_idx)


@triton.jit
def any_nan(v):
    """Whether the block ``v`` holds a NaN, as a scalar for ``if``."""
    return tl.max((v != v).to(tl.int32)) > 0


@triton.jit
def first_max_reduce(acc_val, acc_idx, AXIS: tl.constexpr):
    """(max, argmax) along AXIS of ``first_max_fold``'s pairs: the first NaN, else the lowest
    index of the maximum. Each pair starts at -inf with the index of the first position it
    covers, so a pair that saw only -inf (or nothing: positions past the end) names a position
    no later than any -inf it saw, and the lowest of them is the first."""
    is_nan = acc_val != acc_val
    has_nan = tl.max(is_nan.to(tl.int32), axis=AXIS) > 0
    nan_idx = tl.min(tl.where(is_nan, acc_idx, 2147483647), axis=AXIS)
    # NaN from the data itself (NaN + 0 + ... is NaN): no NaN literal in the kernel.
    nan_val = tl.sum(tl.where(is_nan, acc_val, 0.0), axis=AXIS)
    vv = tl.where(is_nan, float("-inf"), acc_val)
    at_max = (~is_nan) & (vv == tl.expand_dims(tl.max(vv, axis=AXIS), AXIS))
    max_idx = tl.min(tl.where(at_max, acc_idx, 2147483647), axis=AXIS)
    # The value of the pair that names max_idx (pairs cover disjoint positions): among tied
    # zeros, tl.max may return either sign, and torch.max returns the first one's.
    first = at_max & (acc_idx == tl.expand_dims(max_idx, AXIS))
    blk_max = tl.min(tl.where(first, vv, float("inf")), axis=AXIS)
    return tl.where(has_nan, nan_val, blk_max), tl.where(has_nan, nan_idx, max_idx)


@triton.jit
def sum_rows_kernel(part_ptr, out_ptr, M, S, SIGMOID: tl.constexpr, BLOCK: tl.constexpr):
    """out[m] = sum over s = 0..S-1 of part[s, m] (in float32, in a fixed order), or with SIGMOID
    the sigmoid of that sum rounded to out's dtype (as ``sigmoid(logits.sum(0))`` rounds it),
    rounded to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.zeros([BLOCK], tl.float32)
    ptrs = part_ptr + offs
    for _ in range(0, S):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += M
    if SIGMOID:
        acc = tl.sigmoid(cast_to(acc, out_ptr).to(tl.float32))
    tl.store(out_ptr + offs, cast_to(acc, out_ptr), mask=mask)


def sum_target(parts: int, out: torch.Tensor) -> torch.Tensor:
    """Where a kernel stores its sums (through ``cast_to``) of the M elements of ``out``
    (contiguous): ``out`` itself, viewed as [1, M], when one program makes each sum; else float32
    partials [parts, M] for ``sum_partials``. One part, the usual case on a full GPU, saves the
    second launch."""
    return out.view(1, -1) if parts == 1 else torch.empty(parts, out.numel(), device=out.device, dtype=torch.float32)


def sum_partials(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Deterministic reduction of ``partials`` [S, M] (from ``sum_target``) over S into ``out``
    (M elements, contiguous); nothing to do when the kernel wrote ``out`` itself."""
    s, m = partials.shape
    if m and s > 1:
        sum_rows_kernel[(triton.cdiv(m, FINALIZE_BLOCK),)](partials, out, m, s, SIGMOID=False, BLOCK=FINALIZE_BLOCK)
    return out
