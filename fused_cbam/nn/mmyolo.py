"""mmyolo's layout: ``CBAM(in_channels, reduce_ratio, kernel_size, act_cfg, init_cfg)`` and its halves."""

import copy
import types
from collections.abc import Mapping

from torch import Tensor, nn

from fused_cbam.nn.core import (
    ChannelHalf,
    FusedBlock,
    SpatialHalf,
    check_block_input,
    fused_channel_gate,
    fused_spatial_gate,
    odd_kernel,
    operators,
    pointwise,
)
from fused_cbam.nn.inference_args import attribute, forward_is, plain_block, plain_conv, plain_mlp

_RELU = types.MappingProxyType({"type": "ReLU"})  # mmyolo's default act_cfg, read-only
# Activations without an ``inplace`` argument, for which mmcv's ConvModule does not set it.
_NOT_IN_PLACE = ("Tanh", "PReLU", "Sigmoid", "HSigmoid", "Swish", "GELU")
# The activations mmcv registers under torch.nn's own class names.
_TORCH_ACTIVATIONS = ("ReLU", "LeakyReLU", "PReLU", "RReLU", "ReLU6", "ELU", "Sigmoid", "Tanh", "SiLU", "GELU")


def mmcv_activation(act_cfg: dict | None) -> nn.Module | None:
    """The activation mmcv's ``ConvModule`` builds from ``act_cfg`` (None for none), in place
    where ConvModule makes it so: built by mmcv when it is installed; without mmcv, the
    activations it registers under torch.nn's class names."""
    if act_cfg is None:
        return None
    if not isinstance(act_cfg, Mapping) or "type" not in act_cfg:
        raise ValueError(f"act_cfg: expected a dict with a 'type' (e.g. dict(type='ReLU')) or None, got {act_cfg!r}")
    cfg = dict(act_cfg)
    if cfg["type"] not in _NOT_IN_PLACE:
        cfg.setdefault("inplace", True)
    try:
        from mmcv.cnn import build_activation_layer
    except ImportError:
        build_activation_layer = None
    if build_activation_layer is not None:
        return build_activation_layer(cfg)
    name = cfg.pop("type")
    if name not in _TORCH_ACTIVATIONS:
        raise ValueError(f"act_cfg: type {name!r} needs mmcv installed; without it, one of {_TORCH_ACTIVATIONS}")
    return getattr(nn, name)(**cfg)


class ConvAct(nn.Module):
    """mmcv's ``ConvModule`` layout without a norm: ``conv`` (with bias), then ``activate``
    (Identity without an activation), initialised as ConvModule initialises (``init_weights``)."""

    _init_slope: float | None = None  # a LeakyReLU's negative slope, for the init

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, act_cfg=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=True)
        self.activate = mmcv_activation(act_cfg) or nn.Identity()
        if act_cfg is not None and act_cfg["type"] == "LeakyReLU":
            self._init_slope = act_cfg.get("negative_slope", 0.01)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming normal (fan-out, for the ReLU, or the LeakyReLU of ``act_cfg``), zero bias."""
        slope = self._init_slope
        nonlinearity = "relu" if slope is None else "leaky_relu"
        nn.init.kaiming_normal_(self.conv.weight, a=slope or 0, mode="fan_out", nonlinearity=nonlinearity)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.conv(x))


def _conv_then_activation(module: nn.Module) -> bool:
    """A conv module whose forward is its conv, then its activation (if any): ours, or mmcv's
    ``ConvModule`` (or a stand-in of that name) in its default order with no other part (no norm,
    no padding layer). The inference operator reads its parts instead of calling it."""
    if forward_is(module, ConvAct.forward):
        return True
    default_order = getattr(module, "order", ("conv", "norm", "act")) == ("conv", "norm", "act")
    parts = set(module._modules)
    return type(module).__name__ == "ConvModule" and default_order and "conv" in parts <= {"conv", "activate"}


class MMYoloChannelAttention(ChannelHalf):
    """mmyolo's ``ChannelAttention(channels, reduce_ratio=16, act_cfg=dict(type="ReLU"))``
    (``fc``: two conv modules, ``act_cfg`` between them; ``sigmoid``): called alone, its gate
    [N, C, 1, 1], as mmyolo's returns it (the block multiplies)."""

    def __init__(self, channels, reduce_ratio=16, act_cfg=_RELU, *, backend="auto"):
        super().__init__(backend)
        hidden = int(channels / reduce_ratio) if reduce_ratio > 0 else 0
        if hidden < 1:
            raise ValueError(
                f"reduce_ratio: expected a positive ratio with int(channels / reduce_ratio) >= 1, "
                f"got {channels} / {reduce_ratio}"
            )
        self.fc = nn.Sequential(ConvAct(channels, hidden, 1, act_cfg=act_cfg), ConvAct(hidden, channels, 1))
        self.sigmoid = nn.Sigmoid()

    @property
    def channels(self) -> int:
        return self.fc[0].conv.in_channels

    gate_part = "sigmoid"

    def shared_mlp(self, pooled: Tensor) -> Tensor:
        return pointwise(self.fc, pooled)

    def pooled(self, avg: Tensor, mx: Tensor, x: Tensor) -> list[Tensor]:
        return [avg, mx]

    def forward(self, x: Tensor) -> Tensor:
        check_block_input(x, self.channels)
        return fused_channel_gate(operators(self, x), x, self)[:, :, None, None]


