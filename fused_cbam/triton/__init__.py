"""Triton implementation of the fused_cbam operators, in the namespace ``fused_cbam_triton``.

Importing this package registers ``torch.ops.fused_cbam_triton.<op>`` for the operators of
``csrc/ops.cpp`` (same names, schemas and semantics as ``torch.ops.fused_cbam.<op>``), with the
fake kernels and autograd formulas of ``fused_cbam._registrations`` shared by every namespace, so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work on them.

How this path differs from the C++/CUDA one:

- dtypes: float16, bfloat16 and float32 only (all math in float32, rounded once to x's dtype;
  the channel gate's logit sum rounded before its sigmoid, as the layouts round it); float64
  raises TypeError.
- devices: CUDA tensors; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set
  before this package is imported), which is how CI tests it without a GPU.
- block sizes and warps are autotuned per (N, C, P, dtype, memory format) on first use, which
  costs time once per shape; under the interpreter there is a single fixed configuration.
  Different configurations sum in a different order, so results may differ across shapes or
  machines by float32 rounding (never in max/argmax, which are exact).
- long reductions are split over several programs when N * C alone would not fill the GPU;
  the float32 partial sums are added by a second launch in a fixed order. No atomics:
  the backward is deterministic for a given configuration.
- an x without channels or pixels (C == 0 or H * W == 0) raises ValueError, as in C++.

Memory format: x may be NCHW-contiguous or channels_last; outputs shaped like x follow
``_layout.empty_like_x`` (channels_last iff x is channels_last-contiguous and not contiguous).
A channels_last x is read in place; any other layout is made contiguous first.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _registrations
from . import channel_gate as _channel_gate
from . import channel_pool as _channel_pool
from . import gate_apply as _gate_apply
from . import inference as _inference
from . import spatial_pool as _spatial_pool

NAMESPACE = "fused_cbam_triton"
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def _operator(name: str, mutates_args: tuple[str, ...] = ()):
    """Defines ``NAMESPACE::name`` with the schema of the decorated function's annotations and the
    function as its kernel on every device. Its tag lets torch.compile hand the kernels its own
    tensors, in any layout, instead of copies in eager's stride order (see csrc/ops.cpp). Not
    ``torch.library.custom_op``, whose wrapper cost 7.2 µs a call on this project's CPU machine
    against 2.3 µs for the same empty kernel defined so, and a training step makes six calls a
    block."""

    def define(kernel):
        schema = torch.library.infer_schema(kernel, mutates_args=mutates_args)
        _LIBRARY.define(name + schema, tags=(torch.Tag.flexible_layout,))
        _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
        return kernel

    return define


@_operator("channel_pool")
def _channel_pool_op(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _channel_pool.channel_pool(x)


@_operator("channel_pool_backward")
def _channel_pool_backward_op(grad_avg: Tensor, grad_max: Tensor, argmax: Tensor, x: Tensor) -> Tensor:
    return _channel_pool.channel_pool_backward(grad_avg, grad_max, argmax, x)


@_operator("channel_pool_backward_add", mutates_args=("grad_x",))
def _channel_pool_backward_add_op(
    grad_x: Tensor, grad_avg: Tensor, grad_max: Tensor, argmax: Tensor,
    spatial_grad_mean: Optional[Tensor] = None, spatial_scale: Optional[Tensor] = None,
) -> None:  # fmt: skip
    _channel_pool.channel_pool_backward_add(grad_x, grad_avg, grad_max, argmax, spatial_grad_mean, spatial_scale)


@_operator("spatial_pool")
def _spatial_pool_op(x: Tensor, scale: Optional[Tensor], max_first: bool = False) -> tuple[Tensor, Tensor]:
    return _spatial_pool.spatial_pool(x, scale, max_first)


@_operator("spatial_pool_backward")
def _spatial_pool_backward_op(
    grad_mean: Tensor, grad_max: Tensor, argmax: Tensor, x: Tensor, scale: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    return _spatial_pool.spatial_pool_backward(grad_mean, grad_max, argmax, x, scale)


@_operator("spatial_pool_backward_add", mutates_args=("grad_x",))
def _spatial_pool_backward_add_op(
    grad_x: Tensor, grad_mean: Tensor, grad_max: Tensor, argmax: Tensor, x: Tensor, scale: Optional[Tensor],
    add_mean: bool = True,
) -> Tensor:  # fmt: skip
    return _spatial_pool.spatial_pool_backward_add(grad_x, grad_mean, grad_max, argmax, x, scale, add_mean)


@_operator("gate_apply")
def _gate_apply_op(x: Tensor, channel_gate: Optional[Tensor], spatial_gate: Optional[Tensor]) -> Tensor:
    return _gate_apply.gate_apply(x, channel_gate, spatial_gate)


@_operator("gate_apply_backward")
def _gate_apply_backward_op(
    grad_out: Tensor, x: Tensor, channel_gate: Optional[Tensor], spatial_gate: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    return _gate_apply.gate_apply_backward(grad_out, x, channel_gate, spatial_gate)


@_operator("channel_gate")
def _channel_gate_op(logits: Tensor) -> Tensor:
    return _channel_gate.channel_gate(logits)


@_operator("channel_gate_backward")
def _channel_gate_backward_op(grad_gate: Tensor, grad_gate_2: Optional[Tensor], gate: Tensor, pools: int) -> Tensor:
    return _channel_gate.channel_gate_backward(grad_gate, grad_gate_2, gate, pools)


@_operator("cbam_inference")
def _cbam_inference_op(
    x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor],
    fc2_bias: Optional[Tensor], pooling: str, conv_weight: Tensor, conv_bias: Optional[Tensor],
    bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    bn_eps: float, max_first: bool,
) -> Tensor:  # fmt: skip
    return _inference.cbam_inference(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight, conv_bias,
        bn_mean, bn_var, bn_weight, bn_bias, bn_eps, max_first,
    )  # fmt: skip


_registrations.register(NAMESPACE)
