"""Every CBAM layout users have, converted by fused_cbam.convert (or built as the fused module)
and compared with the original: output, every gradient, BN state, checkpoints, compile, export."""

import copy
import logging
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
import official_cbam
import timm.layers.cbam as timm_cbam
from timm.layers.cbam import CbamModule as TimmCbamModule
from timm.layers.cbam import LightCbamModule as TimmLightCbamModule
from torch import nn

import fused_cbam
from helpers import COMPILED_BACKENDS, TOLERANCE, OperatorLog, assert_close, make_input, skip_unless_available
from layouts import MMYolo, Official, Ultralytics

C = 32
SHAPE = (2, C, 9, 11)  # odd H and W, more than one row of pixels
STEM_CHANNELS = 8
BACKENDS = COMPILED_BACKENDS + [pytest.param("reference", "cpu", id="reference")]

# lp/lse pooling warns once that it runs in plain PyTorch; test_lp_and_lse_pools_warn_once checks it.
pytestmark = pytest.mark.filterwarnings("ignore:fused_cbam.nn.ChannelGate. pool_types")


@dataclass
class Layout:
    original: type
    fused: type
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def make_original(self) -> nn.Module:
        return self.original(*self.args, **self.kwargs)

    def make_fused(self, backend) -> nn.Module:
        return self.fused(*self.args, **self.kwargs, backend=backend)


LAYOUTS = {
    "official": Layout(Official.CBAM, fused_cbam.nn.CBAM, (C,)),
    "official-no_spatial": Layout(Official.CBAM, fused_cbam.nn.CBAM, (C,), {"no_spatial": True}),
    "official-lp-lse": Layout(Official.CBAM, fused_cbam.nn.CBAM, (C, 8, ("avg", "max", "lp", "lse"))),
    "timm": Layout(TimmCbamModule, fused_cbam.nn.CbamModule, (C,)),
    "timm-options": Layout(
        TimmCbamModule,
        fused_cbam.nn.CbamModule,
        (C,),
        {"rd_ratio": 1 / 6, "rd_divisor": 4, "spatial_kernel_size": 3, "gate_layer": "hard_sigmoid", "mlp_bias": True},
    ),
    "timm-light": Layout(TimmLightCbamModule, fused_cbam.nn.LightCbamModule, (C,), {"gate_layer": "hard_sigmoid"}),
    "ultralytics-k7": Layout(Ultralytics.CBAM, fused_cbam.nn.UltralyticsCBAM, (C,)),
    "ultralytics-k3": Layout(Ultralytics.CBAM, fused_cbam.nn.UltralyticsCBAM, (C, 3)),
    "mmyolo": Layout(MMYolo.CBAM, fused_cbam.nn.MMYoloCBAM, (C, 8, 7)),
    "mmyolo-prelu-k3": Layout(MMYolo.CBAM, fused_cbam.nn.MMYoloCBAM, (C, 8, 3), {"act_cfg": {"type": "PReLU"}}),
}
LAYOUT_IDS = list(LAYOUTS)


def _half_names(layout: str) -> list[str]:
    """The attribute names of the layout's channel and spatial halves."""
    if layout.startswith("official"):
        return ["ChannelGate"] + ([] if "no_spatial" in layout else ["SpatialGate"])
    return ["channel", "spatial"] if layout.startswith("timm") else ["channel_attention", "spatial_attention"]


class Deep(nn.Module):
    """A block placed three levels down (in a ModuleList, in a Sequential), after a conv."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(STEM_CHANNELS, C, 1)
        self.stages = nn.ModuleList([nn.Sequential(nn.Identity(), block)])

    def forward(self, x):
        return self.stages[0](self.stem(x))


def _randomized(model: nn.Module) -> nn.Module:
    """Non-trivial weights and BN running statistics, so that eval mode means something."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _original(layout: str, placement: str, device) -> tuple[nn.Module, tuple]:
    block = LAYOUTS[layout].make_original()
    model = block if placement == "shallow" else Deep(block)
    shape = SHAPE if placement == "shallow" else (SHAPE[0], STEM_CHANNELS, *SHAPE[2:])
    return _randomized(model).to(device), shape


def _fused_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, fused_cbam.nn.FusedBlock)]


