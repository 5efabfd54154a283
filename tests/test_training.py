"""The whole-block training operator ``cbam_training`` (csrc/training.cpp) that the C++ backends'
blocks take in eager mode: against the reference backend (output, every gradient, the BatchNorm's
running statistics and batch count), where it is taken and where the block keeps its own path."""

import copy
from typing import NamedTuple

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import fused_cbam
from helpers import (
    COMPILED_BACKENDS,
    TOLERANCE,
    OperatorLog,
    assert_close,
    fused_and_reference,
    make_input,
)
from test_inference import BAD_PARAMETERS, with_bad_parameter
from test_inference import _operator_args as inference_operator_args
from test_properties import FULL_SIZES, _profile

pytestmark = [
    pytest.mark.parametrize("backend,device", COMPILED_BACKENDS),
    pytest.mark.usefixtures("available_backend"),
]


# Every layout the operator computes, with a hidden size that is not a power of two (5 at C = 16).
LAYOUTS = {
    "official": lambda c, **kw: fused_cbam.nn.CBAM(c, reduction_ratio=min(3, c), **kw),
    "official-avg": lambda c, **kw: fused_cbam.nn.CBAM(c, reduction_ratio=min(3, c), pool_types=("avg",), **kw),
    "timm": lambda c, **kw: fused_cbam.nn.CbamModule(c, rd_channels=max(1, c // 3), mlp_bias=True, **kw),
    "timm-light": lambda c, **kw: fused_cbam.nn.LightCbamModule(c, rd_channels=max(1, c // 3), **kw),
    "ultralytics": lambda c, **kw: fused_cbam.nn.UltralyticsCBAM(c, **kw),
    "mmyolo": lambda c, **kw: fused_cbam.nn.MMYoloCBAM(c, reduce_ratio=min(3, c), **kw),
}


def _takes_the_operator(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and "CbamTraining" in out.grad_fn.name()


def _step(module, x, grad_out):
    """Output, gradient of x and of every parameter (this step's), and every buffer, after one
    training step."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out, x.grad, grads, dict(module.named_buffers())


def _assert_steps_match(got, want, dtype):
    (out, grad_x, grads, buffers), (ref_out, ref_grad_x, ref_grads, ref_buffers) = got, want
    atol = TOLERANCE[dtype] * 4
    assert_close(out, ref_out, atol, "out", rounded_once=False)
    assert_close(grad_x, ref_grad_x, atol, "grad of x", rounded_once=False)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], atol * 4, f"grad of {name}", rounded_once=False)
    for name, buffer in buffers.items():
        if buffer.is_floating_point():
            assert_close(buffer, ref_buffers[name], atol, name, rounded_once=False)
        else:
            assert torch.equal(buffer, ref_buffers[name]), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_training_steps_match_the_reference(layout, memory_format, dtype, backend, device):
    """Two steps in training mode (the running statistics move), then one in eval mode with a
    gradient (BatchNorm then normalises with them, and its backward differs). Each step starts
    from the same state on both sides. In 16 bits too against the reference: the operator rounds
    the channel gate's logit sum as the layouts do, so its spatial maxima are theirs even at near
    ties (with the sum rounded once less, 7-9% of bfloat16 seeds moved one, with its whole
    gradient: benchmarks/NOTES.md, nineteenth session)."""
    fused, reference = fused_and_reference(LAYOUTS[layout], backend, device)
    fused, reference = fused.to(dtype), reference.to(dtype)
    for train in (True, True, False):
        reference.load_state_dict(fused.state_dict())
        fused.train(train)
        reference.train(train)
        x = make_input((3, 16, 7, 9), dtype, device, memory_format)
        grad_out = torch.randn(x.shape, dtype=dtype, device=device)
        got = _step(fused, x, grad_out)
        assert _takes_the_operator(got[0]), got[0].grad_fn
        _assert_steps_match(got, _step(reference, x, grad_out), dtype)


class StepCase(NamedTuple):
    layout: str
    shape: tuple[int, int, int, int]
    memory_format: str
    dtype: torch.dtype
    train: bool
    seed: int


@st.composite
def step_cases(draw, dtypes) -> StepCase:
    """A training step of a block: its layout, x's shape (1s and primes), memory format and dtype,
    the BatchNorm's mode and the seed of the weights and values."""
    spatial = st.sampled_from(FULL_SIZES.spatial)
    shape = draw(st.tuples(st.integers(1, 3), st.sampled_from(FULL_SIZES.channels), spatial, spatial))
    train = draw(st.booleans())
    assume(not train or shape[0] * shape[2] * shape[3] > 1)  # (BatchNorm in training refuses one value per channel)
    return StepCase(
        draw(st.sampled_from(sorted(LAYOUTS))), shape, draw(st.sampled_from(["nchw", "channels_last", "strided"])),
        draw(st.sampled_from(dtypes)), train, draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def _case_step_inputs(case: StepCase, backend, device, module_dtype):
    """The fused block and its reference (in ``module_dtype``, in the case's BatchNorm mode), x and
    the output's gradient, from the case's seed."""
    torch.manual_seed(case.seed)
    fused, reference = fused_and_reference(LAYOUTS[case.layout], backend, device, channels=case.shape[1])
    fused, reference = fused.to(module_dtype).train(case.train), reference.to(module_dtype).train(case.train)
    x = make_input(case.shape, case.dtype, device, case.memory_format)
    return fused, reference, x, torch.randn(x.shape, dtype=case.dtype, device=device)


@_profile(max_examples=600)
@given(case=step_cases([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_property_steps_match_the_reference(case, backend, device):
    """Shapes with 1s and primes, both BatchNorm modes, three memory formats, every dtype."""
    fused, reference, x, grad_out = _case_step_inputs(case, backend, device, case.dtype)
    got = _step(fused, x, grad_out)
    assert _takes_the_operator(got[0]), got[0].grad_fn
    _assert_steps_match(got, _step(reference, x, grad_out), case.dtype)


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (3, 5, 1, 1), (1, 33, 3, 5), (2, 300, 3, 3)], ids=str)
def test_odd_shapes(shape, backend, device):
    """One channel, a single pixel per sample (BatchNorm still has N values), a channel count
    that is no multiple of a vector, more channels than one CPU block."""
    make = lambda c, **kw: fused_cbam.nn.CBAM(c, reduction_ratio=1, **kw)  # noqa: E731
    fused, reference = fused_and_reference(make, backend, device, channels=shape[1])
    x = make_input(shape, torch.float32, device, "channels_last")
    grad_out = torch.randn_like(x)
    got = _step(fused, x, grad_out)
    assert _takes_the_operator(got[0])
    _assert_steps_match(got, _step(reference, x, grad_out), torch.float32)


@pytest.mark.parametrize("setting,value", [("momentum", None), ("eps", 0.1)])
def test_batch_norm_settings_as_the_module_has_them(setting, value, backend, device):
    """momentum None (the cumulative average over the batches seen), an eps of the module's own."""
    fused, reference = fused_and_reference(LAYOUTS["timm"], backend, device)
    for module in (fused, reference):
        setattr(module.spatial.conv.bn, setting, value)
    for _ in range(3):
        x = make_input((2, 16, 5, 6), torch.float32, device)
        grad_out = torch.randn_like(x)
        got = _step(fused, x, grad_out)
        assert _takes_the_operator(got[0])
        _assert_steps_match(got, _step(reference, x, grad_out), torch.float32)
    assert fused.spatial.conv.bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("layout", ["timm", "mmyolo"])  # (mmyolo: a conv bias)
def test_each_parameter_alone_requiring_a_gradient(layout, backend, device):
    """x without a gradient and one parameter with: the operator builds its node for it and
    gives it the reference's gradient."""
    fused, reference = fused_and_reference(LAYOUTS[layout], backend, device)
    x = make_input((2, 16, 5, 6), torch.float32, device)
    for name, parameter in fused.named_parameters():
        fused.requires_grad_(False)
        parameter.requires_grad_()
        out = fused(x)
        assert _takes_the_operator(out), name
        (grad,) = torch.autograd.grad(out.square().sum(), parameter)
        (want,) = torch.autograd.grad(reference(x).square().sum(), reference.get_parameter(name))
        assert_close(grad, want, 1e-4, f"grad of {name}")


def test_gradients_of_the_parameters_alone_and_of_x_alone(backend, device):
    """x without a gradient (the first layer, or a frozen stem), then frozen parameters."""
    fused, reference = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 6, 5), torch.float32, device)
    out = fused(x)
    assert _takes_the_operator(out)
    out.square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), rp in zip(fused.named_parameters(), reference.parameters()):
        assert_close(p.grad, rp.grad, 1e-4, f"grad of {name}")
    fused.requires_grad_(False)
    reference.requires_grad_(False)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(xa).square().sum().backward()
    reference(xr).square().sum().backward()
    assert_close(xa.grad, xr.grad, 1e-4, "grad of x")


def test_no_gradient_needed_in_training_mode(backend, device):
    """Training mode under no_grad (a validation loop that forgot eval()): the forward alone,
    the running statistics updated as BatchNorm updates them."""
    fused, reference = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 6, 5), torch.float32, device)
    with torch.no_grad():
        out, ref_out = fused(x), reference(x)
    assert_close(out, ref_out, 1e-4, "out")
    for (name, b), rb in zip(fused.named_buffers(), reference.buffers()):
        assert_close(b, rb, 1e-5, name)


def test_batch_norm_refuses_one_value_per_channel_as_batch_norm_does(backend, device):
    fused, _ = fused_and_reference(LAYOUTS["official"], backend, device)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(make_input((1, 16, 1, 1), torch.float32, device, requires_grad=True))


@pytest.mark.parametrize("wanted", ["x", "a-bias-alone"])
def test_double_backward_is_refused(wanted, backend, device):
    """Also where only a bias requires a gradient (no tensor the backward saves does)."""
    fused, _ = fused_and_reference(LAYOUTS["timm"], backend, device)
    x = make_input((2, 16, 4, 4), torch.float32, device, requires_grad=wanted == "x")
    if wanted != "x":
        fused.requires_grad_(False)
        fused.channel.fc2.bias.requires_grad_()
    inputs = x if wanted == "x" else fused.channel.fc2.bias
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fused(x).sum(), inputs, create_graph=True)


def test_an_eval_mode_graph_keeps_the_statistics_it_normalised_with(backend, device):
    """An eval-mode forward with a gradient, then a training-mode forward of the same block
    (which updates the running statistics in place) before the first one's backward."""
    fused, reference = fused_and_reference(LAYOUTS["official"], backend, device)
    x, x2 = (make_input((2, 16, 5, 6), torch.float32, device) for _ in range(2))
    grad_out = torch.randn_like(x)
    ref_x = x.clone().requires_grad_()
    reference.eval()(ref_x).backward(grad_out)  # the eval-mode block's gradient, at once
    fused_x = x.clone().requires_grad_()
    out = fused.eval()(fused_x)
    fused.train()(x2)
    assert not torch.equal(fused.SpatialGate.spatial.bn.running_var, reference.SpatialGate.spatial.bn.running_var)
    out.backward(grad_out)
    assert_close(fused_x.grad, ref_x.grad, 1e-4, "grad of x")


def test_a_shared_module_twice_and_two_backward_passes(backend, device):
    fused, reference = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 6, 5), torch.float32, device)
    grad_out = torch.randn_like(x)

    def grads(module):
        xr = x.clone().requires_grad_()
        out = xr + module(module(xr))
        for _ in range(2):
            out.backward(grad_out, retain_graph=True)
        return xr.grad, [p.grad for p in module.parameters()]

    (grad_x, param_grads), (ref_grad_x, ref_param_grads) = grads(fused), grads(reference)
    assert_close(grad_x, ref_grad_x, 1e-4, "grad of x")
    for i, (g, rg) in enumerate(zip(param_grads, ref_param_grads)):
        assert_close(g, rg, 4e-4, f"grad of parameter {i}")


