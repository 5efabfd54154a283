"""CBAM modules whose forward runs the fused operators.

``CBAM`` has the constructor, attribute names, ``state_dict`` keys and numerics of the official
CBAM code (Woo et al., ECCV 2018), so an official checkpoint loads with ``strict=True``.
"""

import torch
from torch import Tensor, nn

from fused_cbam import backends
from fused_cbam.ops import check_input


def fused_cbam_forward(
    x: Tensor, backend: str, channel_logits, spatial_logits, pool_order
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused CBAM core that every layout shares.

    ``channel_logits(avg, max) -> [N, C]`` is the layout's channel MLP; ``spatial_logits(maps)``
    maps the [N, 2, H, W] stack of spatial maps (in ``pool_order``, e.g. ("max", "mean")) to
    [N, 1, H, W] logits, or is None for a channel-only block. x is read three times and written
    once; nothing full-size but x is kept for backward. Returns the output and the two gates
    (the spatial one None for a channel-only block).
    """
    ops = backends.resolve(backend, x)
    avg, mx = ops.channel_pool(x)
    channel_gate = torch.sigmoid(channel_logits(avg, mx)).to(x.dtype)
    if spatial_logits is None:
        return ops.gate_apply(x, channel_gate, None), channel_gate, None
    s_mean, s_max = ops.spatial_pool(x, channel_gate)
    maps = {"mean": s_mean, "max": s_max}
    spatial_gate = torch.sigmoid(spatial_logits(torch.cat([maps[k] for k in pool_order], dim=1))).to(x.dtype)
    return ops.gate_apply(x, channel_gate, spatial_gate), channel_gate, spatial_gate


class GateInspection:
    """Lets a module hand back its last gates: set ``keep_gates = True`` and, after a forward,
    read ``last_channel_gate`` ([N, C]) and ``last_spatial_gate`` ([N, 1, H, W], sigmoid map;
    None for a channel-only block). Nothing is kept, and nothing costs, when it is False."""

    keep_gates: bool = False
    last_channel_gate: Tensor | None = None
    last_spatial_gate: Tensor | None = None

    def _keep(self, channel_gate: Tensor, spatial_gate: Tensor | None) -> None:
        if self.keep_gates:
            self.last_channel_gate = channel_gate.detach()
            self.last_spatial_gate = None if spatial_gate is None else spatial_gate.detach()


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class BasicConv(nn.Module):
    """The official code's conv (no bias) + optional BN + optional ReLU."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, relu=True, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class ChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max")):
        super().__init__()
        unknown = set(pool_types) - {"avg", "max"}
        if unknown or not pool_types:
            raise ValueError(f"pool_types: expected a non-empty subset of ('avg', 'max'), got {pool_types}")
        self.gate_channels = gate_channels
        self.pool_types = tuple(pool_types)
        hidden = gate_channels // reduction_ratio
        if hidden < 1:
            raise ValueError(
                f"reduction_ratio: gate_channels // reduction_ratio must be >= 1, got {gate_channels} // {reduction_ratio}"
            )
        self.mlp = nn.Sequential(
            Flatten(), nn.Linear(gate_channels, hidden), nn.ReLU(), nn.Linear(hidden, gate_channels)
        )

    def logits(self, avg: Tensor, mx: Tensor) -> Tensor:
        """Sum of the shared MLP over the pooled vectors, as one batched GEMM pair."""
        pooled = [{"avg": avg, "max": mx}[p] for p in self.pool_types]
        out = self.mlp(torch.cat(pooled, dim=0))
        return out.unflatten(0, (len(pooled), avg.shape[0])).sum(dim=0)


class SpatialGate(nn.Module):
    pool_order = ("max", "mean")  # the official code's order (the paper's text says mean, max)

    def __init__(self, kernel_size=7):
        super().__init__()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)


class CBAM(GateInspection, nn.Module):
    """Drop-in fused replacement of the official ``CBAM(gate_channels, reduction_ratio, pool_types, no_spatial)``."""

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), no_spatial=False, *, backend="auto"):
        super().__init__()
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend: expected one of {backends.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        channels = self.ChannelGate.gate_channels
        if x.shape[1] != channels:
            raise ValueError(f"x: expected {channels} channels (the module's gate_channels), got {x.shape[1]}")
        spatial = None if self.no_spatial else self.SpatialGate.spatial
        out, channel_gate, spatial_gate = fused_cbam_forward(
            x, self.backend, self.ChannelGate.logits, spatial, SpatialGate.pool_order
        )
        self._keep(channel_gate, spatial_gate)
        return out
