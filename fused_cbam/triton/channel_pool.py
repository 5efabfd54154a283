"""Channel pooling: mean, max and arg-max of each (n, c) plane over P = H * W, and its backward.

Forward, one launch, or two when P is split:
1. ``_partial_kernel``: program (n, block of BLOCK_C channels, split) walks its part of P in
   BLOCK_P chunks, keeping a float32 sum and the first max (NaN wins, lowest p on ties) in
   registers, a pair per element of the block, reduced over P once at the end. The walk folds
   the pairs without the NaN rule, and again with it only when the sum shows a NaN. With one
   split (FINAL) it writes avg = sum / P and max in x's dtype and argmax in int32 itself; else
   float32 partials [S, N * C].
2. ``_finalize_kernel`` (S > 1): folds the S partials in split order (so the lowest p still
   wins) and writes avg, max and argmax.
S > 1 only when N * C alone would leave the GPU idle (see ``_common.num_splits``).

Backward, one elementwise launch: dx[n, c, p] = grad_avg[n, c] / P + (p == argmax[n, c]) * grad_max[n, c],
written, or added into a given gradient of x (``channel_pool_backward_add``), there with the mean's
share of a spatial pooling when given: spatial_scale[n, c] * spatial_grad_mean[n, p] / C.
"""

import torch
import triton
import triton.language as tl

from .._layout import empty_like_x
from ._common import (
    FINALIZE_BLOCK,
    INTERPRET_CONFIG,
    LOOP_STAGES,
    POINTWISE_CL,
    POINTWISE_NCHW,
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
    device_guard,
    first_max_fold,
    first_max_merge,
    first_max_reduce,
    grad_view,
    layout,
    num_splits,
    ordered_max_fold,
    split_range,
    tuned_backward,
)


@triton.jit
def _walk(row_ptr, mask_c, start, end, stride_p,
          EXACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    """Sum and running (max, argmax) pairs of the block's rows over [start, end), a pair per
    element of the block; EXACT folds with the NaN rule, else ``ordered_max_fold``."""
    acc_sum = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    acc_max = tl.full([BLOCK_C, BLOCK_P], float("-inf"), tl.float32)
    acc_idx = tl.zeros([BLOCK_C, BLOCK_P], tl.int32) + (start + tl.arange(0, BLOCK_P))[None, :]
    for p0 in tl.range(start, end, BLOCK_P, num_stages=LOOP_STAGES):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p < end)[None, :]
        v = tl.load(row_ptr + offs_p.to(tl.int64)[None, :] * stride_p, mask=mask, other=0.0).to(tl.float32)
        acc_sum += v
        if EXACT:
            acc_max, acc_idx = first_max_fold(acc_max, acc_idx, v, mask, offs_p[None, :])
        else:
            acc_max, acc_idx = ordered_max_fold(acc_max, acc_idx, v, mask, offs_p[None, :])
    return acc_sum, acc_max, acc_idx


