"""Gating: out = x * g[n, c] * h[n, 0, p] (either gate optional), and its backward.

Forward, one elementwise launch over [BLOCK_C, BLOCK_P] tiles, products in float32 in the
reference's order ((x * g) * h), rounded once.

Backward reads grad_out and x once, in one launch, for all three gradients:
    t = dout * h;  grad_x = t * g;  grad_g[n, c] = sum_p t * x;  grad_h[n, p] = sum_c dout * (x * g).
Program (n, block of BLOCK_C channels, split of P) walks its part of P: it writes grad_x, keeps
grad_g's sum in registers (float32 partial [S, N * C] at the end) and writes, per chunk, the
float32 partial of grad_h over its channel block ([ceil(C / BLOCK_C), N * P]). Two small
launches then add the partials in a fixed order (``_common.sum_partials``): deterministic, no
atomics. BLOCK_C is chosen here, not autotuned, because it sets the size of grad_h's partials.
"""

import torch
import triton
import triton.language as tl

from .._layout import empty_like_x
from ._common import (
    INTERPRET_CONFIG,
    POINTWISE_CL,
    POINTWISE_NCHW,
    SHAPE_KEY,
    INTERPRET,
    autotune,
    cast_to,
    check_like,
    check_small,
    check_x,
    config,
    device_guard,
    layout,
    num_splits,
    split_range,
    sum_partials,
    sum_target,
)

_BACKWARD_NCHW = [
    config(BLOCK_P=64, num_warps=4),
    config(BLOCK_P=128, num_warps=4),
    config(BLOCK_P=128, num_warps=8),
    config(BLOCK_P=256, num_warps=8),
]
_BACKWARD_CL = [
    config(BLOCK_P=4, num_warps=4),
    config(BLOCK_P=8, num_warps=4),
    config(BLOCK_P=16, num_warps=8),
    config(BLOCK_P=32, num_warps=8),
]


