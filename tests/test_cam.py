"""fused_cbam.cam: class activation maps against their definition and Grad-CAM, the extractor's
hooks, the overlay, and the demo in quick mode."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import fused_cbam
from fused_cbam.cam import CAMExtractor, class_activation_map, overlay, spatial_attention_map
from helpers import COMPILED_BACKENDS, TOLERANCE, assert_close, make_input, runs_fused

BACKENDS = COMPILED_BACKENDS + [pytest.param("reference", "cpu", id="reference")]


def explicit_cam(features, fc_weight, idx):
    """The definition: sum over k of fc_weight[idx[n], k] * features[n, k], in float64."""
    return torch.einsum("nk,nkhw->nhw", fc_weight.double()[idx], features.double())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last", "strided"])
def test_cam_is_the_weighted_channel_sum(backend, device, dtype, memory_format):
    features = make_input((3, 40, 7, 9), dtype, device, memory_format)  # C=40: not a multiple of a vector
    fc_weight = torch.randn(5, 40, device=device)
    for class_idx, idx in ((2, [2, 2, 2]), ([4, 0, 3], [4, 0, 3]), (torch.tensor([1, 1, 0]), [1, 1, 0])):
        with runs_fused(backend, "spatial_pool"):
            cam = class_activation_map(features, fc_weight, class_idx, normalize=False, backend=backend)
        assert cam.shape == (3, 7, 9) and cam.dtype == dtype
        # the weights are used in the features' dtype, as the fused operator requires
        expected = explicit_cam(features, fc_weight.to(dtype), idx)
        assert_close(cam, expected, TOLERANCE[dtype], f"CAM for classes {idx}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_default_class_is_the_argmax_with_the_bias(backend, device):
    features = torch.randn(8, 16, 5, 5, device=device)
    fc_weight = torch.randn(4, 16, device=device)
    fc_bias = torch.tensor([0.0, 0.0, 0.0, 5.0], device=device)  # large enough to move some argmaxes
    for bias in (None, fc_bias):
        logits = features.mean(dim=(2, 3)) @ fc_weight.t() + (0 if bias is None else bias)
        predicted = logits.argmax(dim=1)
        with runs_fused(backend, "channel_pool", "spatial_pool"):  # the class from the pooled features
            cam = class_activation_map(features, fc_weight, fc_bias=bias, normalize=False, backend=backend)
        assert_close(cam, explicit_cam(features, fc_weight, predicted), 1e-5, "CAM of the predicted class")
    without_bias = features.mean(dim=(2, 3)) @ fc_weight.t()
    assert not torch.equal(without_bias.argmax(1), (without_bias + fc_bias).argmax(1)), "the bias must matter here"


def test_normalised_maps_span_zero_to_one_and_a_constant_map_gives_zeros():
    features = torch.randn(4, 8, 6, 6)
    features[1] = 0.0  # a constant map
    cam = class_activation_map(features, torch.randn(3, 8), 1)
    assert torch.isfinite(cam).all()
    for n in (0, 2, 3):
        assert cam[n].min().item() == 0.0 and cam[n].max().item() == pytest.approx(1.0)
    assert torch.equal(cam[1], torch.zeros(6, 6))
    raw = class_activation_map(features, torch.randn(3, 8), 1, normalize=False)
    assert raw.min() < 0 or raw.max() > 1  # unnormalised maps are left as they are


def test_a_map_with_nan_stays_nan_when_normalised():
    features = torch.randn(3, 8, 4, 5)
    features[1, 0, 2, 3] = float("nan")
    cam = class_activation_map(features, torch.randn(3, 8), 1)
    assert cam[1].isnan().all()  # not a silent map of zeros
    assert torch.isfinite(cam[[0, 2]]).all() and cam[[0, 2]].amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="cam: the map has NaN values"):
        overlay(torch.rand(3, 8, 8), cam[1])


@pytest.mark.parametrize("output_size,shape", [(32, (32, 32)), ((20, 28), (20, 28)), (np.array([20, 28]), (20, 28))])
def test_upsampled_shape_and_normalised_after_upsampling(output_size, shape):
    features, fc_weight = torch.randn(2, 8, 5, 7), torch.randn(3, 8)
    cam = class_activation_map(features, fc_weight, [0, 2], output_size=output_size)
    assert cam.shape == (2, *shape)
    assert cam.amin(dim=(1, 2)).tolist() == [0.0, 0.0]
    assert cam.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])
    raw = class_activation_map(features, fc_weight, [0, 2], normalize=False)
    expected = F.interpolate(raw[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
    assert_close(
        class_activation_map(features, fc_weight, [0, 2], normalize=False, output_size=output_size), expected, 1e-6
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_cam_equals_grad_cam_up_to_relu_and_area_for_a_gap_fc_head(backend, device):
    """Grad-CAM weights are the spatial mean of dScore/dF_k = fc_weight[c, k] / (H W) for a
    GAP + FC head, so Grad-CAM = ReLU(sum_k fc_weight[c, k] / (H W) * F_k) = ReLU(CAM) / (H W)."""
    n, c, h, w = 3, 12, 6, 5
    features = torch.randn(n, c, h, w, dtype=torch.float64, device=device, requires_grad=True)
    head = nn.Linear(c, 4).double().to(device)
    scores = head(features.mean(dim=(2, 3)))
    classes = scores.argmax(dim=1)
    (grads,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), features)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    grad_cam = F.relu((alpha * features).sum(dim=1))
    cam = class_activation_map(
        features.detach(), head.weight.detach(), fc_bias=head.bias.detach(), normalize=False, backend=backend
    )
    assert_close(F.relu(cam) / (h * w), grad_cam, 1e-12, "ReLU(CAM) / (H W) vs Grad-CAM")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_spatial_attention_map_is_the_channel_mean(backend, device):
    features = make_input((2, 9, 4, 6), torch.float32, device, "channels_last")
    with runs_fused(backend, "spatial_pool"):
        attention = spatial_attention_map(features, normalize=False, backend=backend)
    assert_close(attention, features.mean(dim=1), 1e-6)
    normalised = spatial_attention_map(features, backend=backend)
    assert normalised.amin(dim=(1, 2)).tolist() == [0.0, 0.0]
    assert normalised.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])
    assert spatial_attention_map(features, output_size=12, backend=backend).shape == (2, 12, 12)


def test_empty_batch():
    for class_idx in (None, 1, [], torch.empty(0, dtype=torch.long)):
        assert class_activation_map(torch.randn(0, 4, 3, 3), torch.randn(2, 4), class_idx).shape == (0, 3, 3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"fc_weight": torch.randn(3, 7)}, ValueError, r"fc_weight: expected shape \[num_classes, 8\].*got \(3, 7\)"),
        ({"fc_weight": torch.randn(3, 8, 1)}, ValueError, r"fc_weight: expected shape \[num_classes, 8\]"),
        ({"fc_weight": [[1.0] * 8]}, TypeError, "fc_weight: expected a torch.Tensor"),
        ({"fc_weight": torch.ones(3, 8, dtype=torch.long)}, TypeError, "fc_weight: expected a floating-point"),
        ({"class_idx": 3}, ValueError, r"class_idx: expected indices in \[0, 3\)"),
        ({"class_idx": [0, -1]}, ValueError, r"class_idx: expected indices in \[0, 3\)"),
        ({"class_idx": [0, 1, 2]}, ValueError, r"class_idx: expected an int or one index per sample, shape \(2,\)"),
        ({"class_idx": 1.0}, TypeError, "class_idx: expected integer class indices"),
        ({"class_idx": "a"}, TypeError, "class_idx: expected None, an int or a sequence of ints"),
        ({"fc_bias": torch.randn(4)}, ValueError, r"fc_bias: expected shape \(3,\)"),
        ({"output_size": (4, 0)}, ValueError, "output_size: expected a positive int or"),
        ({"output_size": 4.0}, ValueError, "output_size: expected a positive int or"),
        ({"output_size": True}, ValueError, "output_size: expected a positive int or"),
        ({"features": torch.randn(2, 8, 4)}, ValueError, "features: expected a 4-D tensor"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = {"features": torch.randn(2, 8, 4, 4), "fc_weight": torch.randn(3, 8), **kwargs}
    with pytest.raises(error, match=match):
        class_activation_map(**args)


class TinyNet(nn.Module):
    """Conv features, a CBAM block (by default the fused official one, whose channel gate holds
    two nn.Linear), GAP, FC."""

    def __init__(self, conv_head=False, attention=None):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.attention = attention or fused_cbam.nn.CBAM(16, reduction_ratio=4)
        self.head = nn.Conv2d(16, 5, 1) if conv_head else nn.Linear(16, 5)
        self.conv_head = conv_head

    def forward(self, x):
        f = self.attention(self.features(x))
        if self.conv_head:
            return self.head(f).mean(dim=(2, 3))
        return self.head(f.mean(dim=(2, 3)))


@pytest.mark.parametrize("conv_head", [False, True], ids=["linear", "1x1-conv"])
@pytest.mark.parametrize("target", ["attention", "module"])
def test_extractor_finds_the_classifier_matches_the_function_and_removes_its_hook(conv_head, target):
    model = TinyNet(conv_head).eval()
    layer = model.attention if target == "module" else target
    x = torch.randn(2, 3, 10, 12)
    with CAMExtractor(model, layer) as extractor:
        assert extractor.fc_layer is model.head  # the Linear layers inside CBAM do not count
        assert len(model.attention._forward_hooks) == 1
        with torch.no_grad():
            logits = model(x)
            features = model.attention(model.features(x))
        maps = extractor(output_size=x.shape[-2:])
        raw = extractor(class_idx=[1, 3], normalize=False)
    assert len(model.attention._forward_hooks) == 0
    weight = model.head.weight.flatten(1)
    # the predicted class of the extractor is the model's (a 1x1 conv head commutes with GAP)
    expected = class_activation_map(features, weight, logits.argmax(1), output_size=(10, 12))
    assert_close(maps, expected, 1e-6, "extractor maps")
    assert_close(raw, explicit_cam(features, weight, [1, 3]), 1e-5, "extractor raw maps")
    extractor.features = None
    model(x)
    assert extractor.features is None  # no hook left to fire


class MaxPoolNet(TinyNet):
    """A head that pools by max (timm's global_pool="max"): its prediction is not that of
    average pooling and the classifier."""

    def forward(self, x):
        return self.head(self.attention(self.features(x)).amax(dim=(2, 3)))


def test_extractor_predicts_the_classes_the_model_predicts():
    torch.manual_seed(0)
    model = MaxPoolNet().eval()
    x = torch.randn(16, 3, 10, 12)
    with CAMExtractor(model, "attention") as extractor, torch.no_grad():
        predicted = model(x).argmax(1)
        maps = extractor(normalize=False)
        features = extractor.features
    gap_prediction = (features.mean(dim=(2, 3)) @ model.head.weight.t() + model.head.bias).argmax(1)
    assert not torch.equal(gap_prediction, predicted), "average pooling must predict otherwise here"
    assert_close(maps, explicit_cam(features, model.head.weight, predicted), 1e-5, "maps of the model's classes")


def _unfused(layout):
    from layouts import MMYolo, Official, Ultralytics

    timm_cbam = pytest.importorskip("timm.layers.cbam")
    return {"official": lambda: Official.CBAM(16, 4), "timm": lambda: timm_cbam.CbamModule(16, rd_ratio=1 / 4),
            "ultralytics": lambda: Ultralytics.CBAM(16), "mmyolo": lambda: MMYolo.CBAM(16, 4, 7)}[layout]()  # fmt: skip


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("layout", ["official", "timm", "ultralytics", "mmyolo"])
def test_extractor_skips_the_layers_of_every_cbam_layout(layout, fused):
    """The channel MLPs of CBAM blocks (Linear layers or 1x1 convs, in every layout, converted or
    not) are not taken for a 1x1-conv classifier."""
    block = _unfused(layout)
    model = TinyNet(conv_head=True, attention=block)
    if fused:
        fused_cbam.convert(model)
    with CAMExtractor(model, "attention") as extractor:
        assert extractor.fc_layer is model.head


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("layout", ["official", "timm", "ultralytics", "mmyolo"])
def test_extractor_skips_the_layers_of_a_channel_half_used_alone(layout, fused):
    """A channel attention half used on its own (its MLP of Linear layers or 1x1 convs) is not
    taken for a 1x1-conv classifier either."""
    half = {"official": "ChannelGate", "timm": "channel"}.get(layout, "channel_attention")
    block = _unfused(layout)
    if fused:
        block = fused_cbam.convert(block)
    model = TinyNet(conv_head=True, attention=getattr(block, half))
    with CAMExtractor(model, "attention") as extractor:
        assert extractor.fc_layer is model.head


def test_extractor_hook_is_removed_when_the_block_raises():
    model = TinyNet()
    with pytest.raises(RuntimeError, match="boom"), CAMExtractor(model, "attention"):
        raise RuntimeError("boom")
    assert len(model.attention._forward_hooks) == 0


def test_extractor_errors():
    model = TinyNet()
    with pytest.raises(ValueError, match="target_layer: the model has no submodule named 'nope'"):
        CAMExtractor(model, "nope")
    with pytest.raises(ValueError, match="target_layer: the module given is not part of the model"):
        CAMExtractor(model, nn.ReLU())
    with pytest.raises(TypeError, match="fc_layer: expected an nn.Linear or a 1x1 nn.Conv2d"):
        CAMExtractor(model, "attention", fc_layer="features.0")
    two_heads = nn.Sequential(model, nn.Linear(5, 5))
    with pytest.raises(ValueError, match=r"fc_layer: the model has several nn.Linear layers \['0.head', '1'\]"):
        CAMExtractor(two_heads, "0.attention")
    extractor = CAMExtractor(two_heads, "0.attention", fc_layer="0.head")
    with pytest.raises(RuntimeError, match="run a forward pass"):
        extractor()
    extractor.remove()
    extractor.remove()  # idempotent
    assert len(model.attention._forward_hooks) == 0


@pytest.mark.parametrize(
    "image",
    [
        torch.rand(3, 20, 30),
        torch.rand(20, 30, 3),
        (torch.rand(3, 20, 30) * 255).to(torch.uint8),
        torch.rand(20, 30),
        Image.new("RGB", (30, 20), (10, 200, 30)),
    ],
    ids=["chw-float", "hwc-float", "chw-uint8", "gray", "pil"],
)
def test_overlay_is_an_rgb_image_of_the_image_size(image):
    out = overlay(image, torch.randn(5, 7), alpha=0.4)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (30, 20)


def test_overlay_blends_with_alpha():
    image = torch.rand(3, 8, 8)
    plain = torch.from_numpy(np.array(overlay(image, torch.rand(4, 4), alpha=0.0))).float()
    expected = (image.permute(1, 2, 0) * 255).round()
    assert (plain - expected).abs().max() <= 1
    cam = torch.zeros(8, 8)
    cam[2, 3] = 1.0
    heat = overlay(image, cam, alpha=1.0, colormap="gray")
    assert heat.getpixel((3, 2)) == (255, 255, 255) and heat.getpixel((0, 0)) == (0, 0, 0)
    for alpha in (1.5, "a"):
        with pytest.raises(ValueError, match="alpha: expected a value in"):
            overlay(image, cam, alpha=alpha)
    with pytest.raises(ValueError, match="colormap: unknown matplotlib colormap"):
        overlay(image, cam, colormap="no-such-map")
    with pytest.raises(ValueError, match=r"image: expected \[3, H, W\]"):
        overlay(torch.rand(2, 8, 8), cam)


def test_demo_quick_mode_passes_its_floors(tmp_path):
    from fused_cbam.demo import MODES

    proc = subprocess.run(
        [sys.executable, "-m", "fused_cbam.demo", "--quick", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"accuracy=(\d\.\d{3}) cam_localization=(\d\.\d{3})", last)
    assert match, f"unexpected last line: {last!r}"
    floors = MODES["quick"]["floors"]
    assert float(match[1]) >= floors["accuracy"] and float(match[2]) >= floors["cam_localization"], last
    assert (tmp_path / "cam_grid.png").stat().st_size > 0
    with Image.open(tmp_path / "cam_grid.png") as grid:
        assert grid.format == "PNG"