@triton.jit
def _partial_kernel(
    x_ptr, psum_ptr, pmax_ptr, pidx_ptr,
    N, C, P, stride_n, stride_c, stride_p, S,
    FINAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    num_cblk = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // num_cblk).to(tl.int64)
    offs_c = (tl.program_id(0) % num_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    split = tl.program_id(1)
    start, end = split_range(split, S, P, BLOCK_P)

    row_ptr = x_ptr + n * stride_n + offs_c.to(tl.int64)[:, None] * stride_c
    acc_sum, acc_max, acc_idx = _walk(row_ptr, mask_c, start, end, stride_p, False, BLOCK_C, BLOCK_P)
    if any_nan(acc_sum):  # NaN in the data (or inf - inf): the pairs again, with the NaN rule
        _, acc_max, acc_idx = _walk(row_ptr, mask_c, start, end, stride_p, True, BLOCK_C, BLOCK_P)

    out = split.to(tl.int64) * N * C + n * C + offs_c
    acc_max, acc_idx = first_max_reduce(acc_max, acc_idx, 1)
    acc_sum = tl.sum(acc_sum, axis=1)
    if FINAL:  # the pointers are avg, max and argmax themselves
        acc_sum = acc_sum / P
    tl.store(psum_ptr + out, cast_to(acc_sum, psum_ptr), mask=mask_c)
    tl.store(pmax_ptr + out, cast_to(acc_max, pmax_ptr), mask=mask_c)
    tl.store(pidx_ptr + out, acc_idx.to(pidx_ptr.dtype.element_ty), mask=mask_c)


_partial_nchw = autotune(REDUCE_NCHW, INTERPRET_CONFIG, SHAPE_KEY)(_partial_kernel)
_partial_cl = autotune(REDUCE_CL, INTERPRET_CONFIG, SHAPE_KEY)(_partial_kernel)


@triton.jit
def _finalize_kernel(
    psum_ptr, pmax_ptr, pidx_ptr, avg_ptr, max_ptr, argmax_ptr, M, P, S, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc_sum = tl.load(psum_ptr + offs, mask=mask, other=0.0)
    acc_max = tl.load(pmax_ptr + offs, mask=mask, other=0.0)
    acc_idx = tl.load(pidx_ptr + offs, mask=mask, other=0)
    for s in range(1, S):
        at = s * M + offs
        acc_sum += tl.load(psum_ptr + at, mask=mask, other=0.0)
        val = tl.load(pmax_ptr + at, mask=mask, other=0.0)
        idx = tl.load(pidx_ptr + at, mask=mask, other=0)
        acc_max, acc_idx = first_max_merge(acc_max, acc_idx, val, idx)
    tl.store(avg_ptr + offs, cast_to(acc_sum / P, avg_ptr), mask=mask)
    tl.store(max_ptr + offs, cast_to(acc_max, max_ptr), mask=mask)
    tl.store(argmax_ptr + offs, acc_idx, mask=mask)


def channel_pool(x: torch.Tensor):
    check_x(x, "channel_pool")
    n, c, h, w = x.shape
    p = h * w
    avg = x.new_empty(n, c)
    mx = x.new_empty(n, c)
    argmax = x.new_empty(n, c, dtype=torch.int32)
    if n == 0:
        return avg, mx, argmax
    x, cl, (sn, sc, sp) = layout(x)
    splits = num_splits(x, n * c // ROWS_PER_PROGRAM[cl], p)
    if splits == 1:
        psum, pmax, pidx = avg, mx, argmax
    else:
        psum = torch.empty(splits, n * c, device=x.device, dtype=torch.float32)
        pmax = torch.empty_like(psum)
        pidx = torch.empty(splits, n * c, device=x.device, dtype=torch.int32)
    kernel = _partial_cl if cl else _partial_nchw

    def grid(meta):
        return (n * triton.cdiv(c, meta["BLOCK_C"]), splits)

    with device_guard(x):
        kernel[grid](x, psum, pmax, pidx, n, c, p, sn, sc, sp, splits, FINAL=splits == 1)
        if splits > 1:
            _finalize_kernel[(triton.cdiv(n * c, FINALIZE_BLOCK),)](
                psum, pmax, pidx, avg, mx, argmax, n * c, p, splits, BLOCK=FINALIZE_BLOCK
            )
    return avg, mx, argmax


@triton.jit
def _backward_kernel(
    grad_avg_ptr, grad_max_ptr, argmax_ptr, spatial_mean_ptr, spatial_scale_ptr, dx_ptr,
    N, C, P, stride_n, stride_c, stride_p, mean_sample, mean_step,
    ACCUMULATE: tl.constexpr, SPATIAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    num_pblk = tl.cdiv(P, BLOCK_P)
    num_cblk = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    n = (pid // (num_cblk * num_pblk)).to(tl.int64)
    offs_c = (pid // num_pblk % num_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = (pid % num_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_p < P)[None, :]

    ga = tl.load(grad_avg_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32) / P
    gm = tl.load(grad_max_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    am = tl.load(argmax_ptr + n * C + offs_c, mask=mask_c, other=-1)
    d = ga[:, None] + tl.where(offs_p[None, :] == am[:, None], gm[:, None], 0.0)
    if SPATIAL:  # the mean's share of the spatial pooling, scale[n, c] * grad_mean[n, p] / C
        ss = tl.load(spatial_scale_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32) / C
        sm = tl.load(spatial_mean_ptr + n * mean_sample + offs_p.to(tl.int64) * mean_step, mask=offs_p < P, other=0.0)
        d += ss[:, None] * sm.to(tl.float32)[None, :]
    offs = n * stride_n + offs_c.to(tl.int64)[:, None] * stride_c + offs_p.to(tl.int64)[None, :] * stride_p
    if ACCUMULATE:
        d += tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, cast_to(d, dx_ptr), mask=mask)


_BACKWARD = tuned_backward(_backward_kernel, POINTWISE_NCHW, POINTWISE_CL)


def _backward_into(dx, grad_avg, grad_max, argmax, accumulate: bool, op: str, spatial_grad_mean=None, spatial_scale=None) -> None:
    """Writes (``accumulate``: adds) the gradient of x into ``dx``, dense in its memory format;
    adding, also the mean's share of a spatial pooling when ``spatial_grad_mean`` is given."""
    n, c, h, w = dx.shape
    p = h * w
    grad_avg = check_small(grad_avg, dx, (n, c), "grad_avg", op)
    grad_max = check_small(grad_max, dx, (n, c), "grad_max", op)
    argmax = check_small(argmax, dx, (n, c), "argmax", op, dtype=torch.int32)
    if (spatial_grad_mean is None) != (spatial_scale is None):
        given = "spatial_grad_mean" if spatial_scale is None else "spatial_scale"
        raise ValueError(
            f"fused_cbam_triton::{op}: spatial_grad_mean, spatial_scale: expected both (the mean's share of a "
            f"spatial pooling, spatial_scale[n, c] * spatial_grad_mean[n, p] / C) or neither, got only {given}"
        )
    spatial = spatial_grad_mean is not None
    mean_sample = mean_step = 0
    if spatial:
        # one channel of the spatial conv's input gradient, read in place
        spatial_grad_mean, mean_sample, mean_step = grad_view(spatial_grad_mean, dx, (n, 1, h, w), "spatial_grad_mean", op)
        spatial_scale = check_small(spatial_scale, dx, (n, c), "spatial_scale", op)
    if dx.numel() == 0:
        return
    _, cl, (sn, sc, sp) = layout(dx)
    kernel = _BACKWARD[cl, accumulate]

    def grid(meta):
        return (n * triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(p, meta["BLOCK_P"]),)

    with device_guard(dx):
        kernel[grid](
            grad_avg, grad_max, argmax, spatial_grad_mean if spatial else dx, spatial_scale if spatial else dx, dx,
            n, c, p, sn, sc, sp, mean_sample, mean_step, ACCUMULATE=accumulate, SPATIAL=spatial,
        )  # fmt: skip


def channel_pool_backward(grad_avg, grad_max, argmax, x):
    check_x(x, "channel_pool_backward")
    dx = empty_like_x(x)
    _backward_into(dx, grad_avg, grad_max, argmax, False, "channel_pool_backward")
    return dx


def channel_pool_backward_add(grad_x, grad_avg, grad_max, argmax, spatial_grad_mean=None, spatial_scale=None) -> None:
    op = "channel_pool_backward_add"
    check_accumulator(grad_x, op)
    _backward_into(grad_x, grad_avg, grad_max, argmax, True, op, spatial_grad_mean, spatial_scale)