@triton.jit
def _forward_kernel(
    x_ptr, g_ptr, h_ptr, out_ptr,
    N, C, P, stride_n, stride_c, stride_p,
    HAS_G: tl.constexpr, HAS_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    num_pblk = tl.cdiv(P, BLOCK_P)
    num_cblk = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    n = (pid // (num_cblk * num_pblk)).to(tl.int64)
    offs_c = (pid // num_pblk % num_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = (pid % num_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_c[:, None] & mask_p[None, :]

    offs = n * stride_n + offs_c.to(tl.int64)[:, None] * stride_c + offs_p.to(tl.int64)[None, :] * stride_p
    out = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        out = out * g[:, None]
    if HAS_H:
        h = tl.load(h_ptr + n * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        out = out * h[None, :]
    tl.store(out_ptr + offs, cast_to(out, out_ptr), mask=mask)


_forward_nchw = autotune(POINTWISE_NCHW, INTERPRET_CONFIG, SHAPE_KEY)(_forward_kernel)
_forward_cl = autotune(POINTWISE_CL, INTERPRET_CONFIG, SHAPE_KEY)(_forward_kernel)


def _gates(x, g, h, op):
    n, c, hh, ww = x.shape
    if g is not None:
        g = check_small(g, x, (n, c), "channel_gate", op)
    if h is not None:
        h = check_small(h, x, (n, 1, hh, ww), "spatial_gate", op)
    return g, h


def gate_apply(x: torch.Tensor, channel_gate, spatial_gate):
    check_x(x, "gate_apply")
    g, h = _gates(x, channel_gate, spatial_gate, "gate_apply")
    out = empty_like_x(x)
    gate_apply_into(x, g, h, out)
    return out


def gate_apply_into(x: torch.Tensor, g, h, out: torch.Tensor) -> None:
    """out = x * g * h (unchecked): gates contiguous in x's dtype or None, out of x's shape and
    dense in the memory format ``layout(x)`` gives, e.g. rows of a larger output."""
    n, c, hh, ww = x.shape
    p = hh * ww
    if out.numel() == 0:
        return
    x, cl, (sn, sc, sp) = layout(x)
    kernel = _forward_cl if cl else _forward_nchw

    def grid(meta):
        return (n * triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(p, meta["BLOCK_P"]),)

    with device_guard(x):
        kernel[grid](
            x, x if g is None else g, x if h is None else h, out, n, c, p, sn, sc, sp,
            HAS_G=g is not None, HAS_H=h is not None,
        )  # fmt: skip


@triton.jit
def _backward_kernel(
    dout_ptr, x_ptr, g_ptr, h_ptr, dx_ptr, pg_ptr, ph_ptr,
    N, C, P, stride_n, stride_c, stride_p, S,
    HAS_G: tl.constexpr, HAS_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    num_cblk = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // num_cblk).to(tl.int64)
    cblk = tl.program_id(0) % num_cblk
    offs_c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    split = tl.program_id(1)
    start, end = split_range(split, S, P, BLOCK_P)

    row_off = n * stride_n + offs_c.to(tl.int64)[:, None] * stride_c
    if HAS_G:
        g = tl.load(g_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    acc_g = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    ph_row = ph_ptr + (cblk.to(tl.int64) * N + n) * P
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        mask = mask_c[:, None] & mask_p[None, :]
        offs = row_off + offs_p.to(tl.int64)[None, :] * stride_p
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_H:
            hv = tl.load(h_ptr + n * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            t = dout * hv[None, :]
        else:
            t = dout
        if HAS_G:
            tl.store(dx_ptr + offs, cast_to(t * g[:, None], dx_ptr), mask=mask)
        else:
            tl.store(dx_ptr + offs, cast_to(t, dx_ptr), mask=mask)
        if HAS_G or HAS_H:
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            acc_g += tl.where(mask, t * xv, 0.0)
        if HAS_H:
            if HAS_G:
                xg = xv * g[:, None]
            else:
                xg = xv
            part_h = tl.sum(tl.where(mask, dout * xg, 0.0), axis=0)
            tl.store(ph_row + offs_p, cast_to(part_h, ph_ptr), mask=mask_p)

    if HAS_G:
        out = split.to(tl.int64) * N * C + n * C + offs_c
        tl.store(pg_ptr + out, cast_to(tl.sum(acc_g, axis=1), pg_ptr), mask=mask_c)


_backward_nchw = autotune(_BACKWARD_NCHW, config(BLOCK_P=16), SHAPE_KEY)(_backward_kernel)
_backward_cl = autotune(_BACKWARD_CL, config(BLOCK_P=16), SHAPE_KEY)(_backward_kernel)


def _backward_block_c(c: int, cl: bool) -> int:
    if INTERPRET:
        return 8
    return min(64 if cl else 32, triton.next_power_of_2(c))


def gate_apply_backward(grad_out, x, channel_gate, spatial_gate):
    op = "gate_apply_backward"
    check_x(x, op)
    g, h = _gates(x, channel_gate, spatial_gate, op)
    n, c, hh, ww = x.shape
    p = hh * ww
    check_like(grad_out, x, x.shape, "grad_out", op)
    grad_g = x.new_empty(n, c) if g is not None else x.new_empty(0)
    grad_h = x.new_empty(n, 1, hh, ww) if h is not None else x.new_empty(0)
    dx = empty_like_x(x)
    if dx.numel() == 0:
        return dx, grad_g.zero_(), grad_h.zero_()
    grad_out, _, _ = layout(grad_out, like=x)
    x, cl, (sn, sc, sp) = layout(x)
    block_c = _backward_block_c(c, cl)
    num_cblk = triton.cdiv(c, block_c)
    splits = num_splits(x, n * num_cblk, p)
    pg = sum_target(splits, grad_g) if g is not None else dx
    ph = sum_target(num_cblk, grad_h) if h is not None else dx
    kernel = _backward_cl if cl else _backward_nchw
    with device_guard(x):
        kernel[(n * num_cblk, splits)](
            grad_out, x, x if g is None else g, x if h is None else h, dx, pg, ph,
            n, c, p, sn, sc, sp, splits,
            HAS_G=g is not None, HAS_H=h is not None, BLOCK_C=block_c,
        )  # fmt: skip
        if g is not None:
            sum_partials(pg, grad_g.view(-1))
        if h is not None:
            sum_partials(ph, grad_h.view(-1))
    return dx, grad_g, grad_h
