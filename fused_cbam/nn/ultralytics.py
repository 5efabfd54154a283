"""ultralytics' layout: ``CBAM(c1, kernel_size)`` and its halves."""

from torch import Tensor, nn

from fused_cbam.nn.core import ChannelHalf, FusedBlock, SpatialHalf, pointwise
from fused_cbam.nn.inference_args import is_pointwise, plain_block, plain_conv


class UltralyticsChannelAttention(ChannelHalf):
    """ultralytics' ``ChannelAttention(channels)`` (``fc``: a 1x1 conv C -> C with bias, ``act``)
    over the average pool only: called alone, x times its gate."""

    def __init__(self, channels, *, backend="auto"):
        super().__init__(backend)
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Sigmoid()

    @property
    def channels(self) -> int:
        return self.fc.in_channels

    gate_part = "act"

    def shared_mlp(self, pooled: Tensor) -> Tensor:
        return pointwise(self.fc, pooled)

    def pooled(self, avg: Tensor, mx: Tensor, x: Tensor) -> list[Tensor]:
        return [avg]


class UltralyticsSpatialAttention(SpatialHalf):
    """ultralytics' ``SpatialAttention(kernel_size=7)`` (``cv1``: 2 -> 1, kernel 3 or 7, no bias,
    no BN; ``act``) over [mean, max]: called alone, x times its gate."""

    def __init__(self, kernel_size=7, *, backend="auto"):
        super().__init__(backend)
        if kernel_size not in (3, 7):
            raise ValueError(f"kernel_size: expected 3 or 7, got {kernel_size}")
        self.cv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.act = nn.Sigmoid()

    def logits(self, maps: Tensor) -> Tensor:
        return self.cv1(maps)

    def to_gate(self, logits: Tensor) -> Tensor:
        return self.act(logits)


class UltralyticsCBAM(FusedBlock):
    """Drop-in fused replacement of ultralytics' ``CBAM(c1, kernel_size=7)``: channel attention
    from the average pool only (``channel_attention.fc``, a 1x1 conv C -> C with bias), spatial
    attention ``spatial_attention.cv1`` (2 -> 1, kernel 3 or 7, no bias, no BN) over [mean, max]."""

    half_classes = (UltralyticsChannelAttention, UltralyticsSpatialAttention)

    def __init__(self, c1, kernel_size=7, *, backend="auto"):
        super().__init__(backend)
        self.channel_attention = UltralyticsChannelAttention(c1, backend=backend)
        self.spatial_attention = UltralyticsSpatialAttention(kernel_size, backend=backend)

    def _halves(self) -> tuple[UltralyticsChannelAttention, UltralyticsSpatialAttention]:
        return self.channel_attention, self.spatial_attention

    def _plain(self, training: bool = False) -> list | None:
        ca, sa = self.channel_attention, self.spatial_attention
        mlp = [ca.fc.weight, ca.fc.bias, None, None, "avg"] if is_pointwise(ca.fc) else None
        return plain_block(mlp, plain_conv(sa.cv1, None, ("mean", "max"), training), ca.act, sa.act)
