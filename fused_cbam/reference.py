"""Pure-PyTorch reference: the ground truth of every test and the ``"reference"`` backend.

Written to be obviously correct, never to be fast. Float16/bfloat16 inputs are pooled and
gated in float32 and rounded once at the end, which is also what the fused kernels do, so
ties and maxima agree exactly across backends. The channel gate rounds the sum of its logits
first, then its sigmoid, as the layouts' ``sigmoid(a + b)`` in x's dtype does.

Gradient of a max: the whole gradient goes to one element, the lowest index among the tied
maxima (the first position ``h * W + w`` for channel pooling, the lowest channel for spatial
pooling), as ``torch.max(dim)`` does. A NaN is the maximum wherever it appears, and the first
NaN receives the gradient.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_cbam import _autocast


@torch.fx.wrap  # under FX symbolic tracing the dtype is known only when the graph runs
def _opmath(t: Tensor) -> Tensor:
    """The dtype arithmetic is carried out in: float32 for 16-bit floats, else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _first_max(t: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """Max along ``dim``; the gradient flows to the lowest index of the maximum (NaN first)."""
    return t.max(dim=dim, keepdim=keepdim).values


def channel_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max of each (n, c) plane over H x W: two [N, C] tensors in x's dtype."""
    planes = _opmath(x).flatten(2)
    return planes.mean(dim=2).to(x.dtype), _first_max(planes, dim=2).to(x.dtype)


def spatial_pool(x: Tensor, channel_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and max over C of ``x * channel_scale[:, :, None, None]``: two [N, 1, H, W] tensors."""
    y = _opmath(x)
    if channel_scale is not None:
        y = y * _opmath(channel_scale)[:, :, None, None]
    return y.mean(dim=1, keepdim=True).to(x.dtype), _first_max(y, dim=1, keepdim=True).to(x.dtype)


def spatial_maps(x: Tensor, channel_scale: Tensor | None = None, max_first: bool = False) -> Tensor:
    """``spatial_pool``'s mean and max stacked [N, 2, H, W], the max first with ``max_first``."""
    mean, mx = spatial_pool(x, channel_scale)
    return _autocast.cat([mx, mean] if max_first else [mean, mx], dim=1)


def gate_apply(x: Tensor, channel_gate: Tensor | None, spatial_gate: Tensor | None) -> Tensor:
    """``x * channel_gate[n, c] * spatial_gate[n, 0, h, w]``, either gate optional."""
    out = _opmath(x)
    if channel_gate is not None:
        out = out * _opmath(channel_gate)[:, :, None, None]
    if spatial_gate is not None:
        out = out * _opmath(spatial_gate)
    return out.to(x.dtype)


def channel_gate(logits: Tensor) -> Tensor:
    """``sigmoid(logits.sum(0))``: the channel gate [N, C] from the MLP's logits of each pooled
    vector, stacked [K, N, C], as the layouts compute it: the sum (in float32) rounded to the
    logits' dtype (also under CUDA autocast, which would sum in float32), then the sigmoid,
    rounded again."""
    return torch.sigmoid(logits.sum(dim=0, dtype=logits.dtype))


def cbam_inference(
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight, conv_bias,
    bn_mean, bn_var, bn_weight, bn_bias, bn_eps, max_first,
) -> Tensor:  # fmt: skip
    """The formula of the ``cbam_inference`` operator (its schema in csrc/ops.cpp), all in
    x's opmath dtype, every parameter cast to it as the operators cast them: the operators round
    the pools and maps to x's dtype where the modules do; this does not (its use is the
    operator's backward, which recomputes the block)."""
    y = _opmath(x)
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias = (
        None if t is None else t.to(y.dtype)
        for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias)
    )

    def mlp(v: Tensor) -> Tensor:
        hidden = F.linear(v, fc1_weight.flatten(1), fc1_bias)
        if fc2_weight is None:  # fc1 alone gives the logits
            return hidden
        return F.linear(torch.relu(hidden), fc2_weight.flatten(1), fc2_bias)

    # The pools and the gate of this module, on y already in opmath (so nothing is rounded)
    avg, mx = channel_pool(y)
    logits = {"avg": lambda: mlp(avg), "sum": lambda: mlp(avg) + mlp(mx), "mix": lambda: mlp(0.5 * avg + 0.5 * mx)}
    channel_gate = torch.sigmoid(logits[pooling]())
    maps = spatial_maps(y, channel_gate, max_first)
    if conv_weight.shape[1] == 1:
        maps = 0.5 * maps[:, :1] + 0.5 * maps[:, 1:]
    u = F.conv2d(maps, conv_weight, conv_bias, padding=conv_weight.shape[-1] // 2)
    if bn_mean is not None:
        u = (u - bn_mean) * torch.rsqrt(bn_var + bn_eps)
        u = u if bn_weight is None else u * bn_weight
        u = u if bn_bias is None else u + bn_bias
    return gate_apply(y, channel_gate, torch.sigmoid(u)).to(x.dtype)
