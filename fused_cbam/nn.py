"""CBAM modules whose forward runs the fused operators, one for each CBAM layout users have.

Each module has the constructor, attribute names, ``state_dict`` keys and numerics of the code it
replaces, so that code's checkpoints load with ``strict=True``:

- ``CBAM``: the official code (Woo et al., ECCV 2018);
- ``CbamModule`` and ``LightCbamModule``: timm's ``timm.layers.cbam`` modules;
- ``UltralyticsCBAM``: ultralytics' ``CBAM(c1, kernel_size)``;
- ``MMYoloCBAM``: mmyolo's ``CBAM(in_channels, reduce_ratio, kernel_size, act_cfg, init_cfg)``.

The layouts differ only in the small parts (the channel MLP, the spatial conv, the order of the
spatial maps, the gate functions). Each block holds them in its two halves, a channel half and a
spatial half under that layout's attribute names, and hands both to ``fused_cbam_forward``, the
fused core they all share; each half can also be called alone, as in the code it replaces.
Where nothing needs a gradient (eval mode under ``no_grad`` or ``inference_mode``), the backend
computes a whole block in one operator instead, ``cbam_inference`` (C++ CPU, CUDA or Triton),
fed from each module's ``_plain()`` (None when the module, as configured, is not one that
operator computes). ``fused_cbam.convert`` puts the modules in place of a model's own modules.
"""

import copy
import types
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_cbam import backends
from fused_cbam.ops import check_input


