"""The training path of the C++ CPU, CUDA and Triton backends: the block's three backward steps
fill one gradient of x (fused_cbam/_one_grad.py). Every gradient must equal the reference
backend's, however autograd reaches the block."""

import ast
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fused_cbam
from fused_cbam import reference
from fused_cbam._one_grad import OneGradBackend
from helpers import (
    OPERATOR_BACKENDS,
    TOLERANCE,
    OperatorLog,
    assert_close,
    fused_and_reference,
    make_input,
    operator_namespace,
)

# Every test runs on each backend with the two operators that add into the gradient of x.
pytestmark = [
    pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS),
    pytest.mark.usefixtures("available_backend"),
]


def _assert_matches(got, want, atol):
    """Output, gradient of x and parameter gradients (``_grads``) against the reference's (whole
    blocks: the parts round in x's dtype, and the reference adds three gradients of x in it)."""
    (out, grad_x, param_grads), (ref_out, ref_grad_x, ref_param_grads) = got, want
    assert_close(out, ref_out, atol, "out", rounded_once=False)
    assert_close(grad_x, ref_grad_x, atol, "grad of x", rounded_once=False)
    for i, (g, rg) in enumerate(zip(param_grads, ref_param_grads)):
        assert_close(g, rg, atol * 4, f"grad of parameter {i}", rounded_once=False)


def _grads(module, x, grad_out, times=1, call=None):
    """Output, gradient of x and of each parameter of ``call(x)`` (``module(x)`` by default),
    after ``times`` backward passes over the same graph."""
    x = x.detach().clone().requires_grad_()
    out = (call or module)(x)
    for _ in range(times):
        out.backward(grad_out, retain_graph=times > 1)
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


LAYOUTS = {
    "official": lambda c, **kw: fused_cbam.nn.CBAM(c, reduction_ratio=4, **kw),
    "official-no-spatial": lambda c, **kw: fused_cbam.nn.CBAM(c, reduction_ratio=4, no_spatial=True, **kw),
    "timm-light": lambda c, **kw: fused_cbam.nn.LightCbamModule(c, rd_channels=4, **kw),
    "ultralytics": lambda c, **kw: fused_cbam.nn.UltralyticsCBAM(c, **kw),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_the_reference(layout, memory_format, dtype, backend, device):
    fused, reference = fused_and_reference(LAYOUTS[layout], backend, device)
    fused, reference = fused.to(dtype), reference.to(dtype)
    x = make_input((3, 16, 7, 9), dtype, device, memory_format)
    grad_out = torch.randn(x.shape, dtype=dtype, device=device)
    with OperatorLog() as log:
        got = _grads(fused, x, grad_out)
    namespace = operator_namespace(backend).name
    assert f"{namespace}.channel_pool_backward_add" in log.names
    assert f"{namespace}.channel_pool_backward" not in log.names
    assert f"{namespace}.spatial_pool_backward" not in log.names
    # The spatial pooling leaves its mean's share to the channel pooling's pass over the gradient.
    spatial_adds = log.arguments(f"{namespace}.spatial_pool_backward_add")
    (channel_add,) = log.arguments(f"{namespace}.channel_pool_backward_add")
    assert [call["add_mean"] for call in spatial_adds] == [False] * len(spatial_adds)
    assert (channel_add["spatial_grad_mean"] is not None) == bool(spatial_adds)
    _assert_matches(got, _grads(reference, x, grad_out), TOLERANCE[dtype] * 4)


def test_retain_graph_twice_a_shared_module_and_a_residual(backend, device):
    """Two backward passes over one graph; one module applied twice; x also used outside it."""
    fused, reference = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 6, 5), torch.float32, device)
    grad_out = torch.randn_like(x)

    def model(m):
        return lambda t: t + m(m(t))

    out, grad_x, param_grads = _grads(fused, x, grad_out, times=2, call=model(fused))
    ref_out, ref_grad_x, ref_param_grads = _grads(reference, x, grad_out, times=2, call=model(reference))
    atol = TOLERANCE[torch.float32] * 4
    assert_close(grad_x, ref_grad_x, atol, "grad of x")
    for i, (g, rg) in enumerate(zip(param_grads, ref_param_grads)):
        assert_close(g, rg, atol, f"grad of parameter {i}")


