"""``fused_cbam.convert``: put the fused module in place of every CBAM module of a model.

Modules are recognised by structure, not by import path, since most users copied the CBAM code
into their own: a known class name (``CBAM``, ``CbamModule``, ``LightCbamModule``) and the
attribute layout of one of the layouts in ``fused_cbam.nn``. The fused module is built around
the original's own submodules, so it holds the very same parameter and buffer tensors under
the same names: ``state_dict()`` keys, checkpoints, optimizer state and the train-mode BN
running statistics stay as they were.
"""

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fused_cbam import backends
from fused_cbam import nn as fused_nn

log = logging.getLogger("fused_cbam.convert")


class NotThisLayout(Exception):
    """The module does not have a layout's structure; the message says what differs."""


def _get(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        raise NotThisLayout(f"no submodule {path}") from None


def _same_conv(module: nn.Module, path: str, in_channels=None, out_channels=None, bias=None) -> nn.Conv2d:
    """The submodule at ``path``, checked to be a stride-1 Conv2d with an odd square kernel and
    'same' zero padding (with the given channels and bias, where given)."""
    conv = _get(module, path)
    if type(conv) is not nn.Conv2d:
        raise NotThisLayout(f"{path} is a {type(conv).__name__}, not a Conv2d")
    k = conv.kernel_size[0]
    expected = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": (k, k) if k % 2 else "odd",
        "stride": (1, 1),
        "padding": (k // 2, k // 2),
        "dilation": (1, 1),
        "groups": 1,
        "padding_mode": "zeros",
        "bias": bias,
    }
    actual = dict(vars(conv), bias=conv.bias is not None)
    wrong = [
        f"{key}={actual[key]} (expected {want})"
        for key, want in expected.items()
        if want is not None and actual[key] != want
    ]
    if wrong:
        raise NotThisLayout(f"{path}: {', '.join(wrong)}")
    return conv


def _official(m: nn.Module):
    linears = [layer for layer in _get(m, "ChannelGate.mlp").modules() if isinstance(layer, nn.Linear)]
    if len(linears) != 2:
        raise NotThisLayout(f"ChannelGate.mlp has {len(linears)} Linear layers, not 2")
    channels, hidden = linears[0].in_features, linears[0].out_features
    no_spatial = bool(getattr(m, "no_spatial", False))
    adopt = ["ChannelGate.mlp"]
    if not no_spatial:
        _same_conv(m, "SpatialGate.spatial.conv", 2, 1)
        adopt.append("SpatialGate.spatial")
    pool_types = tuple(getattr(m.ChannelGate, "pool_types", ("avg", "max")))
    kwargs = dict(
        gate_channels=channels, reduction_ratio=channels // hidden, pool_types=pool_types, no_spatial=no_spatial
    )
    return kwargs, adopt


def _timm(light: bool):
    def recognise(m: nn.Module):
        fc1 = _same_conv(m, "channel.fc1")
        _same_conv(m, "channel.fc2", fc1.out_channels, fc1.in_channels, fc1.bias is not None)
        conv = _same_conv(m, "spatial.conv.conv", 1 if light else 2, 1)
        adopt = ["channel.fc1", "channel.act", "channel.fc2", "channel.gate", "spatial.conv", "spatial.gate"]
        for path in adopt:
            _get(m, path)
        kwargs = dict(
            channels=fc1.in_channels,
            rd_channels=fc1.out_channels,
            spatial_kernel_size=conv.kernel_size[0],
            mlp_bias=fc1.bias is not None,
        )
        return kwargs, adopt

    return recognise


def _ultralytics(m: nn.Module):
    fc = _same_conv(m, "channel_attention.fc", bias=True)
    if fc.in_channels != fc.out_channels:
        raise NotThisLayout(f"channel_attention.fc maps {fc.in_channels} to {fc.out_channels} channels")
    cv1 = _same_conv(m, "spatial_attention.cv1", 2, 1, bias=False)
    adopt = ["channel_attention.fc", "channel_attention.act", "spatial_attention.cv1", "spatial_attention.act"]
    for path in adopt:
        _get(m, path)
    return dict(c1=fc.in_channels, kernel_size=cv1.kernel_size[0]), adopt


def _mmyolo(m: nn.Module):
    fc = _get(m, "channel_attention.fc")
    if not isinstance(fc, nn.Sequential) or len(fc) != 2:
        raise NotThisLayout("channel_attention.fc is not a Sequential of two conv modules")
    fc1 = _same_conv(m, "channel_attention.fc.0.conv", bias=True)
    _same_conv(m, "channel_attention.fc.1.conv", fc1.out_channels, fc1.in_channels, bias=True)
    conv = _same_conv(m, "spatial_attention.conv.conv", 2, 1, bias=True)
    _get(m, "spatial_attention.conv.activate")
    adopt = ["channel_attention.fc", "channel_attention.sigmoid", "spatial_attention.conv"]
    for path in adopt:
        _get(m, path)
    kwargs = dict(
        in_channels=fc1.in_channels,
        reduce_ratio=fc1.in_channels / fc1.out_channels,
        kernel_size=conv.kernel_size[0],
        init_cfg=getattr(m, "init_cfg", None),  # (mmengine's BaseModule keeps it)
    )
    return kwargs, adopt


@dataclass(frozen=True)
class Layout:
    name: str
    class_name: str
    fused: type
    recognise: Callable  # module -> (fused constructor kwargs, submodule paths to adopt); raises NotThisLayout


LAYOUTS = (
    Layout("official", "CBAM", fused_nn.CBAM, _official),
    Layout("ultralytics", "CBAM", fused_nn.UltralyticsCBAM, _ultralytics),
    Layout("mmyolo", "CBAM", fused_nn.MMYoloCBAM, _mmyolo),
    Layout("timm", "CbamModule", fused_nn.CbamModule, _timm(light=False)),
    Layout("timm light", "LightCbamModule", fused_nn.LightCbamModule, _timm(light=True)),
)


def _build(layout: Layout, m: nn.Module, backend: str) -> nn.Module:
    """The fused module of ``layout`` around m's own submodules, or NotThisLayout."""
    kwargs, adopt = layout.recognise(m)
    try:
        # Its own parameters are replaced by m's: their initialisation must not use up draws
        # of the global generator, which the user's next random numbers come from.
        with torch.random.fork_rng(devices=[]):
            fused = layout.fused(**kwargs, backend=backend)
    except (TypeError, ValueError) as e:
        raise NotThisLayout(str(e)) from None
    theirs = m.state_dict(keep_vars=True)
    structure, their_structure = _structure(fused, fused.state_dict()), _structure(m, theirs)
    if structure != their_structure:
        diff = sorted(structure ^ their_structure)
        raise NotThisLayout(f"state_dict keys differ from the {layout.name} layout's: {diff}")
    for path in adopt:
        parent, _, name = path.rpartition(".")
        setattr(fused.get_submodule(parent), name, m.get_submodule(path))
    ours = fused.state_dict(keep_vars=True)
    if ours.keys() != theirs.keys() or any(ours[k] is not theirs[k] for k in ours):
        raise NotThisLayout("its tensors are not all held by the submodules the fused module takes over")
    originals = dict(m.named_modules())
    for name, sub in fused.named_modules():
        sub.training = originals.get(name, m).training
    return fused


def _structure(module: nn.Module, state_dict) -> set[str]:
    """The keys of the layout's structure, which must be the same, from ``module``'s state_dict:
    - not an activation's (a PReLU's weight, under a part named ``act`` or ``activate``): the
      fused module takes over the original's activations with their parameters;
    - a tensor that a hook recomputes before each forward under the name ``weight`` (pruning's
      ``weight_orig`` and ``weight_mask``, weight_norm's ``weight_g`` and ``weight_v``,
      spectral_norm's ``weight_orig``, ``weight_u`` and ``weight_v``) counts as ``weight``: the
      fused module takes over the part with its hooks."""
    keys = set()
    for key in state_dict:
        path, _, name = key.rpartition(".")
        if {"act", "activate"} & set(path.split(".")):
            continue
        owner = module.get_submodule(path)
        base = name.rpartition("_")[0]
        if base and isinstance(vars(owner).get(base), torch.Tensor):  # a plain attribute, recomputed
            name = base
        keys.add(f"{path}.{name}" if path else name)
    return keys


# What a traced graph keeps of a CBAM module it inlined: its MLP, under each layout's path.
_PART_PATHS = ("ChannelGate.mlp", "channel.fc1", "channel_attention.fc")


def _has_hooks(m: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, name) for name in hooks)


