"""Spatial pooling: mean, max and arg-max over C of y = x * scale[n, c], and its backward.
The mean and max are the two channels of one [N, 2, H, W] tensor, the spatial conv's input.

Forward, one launch: program (n, block of BLOCK_P positions) walks C in BLOCK_C chunks, forms
y in float32 (never stored) and keeps the float32 sum and the first max (NaN wins, lowest c on
ties) in registers, a pair per element of the block, reduced over C once at the end. The walk
folds the pairs without the NaN rule, and again with it only when the sum shows a NaN.

Backward: w[n, c, p] = grad_mean[n, p] / C + (c == argmax[n, p]) * grad_max[n, p];
grad_x = w * scale[n, c]; grad_scale[n, c] = sum_p w * x. Program (n, block of BLOCK_C channels,
split) walks its part of P, writes grad_x (or adds into it: ``spatial_pool_backward_add``; with
add_mean=False only the max's share, at each pixel's arg-max element, the mean's being left to
``channel_pool_backward_add``) and a float32 partial of grad_scale [S, N * C]; a second launch adds
the S partials in a fixed order (``_common.sum_partials``).
"""

import torch
import triton
import triton.language as tl

from .._layout import empty_like_x, mean_and_max
from ._common import (
    INTERPRET_CONFIG,
    LOOP_STAGES,
    REDUCE_CL,
    REDUCE_NCHW,
    ROWS_PER_PROGRAM,
    SHAPE_KEY,
    any_nan,
    autotune,
    cast_to,
    check_accumulator,
    check_small,
    check_x,
    config,
    device_guard,
    first_max_fold,
    first_max_reduce,
    grad_view,
    layout,
    num_splits,
    ordered_max_fold,
    split_range,
    sum_partials,
    sum_target,
    tuned_backward,
)

# Forward reduces over C: NCHW tiles are wide in P; channels_last tiles are tall in C.
_FORWARD_NCHW = [
    config(BLOCK_C=2, BLOCK_P=256, num_warps=4),
    config(BLOCK_C=4, BLOCK_P=256, num_warps=4),
    config(BLOCK_C=8, BLOCK_P=128, num_warps=4),
    config(BLOCK_C=8, BLOCK_P=256, num_warps=8),
    config(BLOCK_C=16, BLOCK_P=64, num_warps=4),
]
_FORWARD_CL = [
    config(BLOCK_C=32, BLOCK_P=8, num_warps=4),
    config(BLOCK_C=64, BLOCK_P=8, num_warps=4),
    config(BLOCK_C=64, BLOCK_P=16, num_warps=8),
    config(BLOCK_C=128, BLOCK_P=4, num_warps=4),
    config(BLOCK_C=128, BLOCK_P=8, num_warps=8),
]