def _compare_step(model, original, x, atol=1e-5, forward=None):
    """One forward and backward of both (of ``forward``, e.g. a compiled model, in place of the
    model's own); compare output, input and parameter gradients, buffers."""
    x_ref = x.detach().clone().requires_grad_()
    out, ref = (model if forward is None else forward)(x), original(x_ref)
    assert_close(out, ref, atol, "output")
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_close(x.grad, x_ref.grad, atol, "grad of x")
    original_params = dict(original.named_parameters())
    assert set(dict(model.named_parameters())) == set(original_params)
    for name, p in model.named_parameters():
        assert_close(p.grad, original_params[name].grad, 10 * atol, f"grad of {name}")
    original_buffers = dict(original.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, original_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("placement,memory_format", [("shallow", "nchw"), ("deep", "channels_last")])
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_converted_matches_original(layout, placement, memory_format, train, backend, device):
    original, shape = _original(layout, placement, device)
    model = copy.deepcopy(original)
    tensors = model.state_dict(keep_vars=True)
    model = fused_cbam.convert(model, backend=backend)
    (block,) = _fused_blocks(model)
    assert type(block) is LAYOUTS[layout].fused and block.backend == backend
    converted = model.state_dict(keep_vars=True)
    assert list(converted) == list(tensors)
    assert all(converted[k] is tensors[k] for k in tensors), "the converted model holds other tensors"
    original.train(train)
    model.train(train)
    x = make_input(shape, torch.float32, device, memory_format, requires_grad=True)
    _compare_step(model, original, x)


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_convert_keeps_each_modules_mode(layout):
    """A model converted in eval mode stays in eval mode, the fused block and its halves too (a
    traced graph and the inference path go by the block's flag), and a part the user left in
    training mode inside it stays so."""
    original, _ = _original(layout, "shallow", "cpu")
    original.eval()
    trained = [name for name, module in original.named_modules() if list(module.parameters(recurse=False))][-1]
    original.get_submodule(trained).train()
    model = fused_cbam.convert(copy.deepcopy(original))
    training = {name for name, module in original.named_modules() if module.training}
    assert trained in training
    assert {name for name, module in model.named_modules() if module.training} == training


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_converted_inference_matches_original_and_takes_the_native_path(layout, backend, device):
    """Eval mode without gradients, where the fused modules may take the one-operator inference
    path: a converted model (holding the user's own submodules) gives the original's output, and
    takes that path exactly when the natively built module does."""
    original, shape = _original(layout, "shallow", device)
    model = fused_cbam.convert(copy.deepcopy(original), backend=backend).eval()
    native = LAYOUTS[layout].make_fused(backend).to(device).eval()
    x = make_input(shape, torch.float32, device)
    with torch.no_grad():
        with OperatorLog() as log:
            out = model(x)
        with OperatorLog() as native_log:
            native(x)
        assert_close(out, original.eval()(x), 1e-5, "output")
    took = [any(name.endswith("cbam_inference") for name in names) for names in (log.names, native_log.names)]
    assert took[0] == took[1], f"converted takes the inference operator: {took[0]}, native: {took[1]}"


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_checkpoints_load_both_ways_with_strict(layout):
    original, _ = _original(layout, "deep", "cpu")
    converted = fused_cbam.convert(_original(layout, "deep", "cpu")[0], backend="reference")
    converted.load_state_dict(original.state_dict(), strict=True)
    fresh, _ = _original(layout, "deep", "cpu")
    fresh.load_state_dict(converted.state_dict(), strict=True)
    for (name, a), (name_b, b) in zip(fresh.state_dict().items(), original.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_fused_constructor_builds_the_layout(layout):
    """The fused class takes the layout's own constructor arguments and loads its checkpoint."""
    spec = LAYOUTS[layout]
    original = _randomized(spec.make_original()).eval()
    fused = spec.make_fused("cpu").eval()
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict(), strict=True)
    x = make_input(SHAPE, torch.float32, "cpu")
    assert_close(fused(x), original(x), 1e-5, "output")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rd_ratio": 1 / 6, "rd_divisor": 4},
        {"rd_ratio": 1 / 3, "rd_divisor": 8},
        {"rd_ratio": 0.001},  # rounds to 0: at least one
        {"rd_channels": 5},
    ],
    ids=str,
)
def test_timm_hidden_size_rule(kwargs):
    for channels in (24, 32, 100):
        ours = fused_cbam.nn.CbamModule(channels, **kwargs).channel.fc1.out_channels
        assert ours == TimmCbamModule(channels, **kwargs).channel.fc1.out_channels, channels


@pytest.mark.parametrize("attn_layer,train", [("cbam", True), ("lcbam", False)])
def test_timm_resnet18(attn_layer, train, caplog):
    """timm's real modules in a timm model: a train step with cbam, eval with lcbam (the block
    tests cover each layout in both modes)."""
    original = _randomized(timm.create_model("resnet18", num_classes=10, block_args=dict(attn_layer=attn_layer)))
    model = copy.deepcopy(original)
    with caplog.at_level(logging.INFO, logger="fused_cbam.convert"):
        model = fused_cbam.convert(model, backend="cpu")
    replaced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("replaced")]
    assert len(replaced) == 8 and len(_fused_blocks(model)) == 8, replaced
    original.train(train)
    model.train(train)
    x = make_input((2, 3, 64, 64), torch.float32, "cpu", requires_grad=True)
    _compare_step(model, original, x, atol=1e-4)


