"""The channel gate from the MLP's logits of K pooled vectors [K, N, C]: gate = sigmoid of their
sum, and its backward, which writes (grad_gate + grad_gate_2) * gate * (1 - gate) into each of
the K rows of the logits' gradient. One elementwise launch each over the M = N * C gates (the
forward is ``sum_rows_kernel``, which also adds split reductions' partials), float32 math; the
sum rounded to the logits' dtype before the sigmoid, as the layouts' ``logits.sum(0)`` rounds it."""

import torch
import triton
import triton.language as tl

from ._common import FINALIZE_BLOCK, cast_to, check_device, check_dtype, check_like, device_guard, sum_rows_kernel


@triton.jit
def _gate_backward_kernel(
    grad_ptr, grad_2_ptr, gate_ptr, grad_logits_ptr, K, M, HAS_GRAD_2: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_2:
        g += tl.load(grad_2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = cast_to(g * (1.0 - s) * s, grad_logits_ptr)
    ptrs = grad_logits_ptr + offs
    for _ in range(0, K):
        tl.store(ptrs, d, mask=mask)
        ptrs += M


def _check_floating(t: torch.Tensor, name: str, op: str) -> None:
    where = f"fused_cbam_triton::{op}: {name}"
    check_dtype(t, where)
    check_device(t, where)


def _grid(m: int):
    return (triton.cdiv(m, FINALIZE_BLOCK),)


def channel_gate(logits: torch.Tensor) -> torch.Tensor:
    op = "channel_gate"
    if logits.dim() != 3:
        raise ValueError(
            f"fused_cbam_triton::{op}: logits must be 3-D [K, N, C] (the logits of K pooled vectors), "
            f"got shape {tuple(logits.shape)}"
        )
    _check_floating(logits, "logits", op)
    k, n, c = logits.shape
    if k == 0 or c == 0:
        raise ValueError(
            f"fused_cbam_triton::{op}: logits must have at least one pooled vector (K >= 1) and one channel, "
            f"got shape {tuple(logits.shape)}"
        )
    logits = logits.contiguous()
    gate = logits.new_empty(n, c)
    if gate.numel():
        with device_guard(logits):
            sum_rows_kernel[_grid(gate.numel())](logits, gate, gate.numel(), k, SIGMOID=True, BLOCK=FINALIZE_BLOCK)
    return gate


def channel_gate_backward(grad_gate, grad_gate_2, gate, pools: int) -> torch.Tensor:
    op = "channel_gate_backward"
    if gate.dim() != 2 or gate.shape[1] == 0:
        raise ValueError(f"fused_cbam_triton::{op}: gate must be [N, C] with at least one channel, got shape {tuple(gate.shape)}")
    _check_floating(gate, "gate", op)
    if pools < 1:
        raise ValueError(f"fused_cbam_triton::{op}: pools must be at least 1, got {pools}")
    check_like(grad_gate, gate, gate.shape, "grad_gate", op)
    if grad_gate_2 is not None:
        check_like(grad_gate_2, gate, gate.shape, "grad_gate_2", op)
        grad_gate_2 = grad_gate_2.contiguous()
    gate, grad_gate = gate.contiguous(), grad_gate.contiguous()
    grad_logits = gate.new_empty(pools, *gate.shape)
    m = gate.numel()
    if m:
        with device_guard(gate):
            _gate_backward_kernel[_grid(m)](
                grad_gate, grad_gate if grad_gate_2 is None else grad_gate_2, gate, grad_logits, pools, m,
                HAS_GRAD_2=grad_gate_2 is not None, BLOCK=FINALIZE_BLOCK,
            )  # fmt: skip
    return grad_logits
