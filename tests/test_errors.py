"""Bad input gets a TypeError/ValueError that names the argument and what was expected."""

import subprocess
import sys

import pytest
import torch

import fused_cbam
from helpers import OPERATOR_BACKENDS, make_input, mean_max_argmax, needs_cuda, operator_namespace, skip_unless_available

BACKENDS = ["reference"] + (["cpu"] if "cpu" in fused_cbam.available_backends() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(2, 3, 4), ValueError, r"x: expected a 4-D tensor \(N, C, H, W\)"),
        (torch.randn(2, 3, 4, 4, 1), ValueError, r"\(N, C, H, W\)"),
        (torch.ones(2, 3, 4, 4, dtype=torch.int64), TypeError, "x: expected a floating-point dtype"),
        (torch.ones(2, 3, 4, 4, dtype=torch.bool), TypeError, "x: expected a floating-point dtype"),
        (torch.ones(2, 3, 4, 4, dtype=torch.complex64), TypeError, "x: expected a floating-point dtype"),
        (torch.randn(2, 3, 0, 4), ValueError, "x: expected a non-empty spatial size"),
        (torch.randn(2, 0, 4, 4), ValueError, "x: expected at least one channel"),
        ([[1.0]], TypeError, "x: expected a torch.Tensor"),
    ],
)
def test_bad_x(backend, x, error, match):
    for call in (fused_cbam.channel_pool, fused_cbam.spatial_pool, fused_cbam.gate_apply):
        with pytest.raises(error, match=match):
            call(x, backend=backend)
    with pytest.raises(error, match=match):
        fused_cbam.nn.CBAM(3, reduction_ratio=1, backend=backend)(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_mismatch_names_both_numbers(backend):
    with pytest.raises(ValueError, match="x: expected 32 channels.*got 16"):
        fused_cbam.nn.CBAM(32, backend=backend)(torch.randn(2, 16, 5, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_scale_and_gates(backend):
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"channel_scale: expected shape \(2, 3\)"):
        fused_cbam.spatial_pool(x, torch.rand(2, 4), backend=backend)
    with pytest.raises(TypeError, match="channel_scale: expected a floating-point dtype"):
        fused_cbam.spatial_pool(x, torch.ones(2, 3, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"spatial_gate: expected shape \(2, 1, 4, 5\)"):
        fused_cbam.gate_apply(x, None, torch.rand(2, 1, 5, 4), backend=backend)
    with pytest.raises(ValueError, match=r"channel_gate: expected shape \(2, 3\)"):
        fused_cbam.gate_apply(x, torch.rand(3, 2), backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="channel_scale: expected a tensor on cpu"):
        fused_cbam.spatial_pool(x, torch.rand(2, 3, device="cuda"))


def test_tensors_on_different_devices_meta():
    """Without a GPU, a meta tensor stands in for the second device."""
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="channel_scale: expected a tensor on cpu"):
        fused_cbam.spatial_pool(x, torch.rand(2, 3, device="meta"), backend="reference")


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_operators_refuse_an_argument_on_the_meta_device(backend, device):
    """A meta tensor among the arguments sends a call to the fake kernels (the Meta key wins over
    the CPU's and CUDA's), which used to return x-device outputs that nothing wrote: they check
    the devices as the kernels do, naming the argument."""
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    x = torch.randn(2, 3, 4, 5, device=device)
    meta = {"device": "meta"}
    gate, grad = torch.rand(2, 3, device=device), torch.rand(2, 3, device=device)
    argmax = torch.zeros(2, 3, dtype=torch.int32, device=device)
    calls = {
        "scale": lambda: ops.spatial_pool(x, torch.rand(2, 3, **meta)),
        "spatial_gate": lambda: ops.gate_apply(x, gate, torch.rand(2, 1, 4, 5, **meta)),
        "grad_avg": lambda: ops.channel_pool_backward(torch.rand(2, 3, **meta), grad, argmax, x),
        "argmax": lambda: ops.channel_pool_backward_add(torch.zeros_like(x), grad, grad, argmax.to("meta")),
        "fc1_weight": lambda: ops.cbam_inference(
            x, torch.randn(1, 3, **meta), None, torch.randn(3, 1, device=device), None, "sum",
            torch.randn(1, 2, 7, 7, device=device), None, None, None, None, None, 1e-5, True,
        ),  # fmt: skip
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name}: expected a tensor on {device}"):
            call()


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_the_spatial_mean_share_takes_its_scale(backend, device):
    """The mean's share that spatial_pool_backward_add leaves out (add_mean=False) is
    scale[n, c] * grad_mean[n, p] / C: without a scale it is not left out, and
    channel_pool_backward_add takes the two tensors together, each of its shape."""
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    x = torch.randn(2, 3, 4, 5, device=device)
    _, _, cidx = ops.channel_pool(x)
    _, _, sidx = mean_max_argmax(ops.spatial_pool(x, None))
    grad, grad_map = torch.rand(2, 3, device=device), torch.rand(2, 1, 4, 5, device=device)
    with pytest.raises(ValueError, match="add_mean: expected True without a scale"):
        ops.spatial_pool_backward_add(torch.zeros_like(x), grad_map, grad_map, sidx, x, None, add_mean=False)
    for name, given in [("spatial_grad_mean", {"spatial_grad_mean": grad_map}), ("spatial_scale", {"spatial_scale": grad})]:
        with pytest.raises(ValueError, match=f"spatial_grad_mean, spatial_scale: expected both .* got only {name}"):
            ops.channel_pool_backward_add(torch.zeros_like(x), grad, grad, cidx, **given)
    with pytest.raises(ValueError, match=r"spatial_grad_mean.* shape .2, 1, 4, 5."):
        ops.channel_pool_backward_add(torch.zeros_like(x), grad, grad, cidx, grad_map[:, :, :2], grad)
    with pytest.raises(ValueError, match=r"spatial_scale.* shape .2, 3."):
        ops.channel_pool_backward_add(torch.zeros_like(x), grad, grad, cidx, grad_map, grad[:, :2])


def test_unknown_or_unavailable_backend():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="backend: expected one of"):
        fused_cbam.channel_pool(x, backend="fast")
    with pytest.raises(ValueError, match="backend: expected one of"):
        fused_cbam.nn.CBAM(16, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
            fused_cbam.channel_pool(x, backend="cuda")


def test_available_backends_lists_reference():
    assert "reference" in fused_cbam.available_backends()


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_an_argmax_of_another_input_is_refused(memory_format):
    """The CPU backward kernels write at the arg-max positions: indices from another x (same N
    and C, larger H x W or C) are refused, not written outside the gradient."""
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled CPU backend is not built")
    ops = torch.ops.fused_cbam
    small = make_input((2, 4, 3, 3), torch.float32, "cpu", memory_format)
    _, _, positions = ops.channel_pool(make_input((2, 4, 16, 16), torch.float32, "cpu", memory_format))
    grad = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"argmax: expected positions h \* W \+ w in \[0, 9\)"):
        ops.channel_pool_backward(grad, grad, positions, small)
    with pytest.raises(ValueError, match=r"argmax: expected positions"):
        ops.channel_pool_backward_add(torch.zeros_like(small), grad, grad, positions)
    _, _, channels = mean_max_argmax(ops.spatial_pool(make_input((2, 64, 3, 3), torch.float32, "cpu", memory_format), None))
    grad = torch.rand(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"argmax: expected channels in \[0, 4\)"):
        ops.spatial_pool_backward(grad, grad, channels, small, None)
    with pytest.raises(ValueError, match=r"argmax: expected channels"):
        ops.spatial_pool_backward_add(torch.zeros_like(small), grad, grad, channels, small, None)


# Each call in a process of its own: a device-side assert leaves the CUDA context unusable.
_OUT_OF_RANGE_ARGMAX = """
import sys, torch, fused_cbam
ops, case = torch.ops.fused_cbam, sys.argv[1]
fmt = torch.channels_last if case.endswith("channels_last") else torch.contiguous_format
x = torch.randn(2, 4, 3, 3, device="cuda").to(memory_format=fmt)
if case.startswith("channel"):
    grad = torch.rand(2, 4, device="cuda")
    argmax = torch.full((2, 4), 9, dtype=torch.int32, device="cuda")  # positions are 0..8
    ops.channel_pool_backward(grad, grad, argmax, x)
else:  # spatial (with a scale: its own kernel) or spatial_unscaled
    grad = torch.rand(2, 1, 3, 3, device="cuda")
    argmax = torch.full((2, 1, 3, 3), 4, dtype=torch.int32, device="cuda")  # channels are 0..3
    scale = None if case.startswith("spatial_unscaled") else torch.rand(2, 4, device="cuda")
    ops.spatial_pool_backward(grad, grad, argmax, x, scale)
torch.cuda.synchronize()
"""


@needs_cuda
@pytest.mark.parametrize("kernel", ["channel", "spatial", "spatial_unscaled"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_an_out_of_range_argmax_stops_the_cuda_kernel(kernel, memory_format):
    """The CUDA backward kernels compare each position with the arg-max instead of writing at
    it, so an arg-max outside x cannot write outside the gradient; it stops the kernel with a
    device-side assert (as ATen's index checks do) instead of dropping the max's gradient."""
    if "cuda" not in fused_cbam.available_backends():
        pytest.skip("the CUDA backend is not built")
    case = f"{kernel}-{memory_format}"
    result = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE_ARGMAX, case], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, "the kernel ran past an out-of-range argmax"
    assert "device-side assert" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: fused_cbam.nn.CBAM(32, 0), ValueError, "reduction_ratio: expected a positive ratio"),
        (lambda: fused_cbam.nn.CBAM(8, 16), ValueError, r"reduction_ratio: .* got 8 // 16"),
        (lambda: fused_cbam.nn.CBAM(32, pool_types=("avg", "sum")), ValueError, "pool_types: expected"),
        (lambda: fused_cbam.nn.MMYoloCBAM(8), ValueError, r"reduce_ratio: .* got 8 / 16"),
        (lambda: fused_cbam.nn.MMYoloCBAM(32, reduce_ratio=0), ValueError, "reduce_ratio: expected a positive ratio"),
        (lambda: fused_cbam.nn.MMYoloCBAM(32, reduce_ratio=4, kernel_size=4), ValueError, "kernel_size: expected an odd"),
        (lambda: fused_cbam.nn.CbamModule(32, gate_layer="no-such-gate"), ValueError, "gate_layer: expected"),
        (lambda: fused_cbam.nn.CbamModule(32, spatial_kernel_size=6), ValueError, "kernel_size: expected an odd"),
        (lambda: fused_cbam.nn.UltralyticsCBAM(16, kernel_size=5), ValueError, "kernel_size: expected 3 or 7"),
    ],
    ids=["ratio-0", "no-hidden", "pool", "mmyolo-no-hidden", "mmyolo-ratio-0", "mmyolo-kernel", "timm-gate", "timm-kernel",
         "ultralytics-kernel"],  # fmt: skip
)
def test_bad_constructor_arguments_name_the_argument(make, error, match):
    """Where the originals raise a ZeroDivisionError, a KeyError, or build a block whose first
    forward fails inside a conv (mmyolo's hidden size 0)."""
    with pytest.raises(error, match=match):
        make()
