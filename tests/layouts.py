"""CBAM layouts as users have them in their own code, written from the public descriptions of
each project (not copied from it): the unfused modules that fused_cbam.convert must replace.
Each namespace holds one project's classes under that project's names."""

import torch
from torch import nn

from official_cbam import OfficialCBAM


class Official:
    class CBAM(OfficialCBAM):
        """The official layout under the class name users' copies have."""


class Ultralytics:
    """``CBAM(c1, kernel_size=7)``: channel attention from the average pool only (a 1x1 conv
    C -> C with bias, sigmoid), then spatial attention (a 2 -> 1 conv over [mean, max], kernel 3
    or 7 with padding 1 or 3, no bias, no BN, sigmoid)."""

    class ChannelAttention(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Conv2d(channels, channels, 1, bias=True)
            self.act = nn.Sigmoid()

        def forward(self, x):
            return x * self.act(self.fc(self.pool(x)))

    class SpatialAttention(nn.Module):
        def __init__(self, kernel_size=7):
            super().__init__()
            assert kernel_size in (3, 7)
            self.cv1 = nn.Conv2d(2, 1, kernel_size, padding=3 if kernel_size == 7 else 1, bias=False)
            self.act = nn.Sigmoid()

        def forward(self, x):
            maps = torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]], dim=1)
            return x * self.act(self.cv1(maps))

    class CBAM(nn.Module):
        def __init__(self, c1, kernel_size=7):
            super().__init__()
            self.channel_attention = Ultralytics.ChannelAttention(c1)
            self.spatial_attention = Ultralytics.SpatialAttention(kernel_size)

        def forward(self, x):
            return self.spatial_attention(self.channel_attention(x))


class MMYolo:
    """``CBAM(in_channels, reduce_ratio=16, kernel_size=7, act_cfg=dict(type="ReLU"))``: a channel
    MLP of two 1x1 conv modules with bias (``act_cfg`` between them) applied to the average and
    the max pool, summed, sigmoid; a spatial conv module with bias, no BN and a sigmoid over
    [avg, max]. Activations are built as mmcv's ConvModule builds them, from torch.nn's class of
    that name, in place where the class takes it."""

    @staticmethod
    def activation(act_cfg):
        if act_cfg is None:
            return None
        kwargs = {key: value for key, value in act_cfg.items() if key != "type"}
        if act_cfg["type"] not in ("Sigmoid", "PReLU", "GELU", "Tanh"):
            kwargs.setdefault("inplace", True)
        return getattr(nn, act_cfg["type"])(**kwargs)

    class ConvModule(nn.Module):
        """A conv with bias, then its activation when it has one (no norm)."""

        def __init__(self, in_channels, out_channels, kernel_size, padding=0, act_cfg=None):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=True)
            if act_cfg is not None:
                self.activate = MMYolo.activation(act_cfg)

        def forward(self, x):
            x = self.conv(x)
            return self.activate(x) if hasattr(self, "activate") else x

    class ChannelAttention(nn.Module):
        def __init__(self, channels, reduce_ratio=16, act_cfg=None):
            super().__init__()
            hidden = int(channels / reduce_ratio)
            self.avg_pool = nn.AdaptiveAvgPool2d(1)
            self.max_pool = nn.AdaptiveMaxPool2d(1)
            self.fc = nn.Sequential(
                MMYolo.ConvModule(channels, hidden, 1, act_cfg=act_cfg), MMYolo.ConvModule(hidden, channels, 1)
            )
            self.sigmoid = nn.Sigmoid()

        def forward(self, x):
            return self.sigmoid(self.fc(self.avg_pool(x)) + self.fc(self.max_pool(x)))

    class SpatialAttention(nn.Module):
        def __init__(self, kernel_size=7):
            super().__init__()
            self.conv = MMYolo.ConvModule(2, 1, kernel_size, padding=kernel_size // 2, act_cfg={"type": "Sigmoid"})

        def forward(self, x):
            return self.conv(torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]], dim=1))

    class CBAM(nn.Module):
        def __init__(self, in_channels, reduce_ratio=16, kernel_size=7, act_cfg={"type": "ReLU"}):  # (as mmyolo)
            super().__init__()
            self.channel_attention = MMYolo.ChannelAttention(in_channels, reduce_ratio, act_cfg)
            self.spatial_attention = MMYolo.SpatialAttention(kernel_size)

        def forward(self, x):
            out = self.channel_attention(x) * x
            return self.spatial_attention(out) * out
