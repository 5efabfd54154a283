"""Class activation maps (Zhou et al., CVPR 2016) and attention maps, on the fused operators.

For a network that ends in global average pooling and a linear classifier, the class
activation map of class c is ``CAM_c[h, w] = sum_k W[c, k] * F[k, h, w]``: the classifier's
weights applied at every pixel of the last feature map F. That is a per-sample weighted
channel sum, which ``spatial_pool`` computes in one read of F with the weights as its channel
scale; the [N, num_classes, H, W] stack of every class's map is never formed.
"""

import numbers
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_cbam import ops
from fused_cbam.nn import FusedBlock, Half


def _check_fc(fc_weight, fc_bias, features: Tensor) -> None:
    if not isinstance(fc_weight, Tensor):
        raise TypeError(f"fc_weight: expected a torch.Tensor, got {type(fc_weight).__name__}")
    channels = features.shape[1]
    if fc_weight.dim() != 2 or fc_weight.shape[1] != channels or fc_weight.shape[0] == 0:
        raise ValueError(
            f"fc_weight: expected shape [num_classes, {channels}] (features have {channels} channels), "
            f"got {tuple(fc_weight.shape)}"
        )
    if not fc_weight.is_floating_point():
        raise TypeError(f"fc_weight: expected a floating-point dtype, got {fc_weight.dtype}")
    if fc_weight.device != features.device:
        raise ValueError(
            f"fc_weight: expected a tensor on {features.device} (features' device), got {fc_weight.device}"
        )
    if fc_bias is None:
        return
    if not isinstance(fc_bias, Tensor):
        raise TypeError(f"fc_bias: expected a torch.Tensor or None, got {type(fc_bias).__name__}")
    if tuple(fc_bias.shape) != (fc_weight.shape[0],):
        raise ValueError(f"fc_bias: expected shape ({fc_weight.shape[0]},) (one per class), got {tuple(fc_bias.shape)}")
    if fc_bias.device != features.device:
        raise ValueError(f"fc_bias: expected a tensor on {features.device} (features' device), got {fc_bias.device}")


def _class_indices(class_idx, features: Tensor, fc_weight: Tensor, fc_bias, backend: str) -> Tensor:
    """The [N] long tensor of the classes whose maps are asked for."""
    n, num_classes = features.shape[0], fc_weight.shape[0]
    if class_idx is None:
        avg, _ = ops.channel_pool(features, backend=backend)
        logits = avg @ fc_weight.to(avg.dtype).t()
        if fc_bias is not None:
            logits = logits + fc_bias.to(avg.dtype)
        return logits.argmax(dim=1)
    if isinstance(class_idx, numbers.Integral) and not isinstance(class_idx, bool):
        idx = torch.full((n,), int(class_idx), dtype=torch.long, device=features.device)
    else:
        try:
            idx = torch.as_tensor(class_idx, device=features.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"class_idx: expected None, an int or a sequence of ints, got {type(class_idx).__name__}"
            ) from None
        if idx.numel() == 0:  # [] for an empty batch: as_tensor makes it float32
            idx = idx.long()
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"class_idx: expected integer class indices, got dtype {idx.dtype}")
        if idx.dim() == 0:
            idx = idx.expand(n)
        if tuple(idx.shape) != (n,):
            raise ValueError(
                f"class_idx: expected an int or one index per sample, shape ({n},), got {tuple(idx.shape)}"
            )
        idx = idx.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(
            f"class_idx: expected indices in [0, {num_classes}) (fc_weight has {num_classes} classes), "
            f"got values in [{idx.min().item()}, {idx.max().item()}]"
        )
    return idx