def fused_cbam_forward(x: Tensor, ops, channel, spatial) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fused CBAM core that every layout shares: ``x * channel gate * spatial gate``.

    ``ops`` are the backend's calls (``_operators``); ``channel`` is the layout's channel half
    (a ``ChannelHalf``), or None for a spatial half called alone; ``spatial`` its spatial half
    (a ``SpatialHalf``), or None for a channel-only block. x is read three times and written
    once (twice and once with one half); nothing full-size but x is kept for backward. Returns
    the output and the two gates (None for a missing half).
    """
    channel_gate = None if channel is None else _channel_gate(ops, x, channel)
    spatial_gate = None if spatial is None else _spatial_gate(ops, x, channel_gate, spatial)
    return ops.gate_apply(x, channel_gate, spatial_gate), channel_gate, spatial_gate


def _operators(module: nn.Module, x: Tensor, one_grad: bool = False):
    """The calls of ``module.backend`` for x; with ``one_grad``, one gradient of x threaded from
    the channel pooling on when a gradient flows (not in an exported graph, which keeps the
    registered operators alone: no carriers).

    Under FX symbolic tracing (x a Proxy: ``torch.fx.symbolic_trace``, timm's and torchvision's
    feature extractors), the registered operators of the backend that the device of the module's
    parameters gets: the graph records them as calls, and their own autograd adds their gradients
    of x when it runs.
    """
    if isinstance(x, torch.fx.Proxy):
        device = next(module.parameters(), torch.empty(0)).device
        return backends.resolve_for_device(module.backend, device)
    ops = backends.resolve(module.backend, x)
    if one_grad and x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_exporting():
        return ops.one_grad()
    return ops


def _channel_gate(ops, x: Tensor, channel) -> Tensor:
    """[N, C] gate of the channel half from the fused average and max pools of x."""
    avg, mx = ops.channel_pool(x)
    return channel.to_gate(channel.logits(avg, mx, x)).to(x.dtype)


def _spatial_gate(ops, x: Tensor, channel_gate: Tensor | None, spatial) -> Tensor:
    """[N, 1, H, W] gate of the spatial half from the fused mean and max over the channels of
    ``x * channel_gate``, stacked in ``spatial.pool_order`` ("mix": 0.5·mean + 0.5·max)."""
    s_mean, s_max = ops.spatial_pool(x, channel_gate)
    maps = {"mean": s_mean, "max": s_max}
    if "mix" in spatial.pool_order:
        maps["mix"] = 0.5 * s_mean + 0.5 * s_max
    stacked = _spatial_conv_layout(torch.cat([maps[k] for k in spatial.pool_order], dim=1))
    return spatial.to_gate(spatial.logits(stacked)).to(x.dtype)


@torch.fx.wrap  # FX tracing records the call; the layout is decided when the graph runs
def _spatial_conv_layout(maps: Tensor) -> Tensor:
    """The spatial conv's 1- or 2-channel input, in channels_last strides on the CPU when a
    gradient will flow back through the conv.

    oneDNN runs a conv over NCHW input in a layout blocked by 16 channels, padding these maps'
    channels to 16: its backward took 3.1 ms at 8x2x56x56 (2.1 ms for one map) on a 2-core Xeon,
    against 0.47 ms (0.35 ms) channels_last (benchmarks/NOTES.md, "The spatial conv on the CPU");
    the forward takes the same time in both. A one-channel tensor with NCHW strides counts as
    channels_last-contiguous, so ``contiguous`` would keep it; ``clone`` sets the strides.
    """
    if maps.device.type != "cpu" or not maps.requires_grad or backends.in_func_transform():
        return maps  # (vmap has no channels_last)
    return maps.clone(memory_format=torch.channels_last)


class GateInspection:
    """Lets a module hand back its last gates: set ``keep_gates = True`` and, after a forward,
    read ``last_channel_gate`` ([N, C]) and ``last_spatial_gate`` ([N, 1, H, W], the gate map;
    None for a channel-only block). Nothing is kept, and nothing costs, when it is False."""

    keep_gates: bool = False
    last_channel_gate: Tensor | None = None
    last_spatial_gate: Tensor | None = None

    def _keep(self, channel_gate: Tensor, spatial_gate: Tensor | None) -> None:
        if self.keep_gates:
            self.last_channel_gate = channel_gate.detach()
            self.last_spatial_gate = None if spatial_gate is None else spatial_gate.detach()


def _odd_kernel(kernel_size: int) -> int:
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd size (the conv keeps H x W), got {kernel_size}")
    return kernel_size


def _check_input(x: Tensor, channels: int | None = None) -> None:
    """``check_input``, and x's channel count against the module's (when given). Nothing to check
    on an FX Proxy: the graph runs the operators, which check."""
    if isinstance(x, torch.fx.Proxy):
        return
    check_input(x)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"x: expected {channels} channels (the module's channel count), got {x.shape[1]}")


class BackendAttribute:
    """The ``backend`` of a block or a half: checked when set, and passed on from a block to the
    halves it holds."""

    def __get__(self, module, owner=None):
        return self if module is None else module._backend

    def __set__(self, module: nn.Module, backend: str) -> None:
        module._backend = backends.checked(backend)
        for half in module.modules():
            if isinstance(half, Half):
                half._backend = backend


class Half(nn.Module):
    """One half of a fused layout (its channel or its spatial attention), with the constructor
    and the parts, under the same names, of the half it replaces, and its small computations for
    the fused core. Called alone, it computes what that half computes (x times its gate, in most
    layouts) with the fused operators of ``backend``, which the block holding it keeps equal to
    its own."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    backend = BackendAttribute()

    def to_gate(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


class ChannelHalf(Half):
    """A channel half: ``channels``, ``logits(avg, max, x) -> [N, C]`` (the layout's MLP over
    the fused pools; x only for pools computed in plain PyTorch) and ``to_gate``."""

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.channels)
        return fused_cbam_forward(x, _operators(self, x, one_grad=True), self, None)[0]


class SpatialHalf(Half):
    """A spatial half: ``pool_order`` (the maps its conv takes: "mean", "max", or "mix" for
    0.5·mean + 0.5·max), ``logits(maps) -> [N, 1, H, W]`` (the conv) and ``to_gate``."""

    pool_order = ("mean", "max")

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        return fused_cbam_forward(x, _operators(self, x), None, self)[0]


class Parts(nn.Module):
    """The class of the halves in blocks that fused_cbam pickled before each layout's halves had
    their own (c396736 and before): unpickling the block gives them their class back."""