def test_parameters_only_and_x_only(backend, device):
    fused, reference = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 6, 5), torch.float32, device)
    fused(x).sum().backward()  # x needs no gradient: the registered operators' path
    reference(x).sum().backward()
    for p, rp in zip(fused.parameters(), reference.parameters()):
        assert_close(p.grad, rp.grad, 1e-4, "parameter grad")
    fused.requires_grad_(False)
    reference.requires_grad_(False)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(xa).sum().backward()
    reference(xr).sum().backward()
    assert_close(xa.grad, xr.grad, 1e-4, "grad of x")


def test_gradients_are_bitwise_reproducible(backend, device):
    fused, _ = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 6, 5), torch.float32, device, "channels_last")
    grad_out = torch.randn_like(x)
    first, second = _grads(fused, x, grad_out)[1], _grads(fused, x, grad_out)[1]
    assert torch.equal(first, second)


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_a_step_whose_carrier_gets_no_gradient_writes_its_share(memory_format, backend, device):
    """Only the poolings reach the loss: the carrier that no gate took has no gradient, and the
    pooling that returned it writes a fresh gradient of x (the spatial one, or the channel one
    when only it is used)."""
    ops = operator_namespace(backend)
    x = make_input((2, 5, 4, 3), torch.float32, device, memory_format, requires_grad=True)
    block = OneGradBackend(ops)
    avg, mx = block.channel_pool(x)
    (grad_x,) = torch.autograd.grad([avg, mx], x, [torch.ones_like(avg), torch.ones_like(mx)])
    (ref_grad_x,) = torch.autograd.grad(reference.channel_pool(x), x, [torch.ones_like(avg), torch.ones_like(mx)])
    assert_close(grad_x, ref_grad_x, 1e-6, "grad of x, channel pooling only")
    scale = torch.rand(2, 5, device=device)
    block = OneGradBackend(ops)
    outs = [*block.channel_pool(x), block.spatial_maps(x, scale, True)]
    ref_outs = [*reference.channel_pool(x), reference.spatial_maps(x, scale, True)]
    upstream = [torch.randn_like(t) for t in outs]
    (grad_x,) = torch.autograd.grad(outs, x, upstream)
    (ref_grad_x,) = torch.autograd.grad(ref_outs, x, upstream)
    assert_close(grad_x, ref_grad_x, 1e-5, "grad of x, both poolings")
    block = OneGradBackend(ops)
    avg, _ = block.channel_pool(x)
    mean = block.spatial_maps(x, scale)[:, :1]
    (grad_x,) = torch.autograd.grad([avg, mean], x, [upstream[0], upstream[2][:, :1]])
    ref_avg, ref_mean = reference.channel_pool(x)[0], reference.spatial_pool(x, scale)[0]
    (ref_grad_x,) = torch.autograd.grad([ref_avg, ref_mean], x, [upstream[0], upstream[2][:, :1]])
    assert_close(grad_x, ref_grad_x, 1e-5, "grad of x, the two means only")


def test_each_call_takes_the_blocks_x(backend, device):
    block = OneGradBackend(operator_namespace(backend))
    x = make_input((2, 5, 4, 3), torch.float32, device, requires_grad=True)
    with pytest.raises(RuntimeError, match="each call after channel_pool takes the block's x"):
        block.spatial_maps(x, None)
    block.channel_pool(x)
    with pytest.raises(RuntimeError, match="each call after channel_pool takes the block's x"):
        block.gate_apply(x.clone(), None, None)