def _replacement(m: nn.Module, qualname: str, backend: str) -> nn.Module | None:
    """m's fused replacement (m itself if already fused), or None to leave it and look inside."""
    if isinstance(m, fused_nn.FusedBlock):
        if m.backend != backend:
            log.info("%s (%s) is already fused: backend %r -> %r", qualname, type(m).__name__, m.backend, backend)
            m.backend = backend
        return m
    class_name = type(m).__name__
    candidates = [layout for layout in LAYOUTS if layout.class_name == class_name]
    if not candidates:
        if "cbam" in class_name.lower():
            known = sorted({layout.class_name for layout in LAYOUTS})
            log.warning("skipped %s (%s): not a known CBAM class name %s", qualname, class_name, known)
        return None
    reasons = []
    for layout in candidates:
        try:
            fused = _build(layout, m, backend)
        except NotThisLayout as e:
            reasons.append(f"not the {layout.name} layout: {e}")
            continue
        log.info(
            "replaced %s (%s, %s layout) with fused_cbam.nn.%s, backend %r",
            qualname, class_name, layout.name, type(fused).__name__, backend,
        )
        if _has_hooks(m):
            log.warning("%s: the hooks registered on the replaced module itself were not carried over", qualname)
        return fused
    log.warning("skipped %s (%s): %s", qualname, class_name, "; ".join(reasons))
    return None


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every CBAM module of ``model`` that has a known layout by its fused
    equivalent, holding the same parameter and buffer tensors under the same names; return the
    model (the fused module itself when ``model`` is a CBAM module).

    Recognised: the official layout (``CBAM`` with ``ChannelGate``/``SpatialGate``), timm's
    ``CbamModule`` and ``LightCbamModule``, ultralytics' and mmyolo's ``CBAM``. Each replacement,
    and each CBAM-like module left alone with the reason, is logged to the "fused_cbam.convert"
    logger; other modules are not touched. ``backend="reference"`` gives a model with no custom
    operators (for exporters that need plain PyTorch); modules already fused get ``backend``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    backends.checked(backend)
    done: dict[int, nn.Module] = {}  # a module shared by several parents gets one replacement

    def walk(m: nn.Module, qualname: str) -> nn.Module:
        if id(m) not in done:
            fused = _replacement(m, qualname or "<model>", backend)
            done[id(m)] = m if fused is None else fused
            if fused is None:
                # _modules, not named_children(): that lists a module held twice only once
                for name, child in list(m._modules.items()):
                    new = None if child is None else walk(child, f"{qualname}.{name}" if qualname else name)
                    if new is not child:
                        setattr(m, name, new)
        return done[id(m)]

    converted = walk(model, "")
    if isinstance(model, torch.fx.GraphModule) and not any(isinstance(m, fused_nn.FusedBlock) for m in done.values()):
        inlined = [name for name, _ in model.named_modules() if name.endswith(_PART_PATHS)]
        if inlined:
            log.warning(
                "<model> is an FX GraphModule that holds CBAM parts (%s) but no CBAM module to replace: tracing "
                "inlined their forward; convert the model before tracing it", inlined[0],
            )
    return converted
