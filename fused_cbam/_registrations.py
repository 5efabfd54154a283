"""Fake (shape-only) kernels and autograd formulas of the operators.

Every operator namespace that implements the fused_cbam operators (``fused_cbam`` for the
C++/CUDA kernels, ``fused_cbam_triton`` for the Triton ones) gets the same fake kernels, so
``torch.compile`` traces each of them, forward and backward, and ``opcheck`` passes. The forward
operators' autograd is here for Triton's; the C++ library registers its own (csrc/autograd.cpp),
so that gradients are right without Python too.
"""

import functools
import inspect

import torch
from torch import Tensor

from fused_cbam import reference
from fused_cbam._layout import empty_like_x, mean_and_max

_EMPTY = (0,)


def _fake_channel_pool(x):
    n, c = x.shape[:2]
    return x.new_empty(n, c), x.new_empty(n, c), x.new_empty(n, c, dtype=torch.int32)


def _fake_channel_pool_backward(grad_avg, grad_max, argmax, x):
    return empty_like_x(x)


def _fake_spatial_pool(x, scale, max_first=False):
    n, _, h, w = x.shape
    return x.new_empty(n, 2, h, w), x.new_empty(n, 1, h, w, dtype=torch.int32)


def _fake_spatial_pool_backward(grad_mean, grad_max, argmax, x, scale):
    grad_scale = x.new_empty(x.shape[:2]) if scale is not None else x.new_empty(_EMPTY)
    return empty_like_x(x), grad_scale


def _fake_gate_apply(x, channel_gate, spatial_gate):
    return empty_like_x(x)


def _fake_gate_apply_backward(grad_out, x, channel_gate, spatial_gate):
    n, c, h, w = x.shape
    grad_g = x.new_empty(n, c) if channel_gate is not None else x.new_empty(_EMPTY)
    grad_h = x.new_empty(n, 1, h, w) if spatial_gate is not None else x.new_empty(_EMPTY)
    return empty_like_x(x), grad_g, grad_h


def _fake_channel_gate(logits):
    return logits.new_empty(logits.shape[1:])


def _fake_channel_gate_backward(grad_gate, grad_gate_2, gate, pools):
    return gate.new_empty(pools, *gate.shape)


def _setup_channel_pool(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[2])


def _setup_spatial_pool(ctx, inputs, output):
    x, scale, max_first = inputs
    ctx.has_scale = scale is not None
    ctx.max_first = max_first
    ctx.save_for_backward(x, scale, output[1])