class FusedBlock(GateInspection, nn.Module):
    """What every fused layout shares: the backend, the input checks and the call of the core
    with the layout's two halves (``_halves()``)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    backend = BackendAttribute()
    half_classes: tuple[type, type]  # the layout's (channel half, spatial half)

    def _halves(self) -> tuple[ChannelHalf, SpatialHalf | None]:
        raise NotImplementedError

    def __setstate__(self, state: dict) -> None:
        """Also loads a block pickled by fused_cbam before its halves had a class per layout
        (c396736 and before), where ``backend`` was a plain attribute and the halves ``Parts``."""
        if "backend" in state:
            state["_backend"] = state.pop("backend")
        super().__setstate__(state)
        for half, half_class in zip(self._halves(), self.half_classes):
            if type(half) is Parts:
                half.__class__ = half_class
        self.backend = self._backend

    def forward(self, x: Tensor) -> Tensor:
        channel, spatial = self._halves()
        _check_input(x, channel.channels)
        traced = isinstance(x, torch.fx.Proxy)  # FX tracing: the training path, nothing kept
        out = None if traced else self._inference(x)
        if out is not None:
            return out
        out, channel_gate, spatial_gate = fused_cbam_forward(x, _operators(self, x, one_grad=True), channel, spatial)
        if not traced:
            self._keep(channel_gate, spatial_gate)
        return out

    def _plain(self) -> list | None:
        """The arguments of ``cbam_inference`` after x when the module is, as configured now, a
        block that operator computes; None otherwise (the default)."""
        return None

    def _inference(self, x: Tensor) -> Tensor | None:
        """The whole block in one operator, when nothing needs a gradient or the gates and the
        backend has that operator: x is read from memory once instead of three times. Not under
        autocast, where the MLP and the conv follow autocast (the operator computes in x's dtype)."""
        if self.keep_gates:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        operator = backends.resolve(self.backend, x).cbam_inference
        if operator is None or torch.is_autocast_enabled(x.device.type):  # (only cpu, cuda get here)
            return None
        # The operator reads the parts' weights directly: a part with hooks (pruning's or
        # weight_norm's pre-hooks recompute .weight) must run its own forward.
        if any(m._forward_pre_hooks or m._forward_hooks for m in self.modules() if m is not self):
            return None
        args = self._plain()
        return None if args is None else operator(x, *args)


def _summed(mlp, rows: list[Tensor]) -> Tensor:
    """``sum(mlp(r) for r in rows)`` as one batched call of the shared MLP over the stacked rows."""
    out = mlp(torch.cat(rows, dim=0))
    return out.unflatten(0, (len(rows), rows[0].shape[0])).sum(dim=0)


def _pointwise(convs: nn.Module, pooled: Tensor) -> Tensor:
    """An MLP of 1x1 convs applied to [M, C] pooled vectors, as to [M, C, 1, 1] images."""
    return convs(pooled[:, :, None, None]).flatten(1)


# ---------------------------------------------------------------------------------------------
# the blocks the inference operator computes (its schema, in csrc/ops.cpp, has the formulas):
# each layout's _plain() gathers its parameters, or says None

def _is_sigmoid(fn) -> bool:
    return fn is torch.sigmoid or type(fn) is nn.Sigmoid or (
        type(fn).__name__ == "Sigmoid" and type(fn).__module__.startswith("timm.")
    )


def _is_pointwise(fc: nn.Module) -> bool:
    """A Linear layer, or a 1x1 convolution that acts as one on a 1x1 input."""
    conv = type(fc) is nn.Conv2d and fc.kernel_size == (1, 1) and fc.groups == 1 and fc.padding == (0, 0)
    return conv or isinstance(fc, nn.Linear)


def _plain_mlp(fc1: nn.Module, act: nn.Module, fc2: nn.Module, pooling: str = "sum") -> list | None:
    """[fc1 weight, fc1 bias, fc2 weight, fc2 bias, pooling] of a Linear/1x1-conv MLP with a
    ReLU (biases may be None; pooling as cbam_inference takes it); None for any other MLP."""
    if type(act) is not nn.ReLU or not (_is_pointwise(fc1) and _is_pointwise(fc2)):
        return None
    return [fc1.weight, fc1.bias, fc2.weight, fc2.bias, pooling]


def _plain_conv(conv: nn.Module, bn: nn.Module | None, pool_order) -> list | None:
    """[weight, bias, BN running mean, running var, weight, bias, eps, max_first] of the spatial
    conv (2 -> 1 channels, or 1 -> 1 over 0.5·mean + 0.5·max; odd square kernel, 'same' zero
    padding) and its eval-mode BatchNorm (the operator folds it in); None for any other conv, or
    a BatchNorm using batch statistics."""
    k = conv.kernel_size if type(conv) is nn.Conv2d else (0, 0)
    if (
        k[0] != k[1] or k[0] % 2 == 0 or conv.in_channels not in (1, 2) or conv.out_channels != 1
        or conv.stride != (1, 1) or conv.padding != (k[0] // 2,) * 2 or conv.dilation != (1, 1) or conv.padding_mode != "zeros"
    ):
        return None
    if bn is None:
        norm = [None, None, None, None, 0.0]
    elif _is_plain_batch_norm(bn) and not bn.training and bn.running_mean is not None:
        norm = [bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps]
    else:
        return None
    return [conv.weight, conv.bias, *norm, tuple(pool_order) == ("max", "mean")]


def _is_plain_batch_norm(bn: nn.Module) -> bool:
    """A BatchNorm2d, or timm's BatchNormAct2d without activation or dropout (Identity children)."""
    if type(bn) is nn.BatchNorm2d:
        return True
    act_free = all(type(child) is nn.Identity for child in bn.children())
    return isinstance(bn, nn.BatchNorm2d) and type(bn).__name__ == "BatchNormAct2d" and act_free


def _plain_conv_bn(module: nn.Module, pool_order) -> list | None:
    """``_plain_conv`` of a conv-then-BatchNorm module (ours, or the one ``convert`` adopted from
    the user's model, e.g. timm's ConvNormAct): None unless its children are exactly ``conv`` and
    ``bn``, so that a module with an activation (or anything else) after them keeps its forward."""
    children = dict(module.named_children())
    if children.keys() != {"conv", "bn"} or not _is_plain_batch_norm(children["bn"]):
        return None
    return _plain_conv(module.conv, module.bn, pool_order)


def _plain(mlp: list | None, conv: list | None, *gates) -> list | None:
    return mlp + conv if mlp is not None and conv is not None and all(map(_is_sigmoid, gates)) else None


# ---------------------------------------------------------------------------------------------
# official layout

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
            f"fused_cbam.nn.CBAM: pool_types {tuple(pool_types)} include 'lp'/'lse', which are pooled in "
            "plain PyTorch (an extra read of x each); 'avg' and 'max' stay fused",
            stacklevel=4,
        )


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class BasicConv(nn.Module):
    """The official code's conv (no bias) + optional BN + optional ReLU."""

    def __init__(
        self, in_planes, out_planes, kernel_size, stride=1, padding=0, relu=True, bn=True, *, bn_momentum=0.01
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=bn_momentum, affine=True) if bn else None
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
        hidden = gate_channels // reduction_ratio
        if hidden < 1:
            raise ValueError(
                f"reduction_ratio: gate_channels // reduction_ratio must be >= 1, got {gate_channels} // {reduction_ratio}"
            )
        self.mlp = nn.Sequential(
            Flatten(), nn.Linear(gate_channels, hidden), nn.ReLU(), nn.Linear(hidden, gate_channels)
        )

    @property
    def channels(self) -> int:
        return self.gate_channels

    def logits(self, avg: Tensor, mx: Tensor, x: Tensor) -> Tensor:
        """Sum of the shared MLP over the pooled vectors, as one batched GEMM pair; x is pooled
        in plain PyTorch for the pool types that are not fused ("lp", "lse")."""
        fused = {"avg": avg, "max": mx}
        rows = [fused[p] if p in fused else _REFERENCE_POOLS[p](x).to(avg.dtype) for p in self.pool_types]
        return _summed(self.mlp, rows)


class SpatialGate(SpatialHalf):
    """The official ``SpatialGate()``: called alone, x times the sigmoid of its conv (with BN)
    over [max, mean]."""

    pool_order = ("max", "mean")  # the official code's order (the paper's text says mean, max)

    def __init__(self, kernel_size=7, *, backend="auto"):
        super().__init__(backend)
        k = _odd_kernel(kernel_size)
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

    def _plain(self) -> list | None:
        pools = sorted(self.ChannelGate.pool_types)
        if self.no_spatial or pools not in (["avg"], ["avg", "max"]):
            return None
        layers = list(self.ChannelGate.mlp)  # Flatten, Linear, ReLU, Linear (or a copy's own)
        flattens = len(layers) == 4 and type(layers[0]).__name__ == "Flatten"
        mlp = _plain_mlp(*layers[1:]) if flattens else None
        if mlp is not None:
            mlp[-1] = "sum" if "max" in pools else "avg"
        return _plain(mlp, _plain_conv_bn(self.SpatialGate.spatial, SpatialGate.pool_order))


# ---------------------------------------------------------------------------------------------
# timm layout

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
        return create_act_layer(gate_layer)
    if not isinstance(gate_layer, str):
        return gate_layer()
    known = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "hardsigmoid": nn.Hardsigmoid}
    if gate_layer.lower() not in known:
        raise ValueError(f"gate_layer: expected one of {sorted(known)} (install timm for more), got {gate_layer!r}")
    return known[gate_layer.lower()]()


