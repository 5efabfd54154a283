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
operator computes); in eager training, on the C++ CPU and CUDA backends, in one operator with
one autograd node, ``cbam_training``, fed from ``_plain(training=True)``. ``fused_cbam.convert``
puts the modules in place of a model's own modules.

Modules: ``core`` (the shared core and the base classes), one per layout (``official``,
``timm``, ``ultralytics``, ``mmyolo``), and ``inference_args`` (the two operators' arguments).
The classes are all importable from here too, under the names that whole modules pickled before
the split (c396736 and before, when this was one module) refer to: ``Parts``, ``Flatten``,
``BasicConv`` and ``ConvAct`` among them.
"""

from fused_cbam.nn.core import (
    ChannelHalf,
    FusedBlock,
    GateInspection,
    Half,
    Parts,
    SpatialHalf,
    fused_cbam_forward,
)
from fused_cbam.nn.mmyolo import (
    ConvAct,
    MMYoloCBAM,
    MMYoloChannelAttention,
    MMYoloSpatialAttention,
    mmcv_activation,
)
from fused_cbam.nn.official import CBAM, BasicConv, ChannelGate, Flatten, SpatialGate
from fused_cbam.nn.timm import (
    CbamModule,
    ChannelAttn,
    LightCbamModule,
    LightChannelAttn,
    LightSpatialAttn,
    SpatialAttn,
    make_divisible,
    make_gate,
)
from fused_cbam.nn.ultralytics import (
    UltralyticsCBAM,
    UltralyticsChannelAttention,
    UltralyticsSpatialAttention,
)

__all__ = [
    "CBAM",
    "BasicConv",
    "CbamModule",
    "ChannelAttn",
    "ChannelGate",
    "ChannelHalf",
    "ConvAct",
    "Flatten",
    "FusedBlock",
    "GateInspection",
    "Half",
    "LightCbamModule",
    "LightChannelAttn",
    "LightSpatialAttn",
    "MMYoloCBAM",
    "MMYoloChannelAttention",
    "MMYoloSpatialAttention",
    "Parts",
    "SpatialAttn",
    "SpatialGate",
    "SpatialHalf",
    "UltralyticsCBAM",
    "UltralyticsChannelAttention",
    "UltralyticsSpatialAttention",
    "fused_cbam_forward",
    "make_divisible",
    "make_gate",
    "mmcv_activation",
]