def _resize(maps: Tensor, output_size) -> Tensor:
    """Bilinear resize of [N, H, W] maps to ``output_size`` (an int or (H, W)); None keeps them."""
    if output_size is None:
        return maps

    def is_length(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0

    size = (output_size, output_size) if is_length(output_size) else ()
    if not size and isinstance(output_size, Iterable) and not isinstance(output_size, (str, Tensor)):
        size = tuple(output_size)  # (H, W): a tuple, list, torch.Size, numpy array
    if len(size) != 2 or not all(map(is_length, size)):
        raise ValueError(f"output_size: expected a positive int or (H, W) of positive ints, got {output_size!r}")
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each [H, W] map of ``maps`` ([..., H, W]) to [0, 1]; a constant map gives
    zeros, and a map with a NaN gives NaN everywhere (as its max is NaN)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    constant = span == 0
    return torch.where(constant, torch.zeros_like(maps), (maps - lo) / torch.where(constant, 1, span))


def _finish(maps: Tensor, normalize: bool, output_size) -> Tensor:
    maps = _resize(maps, output_size)
    return normalize_maps(maps) if normalize else maps


def class_activation_map(
    features: Tensor,
    fc_weight: Tensor,
    class_idx=None,
    *,
    fc_bias: Tensor | None = None,
    normalize: bool = True,
    output_size=None,
    backend: str = "auto",
) -> Tensor:
    """The class activation maps ``CAM[n] = sum_k fc_weight[class_idx[n], k] * features[n, k]``: [N, H, W].

    features: [N, C, H, W], the input of the global average pooling. fc_weight: [num_classes, C],
    as in ``nn.Linear``. class_idx: an int for every sample, one index per sample (sequence or
    tensor), or None for the predicted class, the argmax of ``GAP(features) @ fc_weight.T + fc_bias``
    (fc_bias only serves this prediction: a constant does not change a map's shape).
    output_size: an int or (H, W); the maps are upsampled bilinearly to it before normalising.
    normalize: min-max to [0, 1] per map (a constant map gives zeros).

    One read of the features for the chosen classes' maps (one more for the prediction when
    class_idx is None), on any backend.
    """
    ops.check_input(features, "features")
    _check_fc(fc_weight, fc_bias, features)
    idx = _class_indices(class_idx, features, fc_weight, fc_bias, backend)
    weights = fc_weight[idx]
    mean, _ = ops.spatial_pool(features, weights, backend=backend)
    return _finish(mean[:, 0] * features.shape[1], normalize, output_size)


def spatial_attention_map(
    features: Tensor, normalize: bool = True, *, output_size=None, backend: str = "auto"
) -> Tensor:
    """The per-pixel mean of the features over channels: [N, H, W], min-max normalised per map
    by default, upsampled bilinearly to ``output_size`` first when given."""
    ops.check_input(features, "features")
    mean, _ = ops.spatial_pool(features, backend=backend)
    return _finish(mean[:, 0], normalize, output_size)


def _named_module(model: nn.Module, layer, name: str) -> nn.Module:
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"{name}: the model has no submodule named {layer!r}") from None
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name}: expected an nn.Module or a dotted module name, got {type(layer).__name__}")
    if not any(m is layer for m in model.modules()):
        raise ValueError(f"{name}: the module given is not part of the model")
    return layer


def _is_1x1_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


# Class names of CBAM modules and their channel halves in the layouts fused_cbam knows (fused or
# not, in a block or used alone).
_CBAM_CLASS_NAMES = {"CBAM", "CbamModule", "LightCbamModule", "ChannelGate", "ChannelAttn", "LightChannelAttn",
                     "ChannelAttention"}  # fmt: skip


def _is_cbam(m: nn.Module) -> bool:
    return isinstance(m, (FusedBlock, Half)) or type(m).__name__ in _CBAM_CLASS_NAMES


