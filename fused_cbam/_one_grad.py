"""The fused block's backward with one gradient of x for its three operators (any backend with
the two ``*_backward_add`` operators: C++ CPU, CUDA, Triton).

Through the registered operators, each of the three (channel_pool, spatial_pool, gate_apply)
returns a gradient of x of its own and autograd adds them: three |x|-sized allocations and two
additions. Here one gradient is threaded through the block instead, along a carrier: a tensor of
x's shape with zero strides (one element, never read) that the channel pooling returns, the
spatial pooling takes and returns anew, and the gate takes. The gradient of x reaches each step
as the gradient of the carrier it returned: the gate's backward makes the one gradient of x, the
spatial pooling's backward adds its share into it and passes it on, and the channel pooling's
adds the last and hands it to x. Autograd itself carries the buffer, so this also traces under
torch.compile, where Inductor runs the two additions in place (no copy, no add kernel). The
carrier is not a view of x: Dynamo traces an autograd.Function's backward with its forward
outputs standing in for the gradients, and an addition into a view of x would then count as a
change of x.

The spatial pooling's share of the gradient, scale[n, c] * (grad_mean[n, p] / C + the max's
gradient at each pixel's arg-max channel), would take a pass that reads and writes the gradient
of x. Its backward adds only the max's share (an element per pixel) and reads x for the scale's
gradient; the mean's share is added by the channel pooling's backward in its own pass over the
gradient (8 -> 6 x-sized reads and writes for the block's backward). The two tensors that share
needs, the scale and grad_mean, travel the same way: as the gradients of two more carriers
([N, C] and [N, 1, H, W]) that the channel pooling returns and the spatial pooling takes.
"""

import torch
from torch import Tensor

from fused_cbam._layout import mean_and_max
from fused_cbam._registrations import _refuse_double_backward