@triton.jit
def _walk(col_ptr, scale_ptr, mask_p, C, stride_c, EXACT: tl.constexpr, HAS_SCALE: tl.constexpr,
          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    """Sum and running (max, argmax) pairs of y over C, a pair per element of the block; EXACT
    folds with the NaN rule, else ``ordered_max_fold``. scale_ptr is row n of the scale."""
    acc_sum = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    acc_max = tl.full([BLOCK_C, BLOCK_P], float("-inf"), tl.float32)
    acc_idx = tl.zeros([BLOCK_C, BLOCK_P], tl.int32) + tl.arange(0, BLOCK_C)[:, None]
    for c0 in tl.range(0, C, BLOCK_C, num_stages=LOOP_STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        y = tl.load(col_ptr + offs_c.to(tl.int64)[:, None] * stride_c, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            y = y * s[:, None]
        acc_sum += tl.where(mask, y, 0.0)
        if EXACT:
            acc_max, acc_idx = first_max_fold(acc_max, acc_idx, y, mask, offs_c[:, None])
        else:
            acc_max, acc_idx = ordered_max_fold(acc_max, acc_idx, y, mask, offs_c[:, None])
    return acc_sum, acc_max, acc_idx


@triton.jit
def _forward_kernel(
    x_ptr, scale_ptr, mean_ptr, max_ptr, argmax_ptr,
    N, C, P, stride_n, stride_c, stride_p, maps_stride_n,
    HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    num_pblk = tl.cdiv(P, BLOCK_P)
    n = (tl.program_id(0) // num_pblk).to(tl.int64)
    offs_p = (tl.program_id(0) % num_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P

    col_ptr = x_ptr + n * stride_n + offs_p.to(tl.int64)[None, :] * stride_p
    scale_row = scale_ptr + n * C
    acc_sum, acc_max, acc_idx = _walk(
        col_ptr, scale_row, mask_p, C, stride_c, False, HAS_SCALE, BLOCK_C, BLOCK_P
    )  # fmt: skip
    if any_nan(acc_sum):  # NaN in y (or inf - inf): the pairs again, with the NaN rule
        _, acc_max, acc_idx = _walk(
            col_ptr, scale_row, mask_p, C, stride_c, True, HAS_SCALE, BLOCK_C, BLOCK_P
        )  # fmt: skip

    acc_max, acc_idx = first_max_reduce(acc_max, acc_idx, 0)
    out = n * maps_stride_n + offs_p
    tl.store(mean_ptr + out, cast_to(tl.sum(acc_sum, axis=0) / C, mean_ptr), mask=mask_p)
    tl.store(max_ptr + out, cast_to(acc_max, max_ptr), mask=mask_p)
    tl.store(argmax_ptr + n * P + offs_p, acc_idx, mask=mask_p)


_forward_nchw = autotune(_FORWARD_NCHW, INTERPRET_CONFIG, SHAPE_KEY)(_forward_kernel)
_forward_cl = autotune(_FORWARD_CL, INTERPRET_CONFIG, SHAPE_KEY)(_forward_kernel)


def spatial_pool(x: torch.Tensor, scale, max_first: bool = False):
    check_x(x, "spatial_pool")
    n, c, h, w = x.shape
    p = h * w
    if scale is not None:
        scale = check_small(scale, x, (n, c), "scale", "spatial_pool")
    maps = x.new_empty(n, 2, h, w)
    argmax = x.new_empty(n, 1, h, w, dtype=torch.int32)
    if n == 0:
        return maps, argmax
    mean, mx = mean_and_max(maps, max_first)
    x, cl, (sn, sc, sp) = layout(x)
    kernel = _forward_cl if cl else _forward_nchw

    def grid(meta):
        return (n * triton.cdiv(p, meta["BLOCK_P"]),)

    with device_guard(x):
        kernel[grid](
            x, x if scale is None else scale, mean, mx, argmax, n, c, p, sn, sc, sp, 2 * p,
            HAS_SCALE=scale is not None,
        )  # fmt: skip
    return maps, argmax


@triton.jit
def _backward_kernel(
    grad_mean_ptr, grad_max_ptr, argmax_ptr, x_ptr, scale_ptr, dx_ptr, pscale_ptr,
    N, C, P, stride_n, stride_c, stride_p, S, mean_sample, mean_step, max_sample, max_step,
    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, ADD_MEAN: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    num_cblk = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // num_cblk).to(tl.int64)
    offs_c = (tl.program_id(0) % num_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    split = tl.program_id(1)
    start, end = split_range(split, S, P, BLOCK_P)

    row_off = n * stride_n + offs_c.to(tl.int64)[:, None] * stride_c
    if HAS_SCALE:
        s = tl.load(scale_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for p0 in tl.range(start, end, BLOCK_P, num_stages=LOOP_STAGES):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        mask = mask_c[:, None] & mask_p[None, :]
        at_p = offs_p.to(tl.int64)
        g_mean = tl.load(grad_mean_ptr + n * mean_sample + at_p * mean_step, mask=mask_p, other=0.0)
        g_mean = g_mean.to(tl.float32) / C
        g_max = tl.load(grad_max_ptr + n * max_sample + at_p * max_step, mask=mask_p, other=0.0).to(tl.float32)
        am = tl.load(argmax_ptr + n * P + offs_p, mask=mask_p, other=-1)
        at_max = offs_c[:, None] == am[None, :]
        w = g_mean[None, :] + tl.where(at_max, g_max[None, :], 0.0)
        offs = row_off + offs_p.to(tl.int64)[None, :] * stride_p
        if HAS_SCALE:
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(mask, w * xv, 0.0)
        if not ADD_MEAN:  # only the max's share (there is a scale), into each pixel's arg-max element
            mask = mask & at_max
            dx = g_max[None, :] * s[:, None]
        elif HAS_SCALE:
            dx = w * s[:, None]
        else:
            dx = w
        if ACCUMULATE:
            dx += tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, cast_to(dx, dx_ptr), mask=mask)

    if HAS_SCALE:
        out = split.to(tl.int64) * N * C + n * C + offs_c
        tl.store(pscale_ptr + out, cast_to(tl.sum(acc, axis=1), pscale_ptr), mask=mask_c)


_BACKWARD = tuned_backward(_backward_kernel, REDUCE_NCHW, REDUCE_CL)


def spatial_pool_backward(grad_mean, grad_max, argmax, x, scale):
    check_x(x, "spatial_pool_backward")
    dx = empty_like_x(x)
    grad_scale = _backward_into(dx, grad_mean, grad_max, argmax, x, scale, False, "spatial_pool_backward")
    return dx, grad_scale


def spatial_pool_backward_add(grad_x, grad_mean, grad_max, argmax, x, scale, add_mean: bool = True):
    op = "spatial_pool_backward_add"
    check_x(x, op)
    check_accumulator(grad_x, op, x)
    if not add_mean and scale is None:
        raise ValueError(
            f"fused_cbam_triton::{op}: add_mean: expected True without a scale (the mean's share left to "
            "channel_pool_backward_add is scale[n, c] * grad_mean[n, p] / C)"
        )
    return _backward_into(grad_x, grad_mean, grad_max, argmax, x, scale, True, op, add_mean)


def _backward_into(dx, grad_mean, grad_max, argmax, x, scale, accumulate: bool, op: str, add_mean: bool = True):
    """Writes (``accumulate``: adds) the gradient of x into ``dx`` (dense in x's memory format;
    without ``add_mean`` only the max's share); returns the gradient of the scale (empty without
    one)."""
    n, c, h, w = x.shape
    p = h * w
    # Each map's gradient in place (one channel of the spatial conv's input gradient, usually).
    grad_mean, mean_sample, mean_step = grad_view(grad_mean, x, (n, 1, h, w), "grad_mean", op)
    grad_max, max_sample, max_step = grad_view(grad_max, x, (n, 1, h, w), "grad_max", op)
    argmax = check_small(argmax, x, (n, 1, h, w), "argmax", op, dtype=torch.int32)
    if scale is not None:
        scale = check_small(scale, x, (n, c), "scale", op)
        grad_scale = x.new_empty(n, c)
    else:
        grad_scale = x.new_empty(0)
    if dx.numel() == 0:
        return grad_scale.zero_()
    x, cl, (sn, sc, sp) = layout(x)
    splits = num_splits(x, n * c // ROWS_PER_PROGRAM[cl], p)
    pscale = sum_target(splits, grad_scale) if scale is not None else dx
    kernel = _BACKWARD[cl, accumulate]

    def grid(meta):
        return (n * triton.cdiv(c, meta["BLOCK_C"]), splits)

    with device_guard(x):
        kernel[grid](
            grad_mean, grad_max, argmax, x, x if scale is None else scale, dx, pscale,
            n, c, p, sn, sc, sp, splits, mean_sample, mean_step, max_sample, max_step,
            HAS_SCALE=scale is not None, ACCUMULATE=accumulate, ADD_MEAN=add_mean,
        )  # fmt: skip
        if scale is not None:
            sum_partials(pscale, grad_scale.view(-1))
    return grad_scale