class MMYoloSpatialAttention(SpatialHalf):
    """mmyolo's ``SpatialAttention(kernel_size=7)`` (``conv``: a conv module with bias and its
    sigmoid) over [mean, max]: called alone, its gate [N, 1, H, W], as mmyolo's returns it."""

    def __init__(self, kernel_size=7, *, backend="auto"):
        super().__init__(backend)
        k = odd_kernel(kernel_size)
        self.conv = ConvAct(2, 1, k, k // 2, act_cfg={"type": "Sigmoid"})

    def logits(self, maps: Tensor) -> Tensor:
        return self.conv.conv(maps)

    def to_gate(self, logits: Tensor) -> Tensor:
        activate = getattr(self.conv, "activate", None)  # (mmcv's ConvModule has none without one)
        return logits if activate is None else activate(logits)

    def forward(self, x: Tensor) -> Tensor:
        check_block_input(x)
        return fused_spatial_gate(operators(self, x), x, None, self)


class MMYoloCBAM(FusedBlock):
    """Drop-in fused replacement of mmyolo's ``CBAM(in_channels, reduce_ratio=16, kernel_size=7,
    act_cfg=dict(type="ReLU"), init_cfg=None)``: a channel MLP of 1x1 conv modules with bias
    (``channel_attention.fc.{0,1}.conv``, ``act_cfg`` between them) and a sigmoid, a spatial conv
    with bias and no BN (``spatial_attention.conv.conv``) and a sigmoid over [avg, max]."""

    half_classes = (MMYoloChannelAttention, MMYoloSpatialAttention)
    init_cfg = None  # (also for blocks pickled before they took it)
    is_init = False

    def __init__(
        self, in_channels, reduce_ratio=16, kernel_size=7, act_cfg=_RELU, init_cfg=None, *, backend="auto"
    ):
        super().__init__(backend)
        self.channel_attention = MMYoloChannelAttention(in_channels, reduce_ratio, act_cfg, backend=backend)
        self.spatial_attention = MMYoloSpatialAttention(kernel_size, backend=backend)
        self.init_cfg = copy.deepcopy(init_cfg)

    def init_weights(self) -> None:
        """What mmengine's ``BaseModule.init_weights`` does for mmyolo's CBAM (mmengine's runner
        calls it through the model's own), once: ``init_cfg``'s initialisers (mmengine needed),
        then the children's own ``init_weights``, of which mmyolo's has one, the spatial conv
        module's (mmcv's ConvModule initialises its conv again; the MLP's conv modules sit in a
        Sequential, which has none), then a "Pretrained" ``init_cfg`` last."""
        if self.is_init:
            return
        configs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        configs = [config for config in configs if config is not None]
        if configs:
            try:
                from mmengine.model import initialize
            except ImportError:
                raise ImportError("MMYoloCBAM.init_weights: init_cfg needs mmengine (pip install mmengine)") from None
        others = [config for config in configs if config["type"] != "Pretrained"]
        if others:
            initialize(self, others)
        conv_init = getattr(self.spatial_attention.conv, "init_weights", None)  # (a copy's may have none)
        if conv_init is not None:
            conv_init()
        pretrained = [config for config in configs if config["type"] == "Pretrained"]
        if pretrained:
            initialize(self, pretrained)
        self.is_init = True

    def _halves(self) -> tuple[MMYoloChannelAttention, MMYoloSpatialAttention]:
        return self.channel_attention, self.spatial_attention

    def _plain(self, training: bool = False) -> list | None:
        fc = self.channel_attention.fc
        conv = self.spatial_attention.conv
        if type(fc) is not nn.Sequential or len(fc) != 2:
            return None
        fc1, fc2 = fc._modules.values()  # (Sequential's indexing is slow, and this runs every call)
        if not all(map(_conv_then_activation, (fc1, fc2, conv))):
            return None
        # mmcv's ConvModule has no ``activate`` without an activation
        if type(attribute(fc2, "activate")) not in (nn.Identity, type(None)):
            return None
        mlp = plain_mlp(fc1.conv, attribute(fc1, "activate"), fc2.conv)
        activate = attribute(conv, "activate")
        return plain_block(mlp, plain_conv(conv.conv, None, ("mean", "max"), training), self.channel_attention.sigmoid, activate)