def _hooked(module):
    module.spatial.conv.register_full_backward_hook(lambda *args: None)


def _pre_hooked(module):
    module.spatial.conv.conv.register_forward_pre_hook(lambda *args: None)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(lambda m, x: m.__setattr__("keep_gates", True), id="kept-gates"),
        pytest.param(lambda m, x: _hooked(m), id="backward-hook-on-a-part"),
        pytest.param(lambda m, x: _pre_hooked(m), id="forward-pre-hook-on-a-part"),
        pytest.param(lambda m, x: m.spatial.conv.bn.__setattr__("track_running_stats", False), id="bn-no-stats"),
    ],
)
def test_the_block_keeps_its_own_path_where_the_operator_cannot_stand_for_it(case, backend, device):
    fused, reference = fused_and_reference(LAYOUTS["timm"], backend, device)
    x = make_input((2, 16, 5, 6), torch.float32, device)
    case(fused, x)
    case(reference, x)
    grad_out = torch.randn_like(x)
    got = _step(fused, x, grad_out)
    assert not _takes_the_operator(got[0]), got[0].grad_fn
    _assert_steps_match(got, _step(reference, x, grad_out), torch.float32)


@pytest.mark.parametrize("layout", ["mmyolo", "ultralytics"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_output_is_the_three_operators_bit_for_bit(layout, dtype, backend, device):
    """In 16 bits, for the layouts whose spatial conv has no BatchNorm (whose kernel may differ
    between F.batch_norm and the operator's call): the same kernels, and the MLP of 1x1 convs run
    as the layout runs it (as linear, cuBLAS would round its biased output otherwise than cuDNN,
    and a ReLU input near 0 can change sign: benchmarks/NOTES.md, nineteenth session)."""
    fused, _ = fused_and_reference(LAYOUTS[layout], backend, device)
    fused = fused.to(dtype)
    twin = copy.deepcopy(fused)
    twin.keep_gates = True  # (which the operator does not serve)
    x = make_input((5, 16, 7, 9), dtype, device, "channels_last")
    out, want = fused(x.requires_grad_()), twin(x)
    assert _takes_the_operator(out) and not _takes_the_operator(want)
    assert torch.equal(out, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision_steps_match_the_reference(layout, dtype, backend, device):
    """Under autocast with x in its dtype (a conv's output there) and the parameters in float32:
    the operator, with the MLP's and the conv's parameters in x's dtype as autocast converts
    them, the BatchNorm's as they are, and every gradient in its parameter's dtype. Two steps in
    training mode, then one in eval mode with a gradient, against the reference under the same
    autocast."""
    fused, reference = fused_and_reference(LAYOUTS[layout], backend, device)
    for train in (True, True, False):
        fused.train(train)
        reference.train(train)
        x = make_input((3, 16, 7, 9), dtype, device, "channels_last")
        grad_out = torch.randn(x.shape, dtype=dtype, device=device)
        with torch.autocast(device, dtype=dtype):
            got, want = _step(fused, x, grad_out), _step(reference, x, grad_out)
        assert _takes_the_operator(got[0]), got[0].grad_fn
        assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[2].values())
        _assert_steps_match(got, want, dtype)


@_profile(max_examples=300)
@given(case=step_cases([torch.bfloat16, torch.float16]))
def test_property_mixed_precision_steps_match_the_reference(case, backend, device):
    """Under autocast, against the reference under the same autocast (the MLP and the conv on
    parameters converted as autocast converts them): shapes with 1s and primes, both BatchNorm
    modes, three memory formats."""
    fused, reference, x, grad_out = _case_step_inputs(case, backend, device, torch.float32)
    with torch.autocast(device, dtype=case.dtype):
        got, want = _step(fused, x, grad_out), _step(reference, x, grad_out)
    assert _takes_the_operator(got[0])
    _assert_steps_match(got, want, case.dtype)


def test_autocast_with_x_in_float32_keeps_the_blocks_own_path(backend, device):
    """The operator would run the MLP and the conv in float32, where the parts run them in the
    autocast dtype."""
    fused, _ = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 5, 6), torch.float32, device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fused(x)
    assert not _takes_the_operator(out) and out.dtype == torch.float32


def test_the_operator_ignores_autocast(backend, device):
    """Called directly under autocast, it computes in x's dtype as without it (its linear, conv and
    mm calls are not converted), gradients included."""
    module = LAYOUTS["timm"](16).to(device)
    *args, bn = module._plain(training=True)
    parameters = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    x = make_input((2, 16, 5, 6), torch.float32, device, requires_grad=True)

    def step():
        out = torch.ops.fused_cbam.cbam_training(x, *args, *fused_cbam.nn.inference_args.batch_norm_step(bn))
        return out, *torch.autograd.grad(out.square().sum(), [x, *parameters])

    want = step()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device, dtype=dtype):
            got = step()
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype and torch.equal(g, w), (dtype, i)


