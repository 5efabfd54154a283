"""The fused block's backward with one gradient of x for its three operators (any backend with
the two ``*_backward_add`` operators: C++ CPU, CUDA, Triton).

Through the registered operators, each of the three (channel_pool, spatial_pool, gate_apply)
returns a gradient of x of its own and autograd adds them: three |x|-sized allocations and two
additions. Here the gate's backward keeps its gradient of x in a holder shared by the block's
three autograd nodes instead of returning it; the spatial pooling's backward adds into it, and
the channel pooling's backward, which autograd runs last (its inputs' gradients depend on both
of the others), adds its share and returns the whole. The order is fixed by the data: the spatial
maps feed the spatial gate, and the channel gate feeds both the spatial pooling and the gate.

Eager only: torch.compile and torch.export trace the registered operators instead.
"""

import torch
from torch import Tensor

from fused_cbam._registrations import _refuse_double_backward


class GradHolder:
    """The operators of one namespace, and the block's gradient of x while its backward runs."""

    def __init__(self, ops):
        self.ops = ops
        self.grad_x: Tensor | None = None


class _ChannelPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, holder):
        avg, mx, argmax = holder.ops.channel_pool(x)
        ctx.save_for_backward(x, argmax)
        ctx.holder = holder
        return avg, mx

    @staticmethod
    def backward(ctx, grad_avg, grad_max):
        x, argmax = ctx.saved_tensors
        _refuse_double_backward(grad_avg, grad_max, x)
        ops, grad_x, ctx.holder.grad_x = ctx.holder.ops, ctx.holder.grad_x, None
        if grad_x is None:  # the gate's backward did not run (no gradient reached it)
            return ops.channel_pool_backward(grad_avg, grad_max, argmax, x), None
        ops.channel_pool_backward_add(grad_x, grad_avg, grad_max, argmax)
        return grad_x, None


class _SpatialPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, holder):
        mean, mx, argmax = holder.ops.spatial_pool(x, scale)
        ctx.save_for_backward(x, scale, argmax)
        ctx.holder = holder
        return mean, mx

    @staticmethod
    def backward(ctx, grad_mean, grad_max):
        x, scale, argmax = ctx.saved_tensors
        _refuse_double_backward(grad_mean, grad_max, x, scale)
        ops = ctx.holder.ops
        if ctx.holder.grad_x is None:
            grad_x, grad_scale = ops.spatial_pool_backward(grad_mean, grad_max, argmax, x, scale)
            return grad_x, grad_scale, None
        grad_scale = ops.spatial_pool_backward_add(ctx.holder.grad_x, grad_mean, grad_max, argmax, x, scale)
        return None, grad_scale, None


class _GateApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, channel_gate, spatial_gate, holder):
        ctx.save_for_backward(x, channel_gate, spatial_gate)
        ctx.holder = holder
        return holder.ops.gate_apply(x, channel_gate, spatial_gate)

    @staticmethod
    def backward(ctx, grad_out):
        x, channel_gate, spatial_gate = ctx.saved_tensors
        _refuse_double_backward(grad_out, x, channel_gate, spatial_gate)
        grad_x, grad_g, grad_h = ctx.holder.ops.gate_apply_backward(grad_out, x, channel_gate, spatial_gate)
        ctx.holder.grad_x = grad_x
        return None, grad_g if channel_gate is not None else None, grad_h if spatial_gate is not None else None, None


class OneGradBackend:
    """A backend's three calls for one block, sharing one gradient of x; ``ops`` is the
    backend's operator namespace (``torch.ops.fused_cbam`` or ``torch.ops.fused_cbam_triton``)."""

    def __init__(self, ops):
        self._holder = GradHolder(ops)

    def channel_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return _ChannelPool.apply(x, self._holder)

    def spatial_pool(self, x: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
        return _SpatialPool.apply(x, scale, self._holder)

    def gate_apply(self, x: Tensor, channel_gate: Tensor | None, spatial_gate: Tensor | None) -> Tensor:
        return _GateApply.apply(x, channel_gate, spatial_gate, self._holder)
