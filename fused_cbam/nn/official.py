"""The official CBAM layout (Woo et al., ECCV 2018): ``CBAM``, ``ChannelGate``, ``SpatialGate``."""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_cbam.nn.core import ChannelHalf, FusedBlock, SpatialHalf, odd_kernel
from fused_cbam.nn.inference_args import (
    forward_is,
    plain_block,
    plain_conv_bn,
    plain_mlp,
)


def _lp_pool(x: Tensor) -> Tensor:
    """L2 norm over H x W, as the official code computes it (``F.lp_pool2d`` with p = 2)."""
    return F.lp_pool2d(x, 2, x.shape[2:]).flatten(1)


def _lse_pool(x: Tensor) -> Tensor:
    """Log-sum-exp over H x W."""
    return torch.logsumexp(x.flatten(2), dim=2)


# Pool types computed in plain PyTorch from x (an extra read of x each); avg and max are fused.
_REFERENCE_POOLS = {"lp": _lp_pool, "lse": _lse_pool}
_warned_reference_pools = False


def _warn_reference_pools(pool_types) -> None:
    global _warned_reference_pools
    if not _warned_reference_pools:
        _warned_reference_pools = True
        warnings.warn(
            f"fused_cbam.nn.ChannelGate: pool_types {tuple(pool_types)} include 'lp'/'lse', which are pooled in "
            "plain PyTorch (an extra read of x each); 'avg' and 'max' stay fused",
            stacklevel=4,
        )


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)  # (the official code's x.view(x.size(0), -1) fails on an empty batch)


def _official_flatten(self, x):  # the official code's Flatten.forward, which copies match
    return x.view(x.size(0), -1)


class BasicConv(nn.Module):
    """The official code's ``BasicConv``: a conv, then an optional BN and ReLU (``bn_momentum``,
    ``device`` and ``dtype`` for timm's ConvNormAct, which it also stands for)."""

    def __init__(
        self,
        in_planes,
        out_planes,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        relu=True,
        bn=True,
        bias=False,
        *,
        bn_momentum=0.01,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.out_channels = out_planes
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, dilation, groups, bias, **factory)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=bn_momentum, affine=True, **factory) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class ChannelGate(ChannelHalf):
    """The official ``ChannelGate(gate_channels, reduction_ratio, pool_types)``: called alone,
    x times the sigmoid of the MLP summed over the pools."""

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), *, backend="auto"):
        super().__init__(backend)
        known = ("avg", "max", *_REFERENCE_POOLS)
        if not pool_types or set(pool_types) - set(known):
            raise ValueError(f"pool_types: expected a non-empty subset of {known}, got {pool_types}")
        if set(pool_types) & set(_REFERENCE_POOLS):
            _warn_reference_pools(pool_types)
        self.gate_channels = gate_channels
        self.pool_types = tuple(pool_types)
        hidden = gate_channels // reduction_ratio if reduction_ratio > 0 else 0
        if hidden < 1:
            raise ValueError(
                f"reduction_ratio: expected a positive ratio with gate_channels // reduction_ratio >= 1, "
                f"got {gate_channels} // {reduction_ratio}"
            )
        self.mlp = nn.Sequential(
            Flatten(), nn.Linear(gate_channels, hidden), nn.ReLU(), nn.Linear(hidden, gate_channels)
        )

    @property
    def channels(self) -> int:
        return self.gate_channels

    def shared_mlp(self, pooled: Tensor) -> Tensor:
        return self.mlp(pooled)

    def pooled(self, avg: Tensor, mx: Tensor, x: Tensor) -> list[Tensor]:
        """The pool types' vectors; x is pooled in plain PyTorch for those that are not fused
        ("lp", "lse")."""
        fused = {"avg": avg, "max": mx}
        return [fused[p] if p in fused else _REFERENCE_POOLS[p](x).to(avg.dtype) for p in self.pool_types]


class SpatialGate(SpatialHalf):
    """The official ``SpatialGate()``: called alone, x times the sigmoid of its conv (with BN)
    over [max, mean]."""

    pool_order = ("max", "mean")  # the official code's order (the paper's text says mean, max)

    def __init__(self, kernel_size=7, *, backend="auto"):
        super().__init__(backend)
        k = odd_kernel(kernel_size)
        self.spatial = BasicConv(2, 1, k, stride=1, padding=(k - 1) // 2, relu=False)

    def logits(self, maps: Tensor) -> Tensor:
        return self.spatial(maps)


class CBAM(FusedBlock):
    """Drop-in fused replacement of the official
    ``CBAM(gate_channels, reduction_ratio, pool_types, no_spatial)``.

    ``pool_types`` may also hold "lp" (L2 norm over H x W) and "lse" (log-sum-exp over H x W),
    which are pooled in plain PyTorch (one warning per process says so).
    """

    half_classes = (ChannelGate, SpatialGate)

    def __init__(
        self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), no_spatial=False, *, backend="auto"
    ):
        super().__init__(backend)
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types, backend=backend)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate(backend=backend)

    def _halves(self) -> tuple[ChannelGate, SpatialGate | None]:
        return self.ChannelGate, None if self.no_spatial else self.SpatialGate

    def _plain(self, training: bool = False) -> list | None:
        pools = sorted(self.ChannelGate.pool_types)
        if self.no_spatial or pools not in (["avg"], ["avg", "max"]):
            return None
        mlp, spatial = self.ChannelGate.mlp, self.SpatialGate.spatial
        # A Sequential of a flatten (ours, the official code's or torch's), Linear, ReLU, Linear;
        # the spatial conv module the official BasicConv (or a copy), whose parts it reads.
        if type(mlp) is not nn.Sequential or len(mlp) != 4 or not forward_is(spatial, BasicConv.forward):
            return None
        flatten, fc1, act, fc2 = mlp._modules.values()  # (Sequential's indexing is slow, and this runs every call)
        torch_flatten = type(flatten) is nn.Flatten and (flatten.start_dim, flatten.end_dim) == (1, -1)
        if not (torch_flatten or forward_is(flatten, Flatten.forward) or forward_is(flatten, _official_flatten)):
            return None
        parts = plain_mlp(fc1, act, fc2, "sum" if "max" in pools else "avg")
        return plain_block(parts, plain_conv_bn(spatial, SpatialGate.pool_order, training))
