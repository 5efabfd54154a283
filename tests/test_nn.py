"""fused_cbam.nn.CBAM against the official layout: checkpoints, outputs, every gradient, BN state."""

import copy

import pytest
import torch

import fused_cbam
from helpers import COMPILED_BACKENDS, assert_close, make_input, runs_fused
from official_cbam import OfficialCBAM


def _pair(channels, backend, device, **kwargs):
    """An official module with non-trivial weights and the fused module loaded from it."""
    official = OfficialCBAM(channels, **kwargs).to(device)
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = fused_cbam.nn.CBAM(channels, **kwargs, backend=backend).to(device)
    fused.load_state_dict(official.state_dict(), strict=True)
    return official, fused


def test_state_dict_keys_are_the_official_ones():
    official, fused = _pair(32, "reference", "cpu")
    assert list(fused.state_dict()) == list(official.state_dict())
    official.load_state_dict(fused.state_dict(), strict=True)


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", [{}, {"no_spatial": True}, {"pool_types": ("avg",)}, {"reduction_ratio": 4}], ids=str)
def test_matches_official_forward_backward_and_bn_state(backend, device, memory_format, train, kwargs):
    official, fused = _pair(32, backend, device, **kwargs)
    official.train(train)
    fused.train(train)
    x = make_input((3, 32, 9, 11), torch.float32, device, memory_format, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ops = ("channel_pool", "gate_apply") + (() if kwargs.get("no_spatial") else ("spatial_pool",))
    with runs_fused(backend, *ops):
        out = fused(x)
    ref = official(x_ref)
    assert_close(out, ref, 1e-5, "output")
    grad = torch.randn_like(ref)
    with runs_fused(backend, "gate_apply_backward"):
        out.backward(grad)
    ref.backward(grad)
    assert_close(x.grad, x_ref.grad, 1e-5, "grad of x")
    official_params = dict(official.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, official_params[name].grad, 1e-4, f"grad of {name}")
    official_buffers = dict(official.named_buffers())
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, official_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_error_is_bounded_by_eager_error(backend, device, dtype):
    """Against float64, the fused module errs at most twice as much as the official code in that dtype."""
    official, fused = _pair(64, backend, device)
    official.eval(), fused.eval()
    x = make_input((2, 64, 14, 14), torch.float32, device).to(dtype)
    exact = copy.deepcopy(official).double()(x.double())
    eager_err = (official.to(dtype)(x).double() - exact).abs().max().item()
    fused_err = (fused.to(dtype)(x).double() - exact).abs().max().item()
    assert fused_err <= 2 * eager_err, f"fused error {fused_err:.3g} vs eager {eager_err:.3g}"


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck_module_float64(backend, device, train):
    _, fused = _pair(8, backend, device, reduction_ratio=2)
    fused.double().train(train)
    x = make_input((2, 8, 5, 6), torch.float64, device, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (x,))


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
def test_nan_propagates_like_the_official_code(backend, device):
    official, fused = _pair(16, backend, device)
    official.eval(), fused.eval()
    x = make_input((2, 16, 5, 5), torch.float32, device)
    x[0, 3, 2, 2] = float("nan")
    out, ref = fused(x), official(x)
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close(out, ref, 1e-5, "output")


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
def test_input_is_not_modified(backend, device):
    _, fused = _pair(16, backend, device)
    x = make_input((2, 16, 5, 5), torch.float32, device, requires_grad=True)
    before = x.detach().clone()
    fused(x).sum().backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
def test_empty_batch_forward_and_backward(backend, device):
    _, fused = _pair(16, backend, device)
    fused.eval()
    x = make_input((0, 16, 5, 5), torch.float32, device, requires_grad=True)
    out = fused(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend, device):
    official, fused = _pair(16, backend, device)
    compiled = torch.compile(fused, fullgraph=True)
    x = make_input((2, 16, 7, 7), torch.float32, device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = compiled(x), official(x_ref)
    out.sum().backward()
    ref.sum().backward()
    assert_close(out, ref, 1e-5, "output")
    assert_close(x.grad, x_ref.grad, 1e-5, "grad of x")


def test_last_gates_are_kept_only_when_asked():
    _, fused = _pair(16, "reference", "cpu")
    x = make_input((2, 16, 5, 6), torch.float32, "cpu")
    fused(x)
    assert fused.last_channel_gate is None and fused.last_spatial_gate is None
    fused.keep_gates = True
    out = fused(x)
    g, h = fused.last_channel_gate, fused.last_spatial_gate
    assert g.shape == (2, 16) and h.shape == (2, 1, 5, 6) and not g.requires_grad
    assert ((h > 0) & (h < 1)).all()
    assert_close(out, x * g[:, :, None, None] * h, 1e-6, "output from the kept gates")
    fused.keep_gates = False  # drops them: no stale gates of an earlier input
    assert fused.last_channel_gate is None and fused.last_spatial_gate is None
    with torch.no_grad():
        fused.eval()(x[:1])
    assert fused.last_channel_gate is None and fused.last_spatial_gate is None


def test_keep_gates_set_on_the_instance_in_an_older_pickle_is_kept():
    _, fused = _pair(16, "reference", "cpu")
    state = dict(fused.__dict__)
    state["keep_gates"] = True  # where pickles made before it was a property hold it
    state.pop("_keep_gates", None)
    loaded = type(fused).__new__(type(fused))
    loaded.__setstate__(state)
    assert loaded.keep_gates
