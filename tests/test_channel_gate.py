"""The channel_gate operators against the reference, and their use by the modules' training path:
the sigmoid of the channel MLP's summed logits in one kernel, its gradient (both of the gate's
shares added) in one more."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fused_cbam import nn as fnn
from fused_cbam import reference
from helpers import (
    COMPILED_BACKENDS,
    OPERATOR_BACKENDS,
    TOLERANCE,
    OperatorLog,
    assert_close,
    fused_and_reference,
    operator_namespace,
    skip_unless_available,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (K pooled vectors, N, C): one, two and four vectors (the official layout's four pool types);
# a single gate; a row count that is not a multiple of any block.
SHAPES = [(1, 3, 7), (2, 1, 1), (2, 5, 1030), (4, 2, 33)]


def _ops(backend, dtype):
    skip_unless_available(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend has no float64")
    return operator_namespace(backend)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_sum_is_rounded_before_the_sigmoid(backend, device, dtype):
    """As the layouts compute the gate, ``sigmoid(logits.sum(0))`` in the logits' dtype: where
    rounding the sum first changes the gate, the operator's gate is the rounded sum's sigmoid
    (a gate an ulp from the layouts' moves spatial maxima at near ties, with their gradient).
    Checked on those elements only; an element whose float32 sigmoid falls on the other side of
    a rounding midpoint than the exact one may differ, hence 99%."""
    ops = _ops(backend, dtype)
    logits = (3 * torch.randn(2, 64, 257, device=device)).to(dtype)
    total = logits.double().sum(0)
    rounded_first = torch.sigmoid(total.to(dtype).double()).to(dtype)
    rounded_once = torch.sigmoid(total).to(dtype)
    telling = rounded_first != rounded_once
    assert telling.sum() > 100, "no elements where the two roundings differ"
    gate = ops.channel_gate(logits)
    agree = (gate == rounded_first)[telling].double().mean().item()
    assert agree > 0.99, f"{agree:.1%} of the gates have the logits' sum rounded first"


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_reference(backend, device, shape, dtype):
    ops = _ops(backend, dtype)
    logits = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    gate = ops.channel_gate(logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_gate = reference.channel_gate(ref_logits)
    assert gate.dtype == dtype and gate.shape == shape[1:]
    assert_close(gate, ref_gate, TOLERANCE[dtype], "gate")

    # Through the operator's autograd: one gradient of the gate.
    grad = torch.randn_like(gate)
    (got,) = torch.autograd.grad(gate, logits, grad)
    (want,) = torch.autograd.grad(ref_gate, ref_logits, grad)
    assert_close(got, want, 4 * TOLERANCE[dtype], "grad of logits", rounded_once=False)

    # The backward operator with a second gradient (the gate feeding two operators).
    grad_2 = torch.randn_like(gate)
    (want_2,) = torch.autograd.grad(reference.channel_gate(ref_logits), ref_logits, grad + grad_2)
    got_2 = ops.channel_gate_backward(grad, grad_2, gate.detach(), shape[0])
    assert got_2.shape == shape and got_2.dtype == dtype
    assert_close(got_2, want_2, 4 * TOLERANCE[dtype], "grad of logits, two gradients", rounded_once=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_cpu_gate_is_torch_sigmoid_bit_for_bit(dtype):
    """The CPU kernel's sigmoid is torch.sigmoid's vectorised formula on every gate, whatever
    the thread count: equal to ``torch.sigmoid(logits.sum(0))`` bit for bit where that runs its
    vector loop, which on one thread takes every element of a count divisible by 64 (any vector
    width's two vectors). std::exp gave one ulp more or less on about 4% of float32 gates."""
    ops = _ops("cpu", dtype)
    logits = 4 * torch.randn(2, 64, 128, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = torch.sigmoid(logits.sum(0))
        single = ops.channel_gate(logits)
        torch.set_num_threads(2)
        assert torch.equal(ops.channel_gate(logits), single)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, expected), f"{(single != expected).double().mean():.2%} of the gates differ"


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_every_output_element_is_written(backend, device):
    ops = _ops(backend, torch.float32)
    logits = torch.randn(3, 5, 1030, device=device)
    gate = ops.channel_gate(logits)
    grads = ops.channel_gate_backward(torch.randn_like(gate), None, gate, 3)
    assert gate.isfinite().all() and grads.isfinite().all()


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_empty_batch(backend, device):
    ops = _ops(backend, torch.float32)
    logits = torch.randn(2, 0, 6, device=device, requires_grad=True)
    gate = ops.channel_gate(logits)
    assert gate.shape == (0, 6)
    (grad,) = torch.autograd.grad(gate, logits, torch.ones_like(gate))
    assert grad.shape == logits.shape


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_nan_propagates(backend, device):
    ops = _ops(backend, torch.float32)
    logits = torch.randn(2, 3, 4, device=device)
    logits[1, 2, 3] = float("nan")
    gate = ops.channel_gate(logits)
    assert gate[2, 3].isnan() and gate.isnan().sum() == 1


@pytest.mark.parametrize("backend,device", [p for p in OPERATOR_BACKENDS if p.id != "triton"])
def test_gradcheck_float64(backend, device):
    ops = _ops(backend, torch.float64)
    logits = torch.randn(3, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.channel_gate, (logits,))


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_opcheck(backend, device):
    ops = _ops(backend, torch.float32)
    for requires_grad in (False, True):
        logits = torch.randn(2, 3, 5, device=device, requires_grad=requires_grad)
        torch.library.opcheck(ops.channel_gate.default, (logits,))
    gate = torch.rand(3, 5, device=device)
    torch.library.opcheck(ops.channel_gate_backward.default, (torch.randn_like(gate), torch.randn_like(gate), gate, 2))
    torch.library.opcheck(ops.channel_gate_backward.default, (torch.randn_like(gate), None, gate, 1))


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_bad_arguments_are_named(backend, device):
    ops = _ops(backend, torch.float32)
    gate = torch.rand(3, 5, device=device)
    with pytest.raises(ValueError, match="logits.*3-D"):
        ops.channel_gate(torch.randn(3, 5, device=device))
    with pytest.raises(TypeError, match="logits"):
        ops.channel_gate(torch.ones(2, 3, 5, device=device, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits.*pooled vector"):
        ops.channel_gate(torch.randn(0, 3, 5, device=device))
    with pytest.raises(ValueError, match="grad_gate.*shape"):
        ops.channel_gate_backward(torch.randn(3, 4, device=device), None, gate, 2)
    with pytest.raises(TypeError, match="grad_gate_2.*dtype"):
        ops.channel_gate_backward(torch.randn_like(gate), torch.randn_like(gate).half(), gate, 2)
    with pytest.raises(ValueError, match="pools"):
        ops.channel_gate_backward(torch.randn_like(gate), None, gate, 0)


# The layouts' training path with a sigmoid channel gate: the operator replaces the sum of the
# MLP's halves and the sigmoid, and in the backward the sigmoid's gradient, the gradient of the
# sum (a copy of its expanded gradient) and the addition of the gate's two shares (the spatial
# pooling's and gate_apply's). With whether the layout takes it: blocks that pool two vectors
# and have a spatial half (whose pooling makes the gate); one pooled vector has no sum to fuse.
SIGMOID_LAYOUTS = {
    "official": (lambda c, backend: fnn.CBAM(c, 4, backend=backend), True),
    "official-channel-only": (lambda c, backend: fnn.CBAM(c, 4, no_spatial=True, backend=backend), False),
    "timm": (lambda c, backend: fnn.CbamModule(c, rd_ratio=0.25, backend=backend), True),
    "timm-light": (lambda c, backend: fnn.LightCbamModule(c, rd_ratio=0.25, backend=backend), False),
    "ultralytics": (lambda c, backend: fnn.UltralyticsCBAM(c, backend=backend), False),
    "mmyolo": (lambda c, backend: fnn.MMYoloCBAM(c, 4, backend=backend), True),
    "timm-channel-half": (lambda c, backend: fnn.ChannelAttn(c, rd_ratio=0.25, backend=backend), False),
}


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("layout", list(SIGMOID_LAYOUTS))
def test_the_training_path_runs_the_gate_operator(backend, device, layout):
    """On the compiled backends; the Triton backend keeps PyTorch's sum and sigmoid (its custom
    operators cost more host time than they do), with the same gradients. A block that the
    whole-block training operator computes (``cbam_training``, the compiled backends') takes the
    gate operator for one pooled vector too."""
    skip_unless_available(backend)
    make, fused_gate = SIGMOID_LAYOUTS[layout]
    fused_gate = fused_gate or layout in ("timm-light", "ultralytics")
    fused, ref = fused_and_reference(make, backend, device)
    x = torch.randn(2, 16, 5, 6, device=device).to(memory_format=torch.channels_last).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    with OperatorLog() as forward:
        out = fused(x)
    grad_out = torch.randn_like(out)
    with OperatorLog() as backward:
        grads = torch.autograd.grad(out, [x, *fused.parameters()], grad_out)
    ref_out = ref(ref_x)
    ref_grads = torch.autograd.grad(ref_out, [ref_x, *ref.parameters()], grad_out)

    namespace = operator_namespace(backend).name
    fused_gate = fused_gate and backend != "triton"
    assert forward.names.count(f"{namespace}.channel_gate") == fused_gate
    assert backward.names.count(f"{namespace}.channel_gate_backward") == fused_gate
    if fused_gate:
        for unwanted in ("aten.add", "aten.clone"):
            assert unwanted not in backward.names, f"{unwanted} in {backward.names}"
    assert_close(out, ref_out, 1e-5, "output")
    for name, got, want in zip(["x", *dict(fused.named_parameters())], grads, ref_grads):
        assert_close(got, want, 1e-4, f"grad of {name}")


class _CatShapes(TorchDispatchMode):
    """The shapes of the tensors that ``aten.cat`` returns while it is active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.cat:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("layout", [name for name in SIGMOID_LAYOUTS if "channel" not in name])  # with a spatial half
@pytest.mark.parametrize("training", [True, False], ids=["train", "no_grad"])
def test_the_spatial_maps_reach_the_conv_as_the_pooling_wrote_them(backend, device, layout, training):
    """The spatial pooling writes its two maps stacked in the order the layout's conv takes them
    (or the mix of them): no ``cat`` of them before the conv, in training and in a forward without
    gradients that keeps the gates (which takes the three operators). (The order itself: the
    layouts' tests against the originals. On the CPU a training step still copies the maps to
    channels_last for oneDNN's conv, ``_spatial_conv_layout``.)"""
    skip_unless_available(backend)
    fused, _ = fused_and_reference(SIGMOID_LAYOUTS[layout][0], backend, device)
    if hasattr(fused, "keep_gates"):
        fused.keep_gates = True
    x = torch.randn(2, 16, 5, 6, device=device).requires_grad_(training)
    with _CatShapes() as cats, torch.set_grad_enabled(training):
        out = fused(x)
    maps_shapes = [(2, k, 5, 6) for k in (1, 2)]
    assert not [shape for shape in cats.shapes if shape in maps_shapes], cats.shapes
    if training:  # nor a zero-filled copy of a map's gradient (the backward of a slice of the maps)
        with OperatorLog() as backward:
            out.backward(torch.randn_like(out))
        assert "aten.slice_backward" not in backward.names, backward.names


def _channel_half(module):
    return module._halves()[0] if hasattr(module, "_halves") else module


def _hard_sigmoid_timm(c, backend):
    return fnn.CbamModule(c, rd_ratio=0.25, gate_layer="hard_sigmoid", backend=backend)


def _hooked_gate(c, backend):
    module = fnn.UltralyticsCBAM(c, backend=backend)
    module.channel_attention.act.register_forward_hook(lambda part, args, out: out * 0.5)
    return module


class _DoubledGate(fnn.MMYoloChannelAttention):
    def to_gate(self, logits):
        return torch.sigmoid(2 * logits)


def _own_gate(c, backend):
    module = fnn.MMYoloCBAM(c, 4, backend=backend)
    module.channel_attention.__class__ = _DoubledGate
    return module


class _DoubledLogits(fnn.ChannelGate):
    def logits(self, avg, mx, x):
        return 2 * super().logits(avg, mx, x)


def _own_logits(c, backend):
    module = fnn.CBAM(c, 4, backend=backend)
    module.ChannelGate.__class__ = _DoubledLogits
    return module


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("make", [_hard_sigmoid_timm, _hooked_gate, _own_gate, _own_logits], ids=lambda f: f.__name__)
def test_a_gate_that_is_not_a_plain_sigmoid_runs_as_it_is(backend, device, make):
    """A gate of another activation, with a hook, or a subclass's own gate or logits: the
    layout's own calls run."""
    skip_unless_available(backend)
    fused, ref = fused_and_reference(make, backend, device)
    assert not _channel_half(fused).gate_is_sigmoid()
    x = torch.randn(2, 16, 5, 6, device=device, requires_grad=True)
    with OperatorLog() as log:
        out = fused(x)
    assert f"{operator_namespace(backend).name}.channel_gate" not in log.names
    assert_close(out, ref(x), 1e-5, "output")


@pytest.mark.parametrize("global_hook", [False, True], ids=["on-the-gate", "global"])
def test_backward_hooks_of_the_gate_module_run(global_hook):
    """A backward hook on the gate module (or on every module) needs the module called."""
    module = fnn.UltralyticsCBAM(16, backend="cpu")
    calls = []

    def hook(part, grad_in, grad_out):
        calls.append(part)

    if global_hook:
        handle = torch.nn.modules.module.register_module_full_backward_hook(hook)
    else:
        handle = module.channel_attention.act.register_full_backward_hook(hook)
    try:
        assert not module.channel_attention.gate_is_sigmoid()
        module(torch.randn(2, 16, 5, 6, requires_grad=True)).sum().backward()
    finally:
        handle.remove()
    assert module.channel_attention.act in calls and module.channel_attention.gate_is_sigmoid()


@pytest.mark.parametrize("backend,device", [p for p in OPERATOR_BACKENDS if p.id == "cpu"])
def test_under_autocast_the_gate_is_the_references(backend, device):
    """Under autocast the MLP's logits are bfloat16 for a float32 x: the plain sigmoid then, in
    their dtype, as the reference computes it, so that the gate is the reference's bit for bit
    (one rounded otherwise moved spatial maxima to other channels, and the whole max gradient
    with them)."""
    skip_unless_available(backend)
    fused, ref = fused_and_reference(lambda c, backend: fnn.CBAM(c, 4, backend=backend), backend, device)
    fused.keep_gates = ref.keep_gates = True
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with OperatorLog() as log:
            out = fused(x)
        expected = ref(x)
    assert "fused_cbam.channel_gate" not in log.names and out.dtype == torch.float32
    assert torch.equal(fused.last_channel_gate, ref.last_channel_gate)
    grad_out = torch.randn_like(out)
    grad, ref_grad = (torch.autograd.grad(o, x, grad_out)[0] for o in (out, expected))
    assert_close(grad, ref_grad, TOLERANCE[torch.float32], "grad of x")


def test_an_mlp_of_one_pooled_vector_is_called_once():
    """One pooled vector: the MLP's output is the logits, without a cat or a sum of one row."""
    half = fnn.UltralyticsChannelAttention(8, backend="reference")
    avg = torch.randn(3, 8)
    with OperatorLog() as log:
        logits = half.logits(avg, avg, None)
    assert logits.shape == (3, 8) and "aten.cat" not in log.names and "aten.sum" not in log.names
    assert isinstance(half.act, nn.Sigmoid) and half.gate_is_sigmoid()