class ChannelAttn(ChannelHalf):
    """timm's ``ChannelAttn`` (``fc1``, ``act``, ``fc2``, ``gate``): called alone, x times
    the gate of the MLP's sum over the average and the max pool."""

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

    def _mlp(self, pooled: Tensor) -> Tensor:
        return _pointwise(lambda t: self.fc2(self.act(self.fc1(t))), pooled)

    def logits(self, avg: Tensor, mx: Tensor, x: Tensor) -> Tensor:
        return _summed(self._mlp, [avg, mx])

    def to_gate(self, logits: Tensor) -> Tensor:
        return self.gate(logits)


class LightChannelAttn(ChannelAttn):
    """timm's ``LightChannelAttn``: one MLP pass over 0.5·avg + 0.5·max, and a sigmoid (timm
    does not use its ``gate`` there)."""

    def logits(self, avg: Tensor, mx: Tensor, x: Tensor) -> Tensor:
        return self._mlp(0.5 * avg + 0.5 * mx)

    def to_gate(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


class SpatialAttn(SpatialHalf):
    """timm's ``SpatialAttn`` (``conv``: conv + BN, ``gate``) over [mean, max]: called alone,
    x times its gate."""

    def __init__(self, kernel_size=7, gate_layer="sigmoid", device=None, dtype=None, *, backend="auto"):
        super().__init__(backend)
        k = _odd_kernel(kernel_size)
        self.conv = BasicConv(len(self.pool_order), 1, k, padding=(k - 1) // 2, relu=False, bn_momentum=0.1)
        self.gate = make_gate(gate_layer)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def logits(self, maps: Tensor) -> Tensor:
        return self.conv(maps)

    def to_gate(self, logits: Tensor) -> Tensor:
        return self.gate(logits)


class LightSpatialAttn(SpatialAttn):
    """timm's ``LightSpatialAttn``: its 1-channel conv over 0.5·mean + 0.5·max."""

    pool_order = ("mix",)


class _TimmCbam(FusedBlock):
    """timm's constructor and parameters; ``light`` selects the light variant's halves."""

    light = False
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

    def _halves(self) -> tuple[ChannelAttn, SpatialAttn]:
        return self.channel, self.spatial

    def _plain(self) -> list | None:
        c, s = self.channel, self.spatial
        conv = _plain_conv_bn(s.conv, ("mean", "max"))
        # The light variant: one MLP pass over 0.5·avg + 0.5·max, and timm's fixed sigmoid
        # channel gate (gate_layer is not used there).
        mlp = _plain_mlp(c.fc1, c.act, c.fc2, "mix" if self.light else "sum")
        return _plain(mlp, conv, s.gate, *(() if self.light else (c.gate,)))


class CbamModule(_TimmCbam):
    """Drop-in fused replacement of timm's ``CbamModule``: its constructor, ``state_dict`` keys
    (``channel.fc1``, ``channel.fc2``, ``spatial.conv.conv``, ``spatial.conv.bn``) and numerics
    ([mean, max] spatial maps, BN momentum 0.1, gates from ``gate_layer``)."""


class LightCbamModule(_TimmCbam):
    """Drop-in fused replacement of timm's ``LightCbamModule``: one MLP pass over
    0.5·mean + 0.5·max, a sigmoid channel gate (timm ignores ``gate_layer`` there), and a
    1-channel spatial conv over 0.5·mean + 0.5·max of the channel-gated x."""

    light = True
    half_classes = (LightChannelAttn, LightSpatialAttn)


# ---------------------------------------------------------------------------------------------
# ultralytics layout


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

    def logits(self, avg: Tensor, mx: Tensor, x: Tensor) -> Tensor:
        return _pointwise(self.fc, avg)

    def to_gate(self, logits: Tensor) -> Tensor:
        return self.act(logits)


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

    def _plain(self) -> list | None:
        ca, sa = self.channel_attention, self.spatial_attention
        mlp = [ca.fc.weight, ca.fc.bias, None, None, "avg"] if _is_pointwise(ca.fc) else None
        return _plain(mlp, _plain_conv(sa.cv1, None, ("mean", "max")), ca.act, sa.act)


# ---------------------------------------------------------------------------------------------
# mmyolo layout

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


class MMYoloChannelAttention(ChannelHalf):
    """mmyolo's ``ChannelAttention(channels, reduce_ratio=16, act_cfg=dict(type="ReLU"))``
    (``fc``: two conv modules, ``act_cfg`` between them; ``sigmoid``): called alone, its gate
    [N, C, 1, 1], as mmyolo's returns it (the block multiplies)."""

    def __init__(self, channels, reduce_ratio=16, act_cfg=_RELU, *, backend="auto"):
        super().__init__(backend)
        hidden = int(channels / reduce_ratio)
        self.fc = nn.Sequential(ConvAct(channels, hidden, 1, act_cfg=act_cfg), ConvAct(hidden, channels, 1))
        self.sigmoid = nn.Sigmoid()

    @property
    def channels(self) -> int:
        return self.fc[0].conv.in_channels

    def logits(self, avg: Tensor, mx: Tensor, x: Tensor) -> Tensor:
        return _summed(lambda t: _pointwise(self.fc, t), [avg, mx])

    def to_gate(self, logits: Tensor) -> Tensor:
        return self.sigmoid(logits)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.channels)
        return _channel_gate(_operators(self, x), x, self)[:, :, None, None]


class MMYoloSpatialAttention(SpatialHalf):
    """mmyolo's ``SpatialAttention(kernel_size=7)`` (``conv``: a conv module with bias and its
    sigmoid) over [mean, max]: called alone, its gate [N, 1, H, W], as mmyolo's returns it."""

    def __init__(self, kernel_size=7, *, backend="auto"):
        super().__init__(backend)
        k = _odd_kernel(kernel_size)
        self.conv = ConvAct(2, 1, k, k // 2, act_cfg={"type": "Sigmoid"})

    def logits(self, maps: Tensor) -> Tensor:
        return self.conv.conv(maps)

    def to_gate(self, logits: Tensor) -> Tensor:
        activate = getattr(self.conv, "activate", None)  # (mmcv's ConvModule has none without one)
        return logits if activate is None else activate(logits)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        return _spatial_gate(_operators(self, x), x, None, self)


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

    def _plain(self) -> list | None:
        fc = self.channel_attention.fc
        # mmcv's ConvModule has no ``activate`` without an activation
        if type(getattr(fc[1], "activate", None)) not in (nn.Identity, type(None)):
            return None
        mlp = _plain_mlp(fc[0].conv, getattr(fc[0], "activate", None), fc[1].conv)
        conv = self.spatial_attention.conv
        activate = getattr(conv, "activate", None)
        return _plain(mlp, _plain_conv(conv.conv, None, ("mean", "max")), self.channel_attention.sigmoid, activate)