def _in_any(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


def _find_classifier(model: nn.Module) -> nn.Module:
    """The model's only nn.Linear, or, with no Linear, its only 1x1 conv; the layers inside CBAM
    blocks (their channel MLPs are Linear layers or 1x1 convs) do not count."""
    blocks = [name for name, m in model.named_modules() if name and _is_cbam(m)]
    layers = [(name, m) for name, m in model.named_modules() if not _in_any(name, blocks)]
    linears = [name for name, m in layers if isinstance(m, nn.Linear)]
    if len(linears) == 1:
        return model.get_submodule(linears[0])
    if linears:
        raise ValueError(f"fc_layer: the model has several nn.Linear layers {linears}; pass the classifier as fc_layer")
    convs = [name for name, m in layers if _is_1x1_conv(m)]
    if len(convs) == 1:
        return model.get_submodule(convs[0])
    raise ValueError(
        "fc_layer: the model has no nn.Linear and "
        + (f"several 1x1 convolutions {convs}" if convs else "no 1x1 convolution")
        + "; pass the classifier as fc_layer"
    )


class CAMExtractor:
    """Class activation maps of a model with a global-average-pooling + linear head.

    Hooks ``target_layer`` (a module of the model or its dotted name), whose output is the
    feature map the head pools, and reads the classifier ``fc_layer`` (an ``nn.Linear`` or a
    1x1 ``nn.Conv2d``; found by itself when the model has exactly one ``nn.Linear``, or no
    Linear and exactly one 1x1 conv, not counting the MLPs of CBAM channel gates)::

        with CAMExtractor(model, "layer4") as cam:
            logits = model(images)
            maps = cam(output_size=images.shape[-2:])   # [N, H, W] in [0, 1], predicted classes

    The hooks (on ``target_layer`` and on the classifier, whose output gives the predicted
    classes) are registered on construction and removed on exit from the ``with`` block (or by
    ``remove()``); they keep only the last outputs, detached.
    """

    def __init__(self, model: nn.Module, target_layer, fc_layer=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.target_layer = _named_module(model, target_layer, "target_layer")
        fc = _find_classifier(model) if fc_layer is None else _named_module(model, fc_layer, "fc_layer")
        if not (isinstance(fc, nn.Linear) or _is_1x1_conv(fc)):
            raise TypeError(f"fc_layer: expected an nn.Linear or a 1x1 nn.Conv2d, got {type(fc).__name__}")
        self.fc_layer = fc
        self.features: Tensor | None = None
        self.logits: Tensor | None = None
        self._handles = [
            self.target_layer.register_forward_hook(self._keep_features),
            fc.register_forward_hook(self._keep_logits),
        ]

    def _keep_features(self, module, inputs, output) -> None:
        self.features = output.detach() if isinstance(output, Tensor) else output
        self.logits = None  # the classifier runs after the target layer: only this forward's count

    def _keep_logits(self, module, inputs, output) -> None:
        self.logits = output.detach() if isinstance(output, Tensor) else None

    def _predicted_classes(self) -> Tensor | None:
        """The classes the classifier's last output predicts ([N, num_classes], or a 1x1 conv's
        [N, num_classes, H, W] averaged over H x W); None when it has another shape."""
        logits, n = self.logits, self.features.shape[0]
        if logits is None or logits.dim() < 2 or logits.shape[:2] != (n, self.fc_layer.weight.shape[0]):
            return None
        if logits.dim() > 2:
            logits = logits.flatten(2).float().mean(dim=2)
        return logits.argmax(dim=1).to(self.features.device)

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "CAMExtractor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __call__(self, class_idx=None, output_size=None, *, normalize: bool = True, backend: str = "auto") -> Tensor:
        """The maps of the last forward: ``class_activation_map`` of the hooked features with the
        classifier's weights and bias. class_idx None means the classes the classifier's output
        predicted in that forward (whatever pooling the head uses), or, when its output is not
        one row of logits per sample, the prediction of average pooling and the classifier."""
        if self.features is None:
            raise RuntimeError("CAMExtractor: no features yet; run a forward pass of the model first")
        if not isinstance(self.features, Tensor):
            raise TypeError(f"target_layer: expected its output to be a tensor, got {type(self.features).__name__}")
        if class_idx is None:
            class_idx = self._predicted_classes()
        weight = self.fc_layer.weight.detach().flatten(1)
        bias = None if self.fc_layer.bias is None else self.fc_layer.bias.detach()
        with torch.no_grad():
            return class_activation_map(
                self.features,
                weight,
                class_idx,
                fc_bias=bias,
                normalize=normalize,
                output_size=output_size,
                backend=backend,
            )


def _image_array(image) -> Tensor:
    """An [H, W, 3] float tensor in [0, 1] from a PIL image or a [3|1, H, W] / [H, W, 3|1] / [H, W] tensor."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.array(image.convert("RGB")))
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a PIL image or a torch.Tensor, got {type(image).__name__}")
    image = image.detach().cpu()
    if image.dim() == 2:
        image = image[..., None]
    elif image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.permute(1, 2, 0)
    if image.dim() != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected [3, H, W], [H, W, 3] or [H, W], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif image.is_floating_point():
        image = image.float().clamp(0, 1)
    else:
        raise TypeError(f"image: expected uint8 or floating-point values, got {image.dtype}")
    return image.expand(-1, -1, 3)


def overlay(image, cam: Tensor, alpha: float = 0.5, colormap: str = "jet"):
    """The map drawn as a heatmap over the image: a PIL RGB image of the image's size.

    image: a PIL image, or a tensor [3, H, W] / [H, W, 3] (floats in [0, 1] or uint8) / [H, W].
    cam: [H', W'] (or [1, H', W']), resized bilinearly to the image; values already within
    [0, 1] are drawn as they are, other maps are min-max normalised first.
    alpha: the heatmap's weight in the blend, in [0, 1].
    """
    import matplotlib
    from PIL import Image

    if not isinstance(cam, Tensor):
        raise TypeError(f"cam: expected a torch.Tensor, got {type(cam).__name__}")
    cam = cam.detach().cpu().float()
    if cam.dim() == 3 and cam.shape[0] == 1:
        cam = cam[0]
    if cam.dim() != 2 or cam.numel() == 0:
        raise ValueError(f"cam: expected a non-empty [H, W] map, got shape {tuple(cam.shape)}")
    if cam.isnan().any():
        raise ValueError("cam: the map has NaN values, which no colour can show")
    if not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"colormap: unknown matplotlib colormap {colormap!r}") from None
    rgb = _image_array(image)
    height, width = rgb.shape[:2]
    cam = _resize(cam[None], (height, width))[0]
    if cam.min() < 0 or cam.max() > 1:
        cam = normalize_maps(cam)
    heat = torch.from_numpy(cmap(cam.clamp(0, 1).numpy())[..., :3]).float()
    blended = (1 - alpha) * rgb + alpha * heat
    return Image.fromarray((blended * 255).round().clamp(0, 255).to(torch.uint8).numpy())