def test_timm_resnet18_mixed_precision_training_step():
    """The usual setting of training on a GPU, with the CPU's autocast: a converted timm model in
    float32 under a bfloat16 autocast, where each block gets x in bfloat16 from the BatchNorm
    before it. Every block takes the whole-block operator, which gives the step of the blocks'
    three operators bit for bit, and the original model's output within bfloat16's rounding (its
    gradients differ from the original's by up to 0.29 of their largest value here, as the
    reference backend's do: a bfloat16 resnet18 with these weights is that sensitive)."""
    skip_unless_available("cpu")
    original = _randomized(timm.create_model("resnet18", num_classes=10, block_args=dict(attn_layer="cbam")))
    model = fused_cbam.convert(copy.deepcopy(original), backend="cpu")
    three_operators = copy.deepcopy(model)
    for block in _fused_blocks(three_operators):
        block.keep_gates = True  # (which the whole-block operator does not serve)
    x = make_input((2, 3, 64, 64), torch.float32, "cpu")
    grad = torch.randn(2, 10)

    def step(net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.backward(grad)
        return out, [p.grad for p in net.parameters()], _autograd_node_names(out)

    (out, grads, nodes), (want, want_grads, want_nodes) = step(model), step(three_operators)
    assert sum("CbamTraining" in name for name in nodes) == 8
    assert not any("CbamTraining" in name for name in want_nodes)
    assert torch.equal(out, want) and all(map(torch.equal, grads, want_grads))
    assert_close(out, step(original)[0], TOLERANCE[torch.bfloat16], "output", rounded_once=False)


def _autograd_node_names(out: torch.Tensor) -> list[str]:
    """The names of the autograd nodes of the graph that computed ``out``."""
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(child for child, _ in node.next_functions)
    return names


def test_log_names_what_was_replaced_and_why_the_rest_was_skipped(caplog):
    class CBAM(nn.Module):  # a CBAM-named module of no known layout
        def __init__(self):
            super().__init__()
            self.attention = nn.Linear(C, C)

    class MyCbamBlock(nn.Module):  # CBAM-like name, not a known class name
        pass

    model = nn.Sequential(Official.CBAM(C), nn.Sequential(CBAM(), MyCbamBlock()), nn.Conv2d(C, C, 1))
    untouched = [model[1][0], model[1][1], model[2]]
    with caplog.at_level(logging.INFO, logger="fused_cbam.convert"):
        assert fused_cbam.convert(model) is model
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("replaced 0 (CBAM, official layout) with fused_cbam.nn.CBAM")
    assert messages[1].startswith("skipped 1.0 (CBAM): not the official layout: no submodule ChannelGate.mlp")
    assert "not the ultralytics layout" in messages[1] and "not the mmyolo layout" in messages[1]
    assert messages[2].startswith("skipped 1.1 (MyCbamBlock): not a known CBAM class name")
    assert len(messages) == 3
    assert [model[1][0], model[1][1], model[2]] == untouched


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("reparametrization", ["prune", "weight_norm"])
def test_convert_takes_blocks_whose_parts_are_pruned_or_weight_normed(reparametrization):
    """Pruning (``weight_orig``, ``weight_mask``) and weight_norm (``weight_g``, ``weight_v``)
    replace a part's weight by tensors that a hook combines before each forward: the fused block
    takes the part over with its hook, and trains as the original does (pruned models cannot be
    deep-copied, so each is built twice from one seed)."""
    import torch.nn.utils.prune as prune

    def make():
        torch.manual_seed(0)
        model = _randomized(Deep(Official.CBAM(C, 4)))
        if reparametrization == "prune":
            parts = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            prune.global_unstructured(parts, pruning_method=prune.L1Unstructured, amount=0.3)
        else:
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    torch.nn.utils.weight_norm(m)
        return model

    original, model = make(), fused_cbam.convert(make(), backend="cpu")
    assert len(_fused_blocks(model)) == 1
    x = make_input((SHAPE[0], STEM_CHANNELS, *SHAPE[2:]), torch.float32, "cpu", requires_grad=True)
    _compare_step(model, original, x)
    # The hooks must recompute the weights from their tensors: change those alike in both.
    with torch.no_grad():
        for m in (model, original):
            for name, p in m.named_parameters():
                if name.endswith(("weight_orig", "weight_g")):
                    p.mul_(1.5)
    for train in (True, False):
        with torch.no_grad():
            assert_close(model.train(train)(x), original.train(train)(x), 1e-5, f"output, train={train}")


def test_convert_leaves_the_global_random_generator_as_it_was():
    """The fused modules it builds initialise parameters that it then replaces by the model's:
    the user's next random numbers (dropout, shuffling) are those they would have been."""
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"))
    state = torch.get_rng_state()
    fused_cbam.convert(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_convert_again_sets_the_backend_and_keeps_shared_modules_shared():
    block = Ultralytics.CBAM(C)
    model = fused_cbam.convert(nn.Sequential(block, block), backend="cpu")
    assert model[0] is model[1] and model[0].backend == "cpu"
    fused = model[0]
    assert fused_cbam.convert(model, backend="reference") is model
    assert model[0] is fused and fused.backend == "reference"
    with pytest.raises(ValueError, match="backend: expected one of"):
        fused_cbam.convert(model, backend="fast")


def test_reference_backend_exports_without_custom_operators():
    model = fused_cbam.convert(_original("timm", "deep", "cpu")[0], backend="reference").eval()
    x = make_input((2, STEM_CHANNELS, 9, 11), torch.float32, "cpu")
    graph = torch.export.export(model, (x,)).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert targets and not [t for t in targets if "fused_cbam" in t]


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
def test_torch_compile_fullgraph_over_a_converted_model(backend, device):
    original, shape = _original("timm", "deep", device)
    model = fused_cbam.convert(copy.deepcopy(original), backend=backend)
    x = make_input(shape, torch.float32, device, requires_grad=True)
    _compare_step(model, original, x, forward=torch.compile(model, fullgraph=True))


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_every_layout_keeps_its_gates_when_asked(layout):
    block = fused_cbam.convert(_original(layout, "shallow", "cpu")[0], backend="reference")
    x = make_input(SHAPE, torch.float32, "cpu")
    block(x)
    assert block.last_channel_gate is None
    block.keep_gates = True
    out = block(x)
    g, h = block.last_channel_gate, block.last_spatial_gate
    assert g.shape == (2, C) and not g.requires_grad
    expected = x * g[:, :, None, None]
    if "no_spatial" in layout:
        assert h is None
    else:
        assert h.shape == (2, 1, *SHAPE[2:])
        expected = expected * h
    assert_close(out, expected, 1e-6, "output from the kept gates")


def test_lp_and_lse_pools_warn_once(monkeypatch):
    monkeypatch.setattr(fused_cbam.nn.official, "_warned_reference_pools", False)
    with pytest.warns(UserWarning, match="'lp'/'lse', which are pooled in plain PyTorch"):
        fused_cbam.nn.CBAM(C, pool_types=("avg", "lse"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_cbam.nn.CBAM(C, pool_types=("lp",))
        fused_cbam.nn.CBAM(C)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "fx"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("layout", [name for name in LAYOUT_IDS if "no_spatial" not in name])
def test_spatial_conv_gets_channels_last_maps_on_the_cpu(layout, memory_format, traced):
    """oneDNN's conv over NCHW maps of 1-2 channels pads them to 16 (benchmarks/NOTES.md): on the
    CPU, each layout's spatial conv must see channels_last strides, one-channel maps included,
    also in an FX-traced graph."""
    block = fused_cbam.convert(_original(layout, "shallow", "cpu")[0], backend="reference").train()
    if traced:
        block = torch.fx.symbolic_trace(block)
    seen = []
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert len(convs) == 1
    convs[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    block(make_input(SHAPE, torch.float32, "cpu", memory_format, requires_grad=True)).sum().backward()
    (maps,) = seen
    assert maps.stride() == torch.empty_like(maps, memory_format=torch.channels_last).stride()


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_meta_device_forward_and_backward(layout):
    """Shape inference on the meta device (as model-summary tools and deferred initialisation
    use it): the reference operators run there, in training and in eval."""
    block = LAYOUTS[layout].make_fused("auto").to("meta")
    x = torch.randn(SHAPE, device="meta", requires_grad=True)
    out = block(x)
    out.sum().backward()
    assert out.shape == x.grad.shape == SHAPE and out.device.type == "meta"
    with torch.no_grad():
        assert block.eval()(x).shape == SHAPE


def test_fx_traces_a_converted_model_with_fused_blocks_as_leaves():
    """The README's way to FX-trace a converted model: a tracer that keeps fused blocks whole."""

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, qualname):
            return isinstance(module, fused_cbam.nn.FusedBlock) or super().is_leaf_module(module, qualname)

    model = fused_cbam.convert(_original("official", "deep", "cpu")[0], backend="auto").eval()
    traced = torch.fx.GraphModule(model, LeafTracer().trace(model))
    x = make_input((SHAPE[0], STEM_CHANNELS, *SHAPE[2:]), torch.float32, "cpu")
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("built,memory_format", [("converted", "nchw"), ("native", "channels_last")])
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_each_half_called_alone_matches_the_original_half(layout, built, memory_format, train, backend, device):
    """Code that calls a block's halves on their own (the official ``ChannelGate``, timm's
    ``channel``/``spatial``, ...) gets what the original half computes, gradients included."""
    original, shape = _original(layout, "shallow", device)
    if built == "converted":
        block = fused_cbam.convert(copy.deepcopy(original), backend=backend)
    else:
        block = LAYOUTS[layout].make_fused(backend).to(device)
        block.load_state_dict(original.state_dict(), strict=True)
    original.train(train)
    block.train(train)
    for name in _half_names(layout):
        half = getattr(block, name)
        assert isinstance(half, fused_cbam.nn.Half) and half.backend == backend
        x = make_input(shape, torch.float32, device, memory_format, requires_grad=True)
        _compare_step(half, getattr(original, name), x)


def test_the_block_keeps_its_halves_on_its_backend():
    block = fused_cbam.nn.CbamModule(C, backend="cpu")
    assert block.channel.backend == block.spatial.backend == "cpu"
    block.backend = "reference"
    assert block.channel.backend == block.spatial.backend == "reference"
    model = fused_cbam.convert(Official.CBAM(C), backend="reference")
    assert model.ChannelGate.backend == model.SpatialGate.backend == "reference"
    fused_cbam.convert(model, backend="cpu")
    assert model.ChannelGate.backend == model.SpatialGate.backend == "cpu"
    for module in (block, block.channel):
        with pytest.raises(ValueError, match="backend: expected one of"):
            module.backend = "fast"
    with pytest.raises(ValueError, match="x: expected 32 channels"):
        block.channel(make_input((2, 8, 3, 3), torch.float32, "cpu"))


@pytest.mark.parametrize("act_cfg", [None, {"type": "LeakyReLU", "negative_slope": 0.2}, {"type": "SiLU"}], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_mmyolo_act_cfg(act_cfg, train):
    """mmyolo's ``act_cfg`` (the MLP's activation; None: none) as mmcv builds it, converted or
    built directly; the inference operator (a ReLU MLP) is not used for the others."""
    original = _randomized(MMYolo.CBAM(C, 8, 7, act_cfg=act_cfg)).train(train)
    converted = fused_cbam.convert(copy.deepcopy(original), backend="cpu")
    native = fused_cbam.nn.MMYoloCBAM(C, 8, 7, act_cfg=act_cfg, backend="cpu").train(train)
    native.load_state_dict(original.state_dict(), strict=True)
    for block in (converted, native):
        assert type(block) is fused_cbam.nn.MMYoloCBAM and block._plain() is None
        original.train(train).zero_grad()
        x = make_input(SHAPE, torch.float32, "cpu", requires_grad=True)
        _compare_step(block, original, x)
        with torch.no_grad(), OperatorLog() as log:
            assert_close(block.eval()(x), original.eval()(x), 1e-5, "eval output")
        assert not [name for name in log.names if name.endswith("cbam_inference")]
    activate = native.channel_attention.fc[0].activate
    assert type(activate) is (nn.Identity if act_cfg is None else getattr(nn, act_cfg["type"]))
    assert act_cfg is None or activate.inplace  # ConvModule's default for activations that take it


def test_mmyolo_convs_are_initialised_as_mmcv_initialises_them():
    """mmcv's ConvModule: Kaiming normal with fan-out for its activation (ReLU, or LeakyReLU with
    its slope), zero bias; the same random draws as that init after nn.Conv2d's own."""
    torch.manual_seed(0)
    block = fused_cbam.nn.MMYoloCBAM(C, 8, 7, act_cfg={"type": "LeakyReLU", "negative_slope": 0.3})
    torch.manual_seed(0)
    expected = []
    for shape, slope in (((C, 4, 1), 0.3), ((4, C, 1), 0), ((2, 1, 7), 0)):
        conv = nn.Conv2d(*shape)  # its own init draws first, as in the block
        nonlinearity = "leaky_relu" if slope else "relu"
        nn.init.kaiming_normal_(conv.weight, a=slope, mode="fan_out", nonlinearity=nonlinearity)
        expected.append(conv.weight)
    convs = [block.channel_attention.fc[0].conv, block.channel_attention.fc[1].conv, block.spatial_attention.conv.conv]
    for conv, weight in zip(convs, expected):
        assert torch.equal(conv.weight, weight) and not conv.bias.any()


def test_mmyolo_init_weights_as_mmengine(monkeypatch):
    """mmengine's BaseModule.init_weights for mmyolo's CBAM, once: init_cfg's initialisers, then
    the spatial conv module's own init (mmcv's ConvModule's), then a Pretrained init_cfg."""
    block = fused_cbam.nn.MMYoloCBAM(C, init_cfg=None)
    spatial = block.spatial_attention.conv.conv.weight.clone()
    mlp = block.channel_attention.fc[0].conv.weight.clone()
    block.init_weights()  # no mmengine needed
    assert not torch.equal(block.spatial_attention.conv.conv.weight, spatial)
    assert torch.equal(block.channel_attention.fc[0].conv.weight, mlp) and block.is_init

    configs = [{"type": "Pretrained", "checkpoint": "x.pth"}, {"type": "Normal", "layer": "Conv2d"}]
    block = fused_cbam.nn.MMYoloCBAM(C, init_cfg=configs)
    assert block.init_cfg == configs and block.init_cfg is not configs
    monkeypatch.setitem(sys.modules, "mmengine", None)  # not installed
    with pytest.raises(ImportError, match="init_cfg needs mmengine"):
        block.init_weights()
    calls = []
    mmengine, model = types.ModuleType("mmengine"), types.ModuleType("mmengine.model")
    model.initialize = lambda module, init_cfg: calls.append((module, init_cfg, module.spatial_attention.conv.conv.weight.clone()))
    monkeypatch.setitem(sys.modules, "mmengine", mmengine)
    monkeypatch.setitem(sys.modules, "mmengine.model", model)
    block.init_weights()
    block.init_weights()  # once
    assert [(m, cfg) for m, cfg, _ in calls] == [(block, configs[1:]), (block, configs[:1])]
    assert not torch.equal(calls[0][2], calls[1][2]), "the spatial conv is initialised again in between"
    assert fused_cbam.convert(MMYolo.CBAM(C, 8)).init_cfg is None
    original = MMYolo.CBAM(C, 8)
    original.init_cfg = configs
    assert fused_cbam.convert(original).init_cfg == configs


def test_convert_says_a_traced_model_has_no_blocks_left(caplog):
    traced = torch.fx.symbolic_trace(Deep(Ultralytics.CBAM(C)))  # its blocks inlined by the trace
    plain = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(C, C, 1), nn.ReLU()))  # never had one
    with caplog.at_level(logging.INFO, logger="fused_cbam.convert"):
        assert fused_cbam.convert(traced) is traced and fused_cbam.convert(plain) is plain
    (message,) = [r.getMessage() for r in caplog.records]
    assert "FX GraphModule that holds CBAM parts (stages.0.1.channel_attention.fc)" in message
    assert "convert the model before tracing it" in message


@pytest.mark.parametrize("name", ["channel_attention", "spatial_attention"])
def test_mmyolo_halves_give_their_gate_in_the_dtype_autocast_gives(name):
    """mmyolo's halves return the gate itself: under autocast, in the dtype its conv gives, as
    mmyolo's do (a block's output stays in x's dtype)."""
    original = _randomized(MMYolo.CBAM(C, 8))
    block = fused_cbam.convert(copy.deepcopy(original), backend="cpu")
    x = make_input(SHAPE, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = getattr(block, name)(x), getattr(original, name)(x)
        assert block(x).dtype == torch.float32
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out, ref, 1e-2, name)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torch_jit_script_says_what_to_use_instead():
    model = fused_cbam.convert(Deep(Official.CBAM(C)), backend="reference")
    for module in (model, fused_cbam.nn.ChannelAttn(C)):
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile fused_cbam's modules"):
            torch.jit.script(module)


@pytest.mark.filterwarnings("ignore:`torch.jit.(trace|trace_method)` is deprecated")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input checks are constants there
@pytest.mark.parametrize(
    "mode",
    ["train", "eval", "eval-no_grad", "eval-frozen", "eval-frozen-no_grad"],
)
@pytest.mark.parametrize("layout", ["official", "timm", "timm-light", "ultralytics-k7", "mmyolo"])
def test_torch_jit_trace(layout, mode):
    """``torch.jit.trace`` (its check, which traces again under no_grad, included) in training
    and in eval mode, with gradients or without, parameters frozen or not: the traced module
    computes what the original does, and its gradients. The module's configuration alone decides
    whether the graph holds the one inference operator (whose backward recomputes the block):
    eval mode, as ultralytics' exporter traces."""
    original, shape = _original(layout, "deep", "cpu")
    model = fused_cbam.convert(copy.deepcopy(original), backend="cpu")
    train, grad, frozen = mode == "train", "no_grad" not in mode, "frozen" in mode
    for m in (original, model):
        m.train(train).requires_grad_(not frozen)
    x = make_input(shape, torch.float32, "cpu", "channels_last", requires_grad=grad)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(copy.deepcopy(model), x)
    traced.load_state_dict(original.state_dict())  # (tracing ran training steps of the BNs)
    nodes = [node.kind() for node in traced.inlined_graph.nodes()]
    one_operator = not train
    assert ("fused_cbam::cbam_inference" in nodes) == one_operator, nodes
    assert ("fused_cbam::gate_apply" in nodes) != one_operator, nodes
    if not grad:
        with torch.no_grad():
            assert_close(traced(x), original(x), 1e-5, "output")
    elif not frozen:
        _compare_step(traced, original, x)
    else:
        x_ref = x.detach().clone().requires_grad_()
        out, ref = traced(x), original(x_ref)
        assert_close(out, ref, 1e-5, "output")
        out.backward(ref.detach().cos())
        ref.backward(ref.detach().cos())
        assert_close(x.grad, x_ref.grad, 1e-5, "grad of x")


def test_convert_skips_blocks_with_more_parts(caplog):
    """A layout with a part more (a norm in an MLP layer) is not that layout: left alone."""
    mmyolo = MMYolo.CBAM(C, 8)
    fc0 = mmyolo.channel_attention.fc[0]
    fc0.bn = nn.BatchNorm2d(4)
    official = Official.CBAM(C)
    mlp = official.ChannelGate.mlp
    official.ChannelGate.mlp = nn.Sequential(mlp[0], mlp[1], nn.BatchNorm1d(2), mlp[2], mlp[3])
    model = nn.Sequential(mmyolo, official)
    with caplog.at_level(logging.INFO, logger="fused_cbam.convert"):
        fused_cbam.convert(model)
    assert model[0] is mmyolo and model[1] is official
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 2 and all("state_dict keys differ" in message for message in skipped), skipped


HALVES = {
    "official-channel": (fused_cbam.nn.ChannelGate, official_cbam.ChannelGate, (C, 8, ("avg", "max"))),
    "official-spatial": (fused_cbam.nn.SpatialGate, official_cbam.SpatialGate, ()),
    "timm-channel": (fused_cbam.nn.ChannelAttn, timm_cbam.ChannelAttn, (C, 1 / 6, None, 4, nn.ReLU, "hard_sigmoid", True)),
    "timm-spatial": (fused_cbam.nn.SpatialAttn, timm_cbam.SpatialAttn, (5, "hard_sigmoid")),
    "timm-light-channel": (fused_cbam.nn.LightChannelAttn, timm_cbam.LightChannelAttn, (C,)),
    "timm-light-spatial": (fused_cbam.nn.LightSpatialAttn, timm_cbam.LightSpatialAttn, (3,)),
    "ultralytics-channel": (fused_cbam.nn.UltralyticsChannelAttention, Ultralytics.ChannelAttention, (C,)),
    "ultralytics-spatial": (fused_cbam.nn.UltralyticsSpatialAttention, Ultralytics.SpatialAttention, (3,)),
    "mmyolo-channel": (fused_cbam.nn.MMYoloChannelAttention, MMYolo.ChannelAttention, (C, 4, {"type": "SiLU"})),
    "mmyolo-spatial": (fused_cbam.nn.MMYoloSpatialAttention, MMYolo.SpatialAttention, (5,)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("half", list(HALVES))
def test_halves_built_alone_take_the_original_constructor(half, train):
    """Each half class, built alone with its original's constructor arguments, has its
    parameters and computes what it computes."""
    fused_class, original_class, args = HALVES[half]
    original = _randomized(original_class(*args)).train(train)
    fused = fused_class(*args, backend="cpu").train(train)
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict(), strict=True)
    x = make_input(SHAPE, torch.float32, "cpu", "channels_last", requires_grad=True)
    _compare_step(fused, original, x)


def test_even_spatial_kernels_are_refused():
    for build in (
        lambda: fused_cbam.nn.SpatialGate(4),
        lambda: fused_cbam.nn.CbamModule(C, spatial_kernel_size=4),
        lambda: fused_cbam.nn.MMYoloCBAM(C, 8, 4),
    ):
        with pytest.raises(ValueError, match="kernel_size: expected an odd size"):
            build()


def test_blocks_pickled_before_the_halves_had_classes_load():
    """Whole modules pickled by fused_cbam at c396736 (tests/data, made by that commit's code):
    ultralytics, for one, saves its checkpoints so. They load, give the outputs they gave then
    (up to the float32 rounding of the kernels' sums, whose order has changed since), and train."""
    saved = torch.load(Path(__file__).with_name("data") / "modules-c396736.pt", weights_only=False)
    for name, block in saved["modules"].items():
        assert all(isinstance(half, fused_cbam.nn.Half) for half in block._halves() if half is not None), name
        with torch.no_grad():
            assert_close(block(saved["x"]), saved["outputs"][name], 1e-6, name)
        block.backend = "reference"
        assert all(half.backend == "reference" for half in block._halves() if half is not None)
        x = saved["x"].clone().requires_grad_()
        block.train()(x).sum().backward()
        assert x.grad.abs().sum() > 0
    saved["modules"]["mmyolo"].init_weights()


def test_timm_halves_take_device_and_dtype_as_timm():
    """Built directly in that dtype (and on that device), as timm builds them: the same random
    draws, so a seeded model initialises the same."""
    for kwargs in ({"dtype": torch.float64}, {"device": "meta"}):
        torch.manual_seed(0)
        ours = fused_cbam.nn.CbamModule(C, **kwargs)
        after_ours = torch.rand(1)
        torch.manual_seed(0)
        theirs = TimmCbamModule(C, **kwargs)
        assert torch.equal(torch.rand(1), after_ours), kwargs
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert a.dtype == b.dtype and a.device == b.device, name
            assert a.device.type == "meta" or torch.equal(a, b), name


def test_mmyolo_act_cfg_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmcv", None)  # as here: mmcv not installed
    with pytest.raises(ValueError, match="act_cfg: expected a dict with a 'type'"):
        fused_cbam.nn.MMYoloCBAM(C, act_cfg="relu")
    with pytest.raises(ValueError, match="act_cfg: type 'Swish' needs mmcv installed"):
        fused_cbam.nn.MMYoloCBAM(C, act_cfg={"type": "Swish"})


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_fx_symbolic_trace_records_the_fused_operators(layout, train, backend, device):
    """``torch.fx.symbolic_trace`` of a fused block, and of each of its halves, gives a graph
    that calls the backend's operators and computes what the original computes, gradients
    included."""
    original, shape = _original(layout, "shallow", device)
    block = fused_cbam.convert(copy.deepcopy(original), backend=backend)
    original.train(train)
    block.train(train)
    for name in [None, *_half_names(layout)]:
        module = block if name is None else getattr(block, name)
        traced = torch.fx.symbolic_trace(module)
        targets = [str(node.target) for node in traced.graph.nodes if node.op == "call_function"]
        assert (backend == "reference") != any(t.startswith("fused_cbam.") for t in targets), targets
        x = make_input(shape, torch.float32, device, requires_grad=True)
        _compare_step(traced, original if name is None else getattr(original, name), x)
        original.zero_grad()
        block.zero_grad()


def test_timm_feature_extractor_over_a_converted_model():
    """timm's FX feature extraction (torchvision's create_feature_extractor underneath) over a
    converted ResNet: the same features and gradients as over the original."""
    from timm.models import create_feature_extractor

    original = _randomized(timm.create_model("resnet18", block_args=dict(attn_layer="cbam")))
    model = fused_cbam.convert(copy.deepcopy(original), backend="cpu")
    nodes = {"layer2": "mid", "layer4": "last"}
    ours, theirs = create_feature_extractor(model, nodes), create_feature_extractor(original, nodes)
    x = make_input((2, 3, 64, 64), torch.float32, "cpu", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = ours(x), theirs(x_ref)
    for key in nodes.values():
        assert_close(out[key], ref[key], 1e-4, key)
    sum(f.square().sum() for f in out.values()).backward()
    sum(f.square().sum() for f in ref.values()).backward()
    assert_close(x.grad, x_ref.grad, 1e-4, "grad of x")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization's own
@pytest.mark.parametrize("layout", ["official", "timm", "mmyolo", "ultralytics-k7"])
def test_fx_int8_quantization_is_as_accurate_as_the_original(layout):
    """FX graph-mode post-training quantization (prepare_fx, calibration, convert_fx) of a
    converted model: its int8 error against the float original is no larger than the original's
    own. The MLP is traced once per pool, as the originals call it, so each pool gets its own
    observer (one call over both stacked pools gave three times the error), and a 1x1 conv's
    output is flattened by ``torch.flatten``, which keeps its quantization (the method form
    quantized ultralytics' logits twice: 1.6 times the error)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    original = _original(layout, "deep", "cpu")[0].eval()
    model = fused_cbam.convert(copy.deepcopy(original), backend="cpu").eval()
    shape = (4, STEM_CHANNELS, *SHAPE[2:])
    x = make_input(shape, torch.float32, "cpu")
    calibration = [make_input(shape, torch.float32, "cpu") for _ in range(8)]
    with torch.no_grad():
        expected = original(x)
        errors = []
        for m in (original, model):
            quantized = prepare_fx(copy.deepcopy(m), get_default_qconfig_mapping("x86"), (x,))
            for batch in calibration:
                quantized(batch)
            quantized = convert_fx(quantized)
            errors.append((quantized(x) - expected).abs().mean().item() / expected.abs().mean().item())
    assert errors[1] <= 1.2 * errors[0], f"relative int8 error: original {errors[0]:.4f}, converted {errors[1]:.4f}"