def test_torch_compile_keeps_one_gradient(backend, device):
    """Compiled, the backward runs the two operators that add (in place: no copy of the gradient)
    and gives the reference's gradients. (Under torch 2.11, whose Dynamo folds
    ``torch.compiler.is_exporting()`` to True in every trace, it compiled the three-gradient
    backward until the modules read the export flag itself.)"""
    torch._dynamo.reset()
    fused, reference_module = fused_and_reference(LAYOUTS["official"], backend, device)
    x = make_input((2, 16, 7, 9), torch.float32, device, "channels_last")
    grad_out = torch.randn_like(x)
    compiled = torch.compile(fused, fullgraph=True)
    got, codes = run_and_get_code(lambda: _grads(fused, x, grad_out, call=compiled.forward))
    namespace = operator_namespace(backend).name
    backward_code = codes[-1]
    for op in ("channel_pool_backward", "spatial_pool_backward"):
        assert f"{namespace}.{op}.default" not in backward_code
    # both add into the gate backward's own gradient of x: no copy of it in between
    gate = re.search(rf"(\w+) = torch\.ops\.{namespace}\.gate_apply_backward\.default\(", backward_code)
    gate_grad_x = re.search(rf"(\w+) = {gate.group(1)}\[0\]", backward_code).group(1)
    for op in ("channel_pool_backward_add", "spatial_pool_backward_add"):
        call = re.search(rf"{namespace}\.{op}\.default\((\w+),", backward_code)
        assert call.group(1) == gate_grad_x, backward_code
    # the spatial pooling leaves its mean's share, grad_mean read in place, to the channel pooling
    spatial = _call_arguments(backward_code, f"{namespace}.spatial_pool_backward_add")
    channel = _call_arguments(backward_code, f"{namespace}.channel_pool_backward_add")
    assert spatial[-1] == "False" and channel[4] == spatial[1], backward_code
    _assert_matches(got, _grads(reference_module, x, grad_out), TOLERANCE[torch.float32] * 4)


def _call_arguments(code: str, op: str) -> list[str]:
    """The arguments, as written, of the first call of ``op`` in Inductor's generated code."""
    calls = (node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call))
    call = next(c for c in calls if ast.unparse(c.func).endswith(f"{op}.default"))
    return [ast.unparse(argument) for argument in call.args]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(use_reentrant, backend, device):
    """torch.utils.checkpoint runs the block's forward again inside the backward (eval mode, so
    that BatchNorm normalises both forwards alike; the reentrant one's first forward, under
    no_grad, is the inference operator)."""
    fused, reference_module = fused_and_reference(LAYOUTS["official"], backend, device)
    fused.eval(), reference_module.eval()
    x = make_input((2, 16, 6, 5), torch.float32, device, "channels_last")
    grad_out = torch.randn_like(x)

    def checkpointed(t):
        return torch.utils.checkpoint.checkpoint(fused, t, use_reentrant=use_reentrant)

    got = _grads(fused, x, grad_out, call=checkpointed)
    _assert_matches(got, _grads(reference_module, x, grad_out), TOLERANCE[torch.float32] * 4)


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_the_spatial_backward_reads_the_conv_gradient_in_place(memory_format, backend, device):
    """The two maps' gradients reach spatial_pool_backward_add as channels of the spatial conv's
    input gradient, and the mean's reaches channel_pool_backward_add so too; the CUDA and Triton
    kernels read them there, where a copy of each cost two kernels a step. (The CPU operators copy
    them: on the CPU the maps are channels_last, and a copy of a map is small beside the conv's
    own work.)"""
    if backend == "cpu":
        pytest.skip("the CPU operator copies the gradients")
    module = fused_cbam.nn.CBAM(16, 4, backend=backend).to(device)
    x = make_input((2, 16, 5, 6), torch.float32, device, memory_format, requires_grad=True)
    out = module(x)
    with torch.profiler.profile() as profile:
        out.backward(torch.randn_like(out))
    for op in ("spatial_pool_backward_add", "channel_pool_backward_add"):
        inside = []
        for event in profile.events():
            parent = event.cpu_parent
            while parent is not None and op not in parent.name:
                parent = parent.cpu_parent
            if parent is not None:
                inside.append(event.name)
        assert inside, f"{op} did not run"
        # (A copy is a clone; Triton's interpreter copies every argument to the host and back.)
        assert "aten::clone" not in inside, (op, inside)