def test_opcheck(backend, device):
    """The operator's schema (running statistics mutated), fake kernel and autograd registration,
    with and without a gradient, BatchNorm in training and in eval mode, and with no BatchNorm;
    and with float32 parameters for a bfloat16 x (mixed precision)."""
    module = LAYOUTS["official"](16).to(device)
    ultralytics = LAYOUTS["ultralytics"](16).to(device)
    cases = [(module, True, torch.float32), (module, False, torch.float32), (ultralytics, True, torch.float32)]
    for block, train, dtype in [*cases, (module, True, torch.bfloat16)]:
        block.train(train)
        *args, bn = block._plain(training=True)
        step = fused_cbam.nn.inference_args.batch_norm_step(bn)
        for requires_grad in (False, True):
            x = make_input((2, 16, 5, 6), dtype, device, "channels_last", requires_grad)
            torch.library.opcheck(torch.ops.fused_cbam.cbam_training, (x, *args, *step))


def test_gradcheck_in_float64(backend, device):
    module = LAYOUTS["timm"](6).to(device).double()
    *args, bn = module._plain(training=True)
    step = fused_cbam.nn.inference_args.batch_norm_step(bn)
    inputs = [make_input((2, 6, 4, 3), torch.float64, device, requires_grad=True)]
    # The running statistics stay out of gradcheck: every evaluation updates them.
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def block(x, *params):
        full = list(args)
        for i, p in zip(positions, params):
            full[i] = p
        return torch.ops.fused_cbam.cbam_training(x, *full, *step)

    params = [args[i].detach().clone().requires_grad_() for i in positions]
    assert torch.autograd.gradcheck(block, (*inputs, *params), atol=1e-6)