def _carrier(x: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """A tensor of x's shape (or ``shape``) and dtype that is never read: one element, zero strides."""
    shape = x.shape if shape is None else shape
    return torch.empty_strided(shape, (0,) * len(shape), dtype=x.dtype, device=x.device)


def _zeros_for_none(grads, like: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """The small gradients of a pooling's two outputs, zeros for one that got none."""
    return [torch.zeros_like(like, dtype=dtype) if g is None else g for g in grads]


class _ChannelPool(torch.autograd.Function):
    """The channel pooling of x; also returns the carrier of the gradient of x and those of the
    spatial pooling's two messages, the scale and grad_mean of the mean's share it leaves here."""

    @staticmethod
    def forward(ctx, x, ops):
        avg, mx, argmax = ops.channel_pool(x)
        ctx.save_for_backward(x, argmax)
        ctx.ops = ops
        ctx.set_materialize_grads(False)  # no |x|-sized zeros for a carrier without gradient
        n, c, h, w = x.shape
        return avg, mx, _carrier(x), _carrier(x, (n, c)), _carrier(x, (n, 1, h, w))

    @staticmethod
    def backward(ctx, grad_avg, grad_max, grad_x, spatial_scale, spatial_grad_mean):
        x, argmax = ctx.saved_tensors
        _refuse_double_backward(grad_avg, grad_max, grad_x, spatial_scale, spatial_grad_mean, x)
        if grad_avg is None and grad_max is None and spatial_grad_mean is None:
            return grad_x, None
        grad_avg, grad_max = _zeros_for_none((grad_avg, grad_max), argmax, x.dtype)
        if grad_x is None:  # (the spatial pooling leaves its mean's share only in a given gradient)
            return ctx.ops.channel_pool_backward(grad_avg, grad_max, argmax, x), None
        ctx.ops.channel_pool_backward_add(grad_x, grad_avg, grad_max, argmax, spatial_grad_mean, spatial_scale)
        return grad_x, None


class _SpatialPool(torch.autograd.Function):
    """The spatial pooling of x times ``scale`` (its maps stacked, max first with ``max_first``);
    or, given the channel MLP's logits [K, N, C] instead, of x times the sigmoid gate made from
    them (``channel_gate``), returned as a third output: the backward then adds the gate's two
    gradients (this pooling's and the one the gate gets from gate_apply) in the gate's backward
    kernel."""

    @staticmethod
    def forward(ctx, x, carrier, scale_carrier, grad_mean_carrier, scale, logits, max_first, ops):
        gate = None if logits is None else ops.channel_gate(logits)
        scale = scale if gate is None else gate
        maps, argmax = ops.spatial_pool(x, scale, max_first)
        ctx.save_for_backward(x, scale, argmax)
        ctx.pools = None if logits is None else logits.shape[0]
        ctx.max_first = max_first
        ctx.ops = ops
        ctx.set_materialize_grads(False)
        return maps, _carrier(x), gate

    @staticmethod
    def backward(ctx, grad_maps, grad_x, grad_gate):
        x, scale, argmax = ctx.saved_tensors
        _refuse_double_backward(grad_maps, grad_x, grad_gate, x, scale)
        grad_scale = None
        messages = (None, None)  # the scale and grad_mean of the mean's share left to the channel pooling
        if grad_maps is not None:
            grad_mean, grad_max = mean_and_max(grad_maps, ctx.max_first)
            if grad_x is None:
                grad_x, grad_scale = ctx.ops.spatial_pool_backward(grad_mean, grad_max, argmax, x, scale)
            elif scale is None:
                grad_scale = ctx.ops.spatial_pool_backward_add(grad_x, grad_mean, grad_max, argmax, x, scale)
            else:
                grad_scale = ctx.ops.spatial_pool_backward_add(
                    grad_x, grad_mean, grad_max, argmax, x, scale, add_mean=False
                )
                messages = (scale, grad_mean)
            grad_scale = grad_scale if scale is not None else None
        if ctx.pools is None:
            return None, grad_x, *messages, grad_scale, None, None, None
        grads = [g for g in (grad_scale, grad_gate) if g is not None]
        grad_logits = None
        if grads:
            grad_logits = ctx.ops.channel_gate_backward(grads[0], grads[1] if len(grads) > 1 else None, scale, ctx.pools)
        return None, grad_x, *messages, None, grad_logits, None, None


class _GateApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, carrier, channel_gate, spatial_gate, ops):
        ctx.save_for_backward(x, channel_gate, spatial_gate)
        ctx.ops = ops
        return ops.gate_apply(x, channel_gate, spatial_gate)

    @staticmethod
    def backward(ctx, grad_out):
        x, channel_gate, spatial_gate = ctx.saved_tensors
        _refuse_double_backward(grad_out, x, channel_gate, spatial_gate)
        grad_x, grad_g, grad_h = ctx.ops.gate_apply_backward(grad_out, x, channel_gate, spatial_gate)
        grad_g = grad_g if channel_gate is not None else None
        return None, grad_x, grad_g, grad_h if spatial_gate is not None else None, None


class OneGradBackend:
    """The three calls of one block's forward on a backend (``ops``: its operator namespace,
    ``torch.ops.fused_cbam`` or ``torch.ops.fused_cbam_triton``), made afresh for each forward.

    They run in the block's order, channel_pool, spatial_maps (or ``gated_spatial_maps``, which
    also makes the channel gate, with ``fused_gate``), gate_apply, all on the same x; each after
    the first also takes the carrier that the one before returned, and the spatial pooling the
    channel pooling's two carriers of its messages.

    The gradient buffer is the gate backward's own output, which nothing else holds, so adding
    into it in place is safe. A pooling whose carrier gets no gradient (no loss reaches the gate)
    writes a fresh gradient of x instead: the poolings turn off autograd's zero-filling of
    missing gradients. Those zeros would be |x|-sized and NCHW, to be put in x's format first,
    and Dynamo, which traces a backward with the forward outputs as its gradients, would keep
    that conversion as a copy of every channels_last gradient.
    """

    def __init__(self, ops, fused_gate: bool = False):
        self._ops = ops
        self._fused_gate = fused_gate
        self._x: Tensor | None = None  # the block's x, as channel_pool received it
        self._carrier: Tensor | None = None  # what the last call returned to carry the gradient
        self._messages: tuple[Tensor, Tensor] | None = None  # channel_pool's carriers for spatial_maps

    def _carry(self, x: Tensor) -> Tensor:
        if x is not self._x:
            raise RuntimeError("OneGradBackend: each call after channel_pool takes the block's x")
        return self._carrier

    def channel_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._x = x
        avg, mx, self._carrier, *messages = _ChannelPool.apply(x, self._ops)
        self._messages = tuple(messages)
        return avg, mx

    def spatial_maps(self, x: Tensor, scale: Tensor | None, max_first: bool = False) -> Tensor:
        maps, self._carrier, _ = _SpatialPool.apply(x, self._carry(x), *self._messages, scale, None, max_first, self._ops)
        return maps

    @property
    def gated_spatial_maps(self):
        """``gated_spatial_maps(x, logits, max_first) -> (gate, maps)``: the sigmoid channel gate
        from the MLP's logits [K, N, C] of K pooled vectors, and the spatial maps of x times it;
        None where the backend leaves the gate to PyTorch."""
        return self._gated_spatial_maps if self._fused_gate else None

    def _gated_spatial_maps(self, x: Tensor, logits: Tensor, max_first: bool) -> tuple[Tensor, Tensor]:
        maps, self._carrier, gate = _SpatialPool.apply(x, self._carry(x), *self._messages, None, logits, max_first, self._ops)
        return gate, maps

    def gate_apply(self, x: Tensor, channel_gate: Tensor | None, spatial_gate: Tensor | None) -> Tensor:
        return _GateApply.apply(x, self._carry(x), channel_gate, spatial_gate, self._ops)