def _setup_gate_apply(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _setup_channel_gate(ctx, inputs, output):
    ctx.pools = inputs[0].shape[0]
    ctx.save_for_backward(output)


def _refuse_double_backward(*tensors) -> None:
    """The backward operators have no derivatives of their own: say so instead of returning
    gradients that silently lack their second-order terms."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "fused_cbam operators do not support double backward (create_graph=True); "
            "use backend='reference' for higher-order gradients"
        )


def _autograd(ops):
    """Backward formulas: the three training operators' and channel_gate's call the namespace's
    own backward operators, cbam_inference's recomputes the block."""

    def channel_pool_backward(ctx, grad_avg, grad_max, _grad_argmax):
        x, argmax = ctx.saved_tensors
        _refuse_double_backward(grad_avg, grad_max, x)
        return ops.channel_pool_backward(grad_avg, grad_max, argmax, x)

    def spatial_pool_backward(ctx, grad_maps, _grad_argmax):
        x, scale, argmax = ctx.saved_tensors
        _refuse_double_backward(grad_maps, x, scale)
        grad_mean, grad_max = mean_and_max(grad_maps, ctx.max_first)  # read in place
        grad_x, grad_scale = ops.spatial_pool_backward(grad_mean, grad_max, argmax, x, scale)
        return grad_x, grad_scale if ctx.has_scale else None, None

    def gate_apply_backward(ctx, grad_out):
        x, channel_gate, spatial_gate = ctx.saved_tensors
        _refuse_double_backward(grad_out, x, channel_gate, spatial_gate)
        grad_x, grad_g, grad_h = ops.gate_apply_backward(grad_out, x, channel_gate, spatial_gate)
        return (
            grad_x,
            grad_g if channel_gate is not None else None,
            grad_h if spatial_gate is not None else None,
        )

    def channel_gate_backward(ctx, grad_gate):
        (gate,) = ctx.saved_tensors
        _refuse_double_backward(grad_gate, gate)
        return ops.channel_gate_backward(grad_gate, None, gate, ctx.pools)

    return {
        "channel_pool": (channel_pool_backward, _setup_channel_pool),
        "spatial_pool": (spatial_pool_backward, _setup_spatial_pool),
        "gate_apply": (gate_apply_backward, _setup_gate_apply),
        "channel_gate": (channel_gate_backward, _setup_channel_gate),
        "cbam_inference": (_cbam_inference_backward, _setup_cbam_inference),
    }


def _fake_channel_pool_backward_add(grad_x, grad_avg, grad_max, argmax, spatial_grad_mean=None, spatial_scale=None):
    return None


def _fake_spatial_pool_backward_add(grad_x, grad_mean, grad_max, argmax, x, scale, add_mean=True):
    return x.new_empty(x.shape[:2]) if scale is not None else x.new_empty(_EMPTY)


def _fake_cbam_inference(
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight, conv_bias, bn_mean, bn_var, bn_weight,
    bn_bias, bn_eps, max_first,
):  # fmt: skip
    return empty_like_x(x)


def _fake_cbam_training(
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight, conv_bias, bn_mean, bn_var, bn_weight,
    bn_bias, bn_eps, max_first, bn_training, bn_momentum,
):  # fmt: skip
    return empty_like_x(x)


# Every operator's fake kernel; their parameters are the operators' arguments (``arguments``).
FAKES = {
    "channel_pool": _fake_channel_pool,
    "channel_pool_backward": _fake_channel_pool_backward,
    "channel_pool_backward_add": _fake_channel_pool_backward_add,
    "spatial_pool": _fake_spatial_pool,
    "spatial_pool_backward": _fake_spatial_pool_backward,
    "spatial_pool_backward_add": _fake_spatial_pool_backward_add,
    "gate_apply": _fake_gate_apply,
    "gate_apply_backward": _fake_gate_apply_backward,
    "channel_gate": _fake_channel_gate,
    "channel_gate_backward": _fake_channel_gate_backward,
    "cbam_inference": _fake_cbam_inference,
}
# The operators of the C++ library alone (device-agnostic C++ over the others: csrc/training.cpp).
LIBRARY_FAKES = {**FAKES, "cbam_training": _fake_cbam_training}


def arguments(name: str) -> list[str]:
    """The argument names of operator ``name`` as the package calls it: its fake kernel's."""
    return list(inspect.signature(LIBRARY_FAKES[name]).parameters)


def _setup_cbam_inference(ctx, inputs, output):
    ctx.arguments = [None if isinstance(a, Tensor) else a for a in inputs]
    ctx.save_for_backward(*[a if isinstance(a, Tensor) else None for a in inputs])


def _cbam_inference_backward(ctx, grad_out):
    """The block recomputed from its formula in plain PyTorch (``reference.cbam_inference``), and
    its gradients: the modules take this operator only where no gradient is needed, but a graph
    traced from a module in eval mode (``torch.jit.trace``) may be differentiated later. Under
    ``create_graph`` the recomputation hangs on the inputs' own graph, so higher derivatives work;
    through an alias of each (``view_as``), so that an argument passed twice, or computed from
    another, gets its own gradient and not the total one, which autograd would then add again."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [
            arg if t is None else t.view_as(t) if create_graph else t.detach().requires_grad_(wanted)
            for arg, t, wanted in zip(ctx.arguments, ctx.saved_tensors, ctx.needs_input_grad)
        ]
        wanted = [t for t, needed in zip(inputs, ctx.needs_input_grad) if needed]
        out = reference.cbam_inference(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph) if wanted else ())
    return tuple(next(grads) if needed else None for needed in ctx.needs_input_grad)


def _on_one_device(fake, operator):
    """``fake`` refusing a tensor argument on another device than x's (the first tensor's where
    there is no x), as the real kernels do, naming it as ``operator``'s schema does. Fake kernels
    also serve the Meta dispatch key, which wins over the CPU's: an x on the CPU with a meta gate
    got CPU outputs that nothing wrote."""
    names = [a.name for a in operator.default._schema.arguments]

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        named = {n: a for n, a in [*zip(names, args), *kwargs.items()] if isinstance(a, Tensor)}
        first = "x" if "x" in named else next(iter(named))
        device = named[first].device
        for name, t in named.items():
            if t.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} ({first}'s device), got one on {t.device}")
        return fake(*args, **kwargs)

    return checked


def register(namespace: str, library_autograd: bool = False) -> None:
    """Register fake kernels for every operator, and the forward operators' autograd. With
    ``library_autograd`` (the C++ library, which registers its own: csrc/autograd.cpp) only for
    the operators that have none: a library built before it had them all (a checkout pulled, not
    rebuilt) gets the Python autograd for those, rather than silently no gradients."""
    for name, fake in (LIBRARY_FAKES if library_autograd else FAKES).items():
        operator = getattr(getattr(torch.ops, namespace), name)
        torch.library.register_fake(f"{namespace}::{name}", _on_one_device(fake, operator))
    for name, (backward, setup_context) in _autograd(getattr(torch.ops, namespace)).items():
        qualified = f"{namespace}::{name}"
        if not (library_autograd and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Autograd")):
            torch.library.register_autograd(qualified, backward, setup_context=setup_context)