@pytest.mark.parametrize("index,value,match", BAD_PARAMETERS)
def test_bad_parameters_name_the_argument(index, value, match, backend, device):
    """Refused as cbam_inference refuses them (the same checks), before anything is computed
    with them: an integer weight is not converted to x's dtype."""
    args = with_bad_parameter(inference_operator_args(device=device), index, value, device)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.fused_cbam.cbam_training(*args, True, 0.1)


@pytest.mark.parametrize(
    "arguments,match",
    [
        ({3: None, 4: torch.randn(12)}, "fc2_bias: expected None without fc2_weight"),
        ({8: None, 9: None}, "bn_weight, bn_bias: expected None without bn_mean and bn_var"),
    ],
    ids=["fc2-bias-alone", "bn-without-statistics"],
)
def test_refuses_arguments_it_cannot_compute(arguments, match, backend, device):
    args = list(inference_operator_args(device=device))
    for index, value in arguments.items():
        args[index] = None if value is None else value.to(device)
    with pytest.raises(ValueError, match=match):
        torch.ops.fused_cbam.cbam_training(*args, True, 0.1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_an_empty_batch(train, affine, backend, device):
    """Called directly (the blocks keep their own path for an empty x): an empty output and
    gradient, and the running statistics left as they are, as nn.BatchNorm2d leaves them; also
    for a BatchNorm without weight and bias, whose backward ATen then leaves undefined."""
    args = list(inference_operator_args(device=device))
    if not affine:
        args[10:12] = [None, None]
    x = torch.randn(0, *args[0].shape[1:], device=device, requires_grad=True)
    statistics = [t.clone() for t in args[8:10]]
    out = torch.ops.fused_cbam.cbam_training(x, *args[1:], train, 0.1)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert all(torch.equal(t, s) for t, s in zip(args[8:10], statistics))


def test_a_backward_hook_on_a_part_keeps_the_inference_operator(backend, device):
    """Backward hooks keep a block on its parts where a gradient may flow, not under no_grad."""
    fused, _ = fused_and_reference(LAYOUTS["timm"], backend, device)
    _hooked(fused)
    with OperatorLog() as log, torch.no_grad():
        fused.eval()(make_input((2, 16, 5, 6), torch.float32, device))
    assert "fused_cbam.cbam_inference" in log.names, log.names


def test_bn_module_subclass_keeps_its_own_path(backend, device):
    """A BatchNorm subclass may normalise otherwise: the operator never stands for it."""

    class MyNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    fused, reference = fused_and_reference(LAYOUTS["timm"], backend, device)
    fused.spatial.conv.bn = MyNorm(1).to(device)
    out = fused(make_input((2, 16, 5, 6), torch.float32, device, requires_grad=True))
    assert not _takes_the_operator(out)
