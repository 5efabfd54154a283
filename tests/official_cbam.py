"""The official CBAM layout (Woo et al., ECCV 2018), written from its public description: the
unfused model that fused_cbam.nn.CBAM must reproduce, parameter for parameter."""

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, padding, relu=False):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True)
        self.relu = nn.ReLU() if relu else None

    # The official code's forward, as users' copies have it: fused_cbam's inference operator
    # reads this module's parts when its forward is this one (tests/test_layouts.py checks both).
    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class ChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max")):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = pool_types

    def forward(self, x):
        total = None
        for pool_type in self.pool_types:
            size = (x.size(2), x.size(3))
            if pool_type == "avg":
                pooled = F.avg_pool2d(x, size, stride=size)
            elif pool_type == "max":
                pooled = F.max_pool2d(x, size, stride=size)
            elif pool_type == "lp":  # L2 norm over H x W
                pooled = F.lp_pool2d(x, 2, size, stride=size)
            else:  # "lse": log-sum-exp over H x W, shifted by the max
                flat = x.flatten(2)
                top = flat.max(dim=2, keepdim=True)[0]
                pooled = top + (flat - top).exp().sum(dim=2, keepdim=True).log()
            att = self.mlp(pooled)
            total = att if total is None else total + att
        return x * torch.sigmoid(total)[:, :, None, None]


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = BasicConv(2, 1, 7, padding=3)

    def forward(self, x):
        pooled = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class OfficialCBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), no_spatial=False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x):
        out = self.ChannelGate(x)
        return out if self.no_spatial else self.SpatialGate(out)
