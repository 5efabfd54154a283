"""timm's layout (``timm.layers.cbam``): ``CbamModule``, ``LightCbamModule`` and their halves."""

from torch import Tensor, nn

from fused_cbam.nn.core import (
    ChannelHalf,
    FusedBlock,
    SpatialHalf,
    odd_kernel,
    pointwise,
)
from fused_cbam.nn.inference_args import (
    forward_is,
    is_timm_class,
    plain_block,
    plain_conv_bn,
    plain_mlp,
)
from fused_cbam.nn.official import BasicConv


def make_divisible(v: float, divisor: int = 1) -> int:
    """timm's hidden size: ``v`` rounded to the nearest multiple of ``divisor``, at least ``divisor``."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def make_gate(gate_layer) -> nn.Module:
    """The gate activation for timm's ``gate_layer``: timm's own ``create_act_layer`` when timm is
    installed; without timm, "sigmoid", "hard_sigmoid" or an activation module class."""
    try:
        from timm.layers import create_act_layer
    except ImportError:
        create_act_layer = None
    if create_act_layer is not None:
        try:
            return create_act_layer(gate_layer)
        except KeyError:  # timm's own error is the bare name
            raise ValueError(f"gate_layer: expected an activation timm knows, got {gate_layer!r}") from None
    if not isinstance(gate_layer, str):
        return gate_layer()
    known = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "hardsigmoid": nn.Hardsigmoid}
    if gate_layer.lower() not in known:
        raise ValueError(f"gate_layer: expected one of {sorted(known)} (install timm for more), got {gate_layer!r}")
    return known[gate_layer.lower()]()


class ChannelAttn(ChannelHalf):
    """timm's ``ChannelAttn`` (``fc1``, ``act``, ``fc2``, ``gate``): called alone, x times
    the gate of the MLP's sum over the average and the max pool."""

    gate_part = "gate"

    def __init__(
        self,
        channels,
        rd_ratio=1.0 / 16,
        rd_channels=None,
        rd_divisor=1,
        act_layer=nn.ReLU,
        gate_layer="sigmoid",
        mlp_bias=False,
        device=None,
        dtype=None,
        *,
        backend="auto",
    ):
        super().__init__(backend)
        rd_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.gate = make_gate(gate_layer)

    @property
    def channels(self) -> int:
        return self.fc1.in_channels

    def shared_mlp(self, pooled: Tensor) -> Tensor:
        return pointwise(lambda t: self.fc2(self.act(self.fc1(t))), pooled)

    def pooled(self, avg: Tensor, mx: Tensor, x: Tensor) -> list[Tensor]:
        return [avg, mx]


class LightChannelAttn(ChannelAttn):
    """timm's ``LightChannelAttn``: one MLP pass over 0.5·avg + 0.5·max, and a sigmoid (timm
    does not use its ``gate`` there)."""

    gate_part = None

    def pooled(self, avg: Tensor, mx: Tensor, x: Tensor) -> list[Tensor]:
        return [0.5 * avg + 0.5 * mx]


class SpatialAttn(SpatialHalf):
    """timm's ``SpatialAttn`` (``conv``: conv + BN, ``gate``) over [mean, max]: called alone,
    x times its gate."""

    def __init__(self, kernel_size=7, gate_layer="sigmoid", device=None, dtype=None, *, backend="auto"):
        super().__init__(backend)
        k = odd_kernel(kernel_size)
        self.conv = BasicConv(
            len(self.pool_order), 1, k, padding=(k - 1) // 2, relu=False, bn_momentum=0.1, device=device, dtype=dtype
        )
        self.gate = make_gate(gate_layer)

    def logits(self, maps: Tensor) -> Tensor:
        return self.conv(maps)

    def to_gate(self, logits: Tensor) -> Tensor:
        return self.gate(logits)


class LightSpatialAttn(SpatialAttn):
    """timm's ``LightSpatialAttn``: its 1-channel conv over 0.5·mean + 0.5·max."""

    pool_order = ("mix",)


class _TimmCbam(FusedBlock):
    """timm's constructor and parameters; the light variant has its own ``half_classes``."""

    half_classes = (ChannelAttn, SpatialAttn)

    def __init__(
        self,
        channels,
        rd_ratio=1.0 / 16,
        rd_channels=None,
        rd_divisor=1,
        spatial_kernel_size=7,
        act_layer=nn.ReLU,
        gate_layer="sigmoid",
        mlp_bias=False,
        device=None,
        dtype=None,
        *,
        backend="auto",
    ):
        super().__init__(backend)
        channel_class, spatial_class = self.half_classes
        self.channel = channel_class(
            channels, rd_ratio, rd_channels, rd_divisor, act_layer, gate_layer, mlp_bias, device, dtype, backend=backend
        )
        # timm builds the light spatial half without gate_layer: a sigmoid.
        spatial_args = () if self.light else (gate_layer,)
        self.spatial = spatial_class(spatial_kernel_size, *spatial_args, device=device, dtype=dtype, backend=backend)

    @property
    def light(self) -> bool:
        """Whether this is the light variant (its halves are the light ones)."""
        return issubclass(self.half_classes[0], LightChannelAttn)

    def _halves(self) -> tuple[ChannelAttn, SpatialAttn]:
        return self.channel, self.spatial

    def _plain(self, training: bool = False) -> list | None:
        c, s = self.channel, self.spatial
        # The spatial conv module: ours, or timm's ConvNormAct that convert took over (conv, bn).
        known = forward_is(s.conv, BasicConv.forward) or is_timm_class(s.conv, "ConvNormAct")
        conv = plain_conv_bn(s.conv, s.pool_order, training) if known else None
        # The light variant: one MLP pass over 0.5·avg + 0.5·max, and timm's fixed sigmoid
        # channel gate (gate_layer is not used there).
        mlp = plain_mlp(c.fc1, c.act, c.fc2, "mix" if self.light else "sum")
        return plain_block(mlp, conv, s.gate, *(() if self.light else (c.gate,)))


class CbamModule(_TimmCbam):
    """Drop-in fused replacement of timm's ``CbamModule``: its constructor, ``state_dict`` keys
    (``channel.fc1``, ``channel.fc2``, ``spatial.conv.conv``, ``spatial.conv.bn``) and numerics
    ([mean, max] spatial maps, BN momentum 0.1, gates from ``gate_layer``)."""


class LightCbamModule(_TimmCbam):
    """Drop-in fused replacement of timm's ``LightCbamModule``: one MLP pass over
    0.5·mean + 0.5·max, a sigmoid channel gate (timm ignores ``gate_layer`` there), and a
    1-channel spatial conv over 0.5·mean + 0.5·max of the channel-gated x."""

    half_classes = (LightChannelAttn, LightSpatialAttn)
