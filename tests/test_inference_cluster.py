"""cbam_inference's cluster kernel (csrc/cuda/inference_cluster.cu, FUSED_CBAM_CUDA_INFERENCE=cluster):
the whole block in one kernel of thread-block clusters on sm_90 and later. Each test checks that
the kernel ran (the profiler's kernel names), not the chunked form it falls back to, and compares
with the reference; torch.empty is poisoned with NaN, so an unwritten element shows."""

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import SHAPES, TOLERANCE, assert_close, make_input, skip_unless_available
from test_inference import LAYOUTS, _check_property, _pair
from test_properties import FULL_SIZES, _profile, cases

pytestmark = pytest.mark.needs_cuda

CLUSTER_KERNEL = "cbam_cluster_kernel"

# Shapes past the small ones: samples a cluster (S) above 1 with a short last cluster (S grows
# while a block is left for every SM: 67 samples of 2048 x 7 x 7), channels that split unevenly
# over the blocks and the 16-byte vectors (255, 33), many pixels a block (56 x 56), and a batch
# whose clusters outnumber what the device holds at once.
CLUSTER_SHAPES = SHAPES + [
    pytest.param((67, 2048, 7, 7), id="samples-a-cluster"),
    pytest.param((5, 255, 14, 14), id="C=255"),
    pytest.param((3, 33, 9, 11), id="C=33"),
    pytest.param((2, 64, 56, 56), id="56x56"),
    pytest.param((300, 64, 8, 8), id="many-clusters"),
]


def _skip_unless_clusters():
    skip_unless_available("cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90 or later")


@pytest.fixture
def cluster(monkeypatch):
    _skip_unless_clusters()
    monkeypatch.setenv("FUSED_CBAM_CUDA_INFERENCE", "cluster")
    # The poison fixture turns deterministic algorithms on: the reference's MLP (cuBLAS) then needs this.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _kernels(run):
    """run()'s result and the names of the GPU kernels it launched."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        out = run()
        torch.cuda.synchronize()
    return out, [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _ran_the_cluster_kernel(kernels):
    """One cluster kernel, and nothing else of the operator's (no chunked pass beside it)."""
    ours = [k for k in kernels if "fused_cbam::gpu::" in k]
    return len(ours) == 1 and CLUSTER_KERNEL in ours[0]


def _check(layout, dtype, memory_format, shape):
    fused, reference = _pair(layout, shape[1], dtype, "cuda", "cuda")
    x = make_input(shape, dtype, "cuda", memory_format)
    with torch.no_grad():
        out, kernels = _kernels(lambda: fused(x))
        expected = reference(x)
    assert _ran_the_cluster_kernel(kernels), kernels
    assert_close(out, expected, TOLERANCE[dtype] * 4, "out", rounded_once=False)  # the MLP, the conv
    if memory_format == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("cluster", "poison")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", CLUSTER_SHAPES)
def test_the_cluster_kernel_matches_the_reference(layout, dtype, memory_format, shape):
    _check(layout, dtype, memory_format, shape)


@pytest.mark.usefixtures("cluster", "poison")
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_misaligned_x_takes_the_element_copies(memory_format):
    """x's data one element past a 16-byte boundary: no row of the slice can be copied in 16-byte
    pieces, and each is copied (and written back) element by element."""
    fused, reference = _pair("official", 64, torch.bfloat16, "cuda", "cuda")
    x = make_input((4, 64, 9, 10), torch.bfloat16, "cuda", memory_format)
    buffer = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    x = buffer[1:].as_strided(x.shape, x.stride()).copy_(x)
    with torch.no_grad():
        out, kernels = _kernels(lambda: fused(x))
        assert_close(out, reference(x), TOLERANCE[torch.bfloat16] * 4, "out", rounded_once=False)
    assert _ran_the_cluster_kernel(kernels), kernels


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("case", ["float64", "float32-parameters", "not-asked"])
def test_what_the_cluster_kernel_does_not_take_runs_chunked(case, monkeypatch):
    """float64 x, parameters in another dtype than x's (mixed precision), and a call without
    FUSED_CBAM_CUDA_INFERENCE=cluster: the chunked form, with the same result."""
    dtype = torch.float64 if case == "float64" else torch.bfloat16
    parameters = torch.float32 if case == "float32-parameters" else dtype
    fused, reference = _pair("official", 32, parameters, "cuda", "cuda")
    if case == "not-asked":
        monkeypatch.delenv("FUSED_CBAM_CUDA_INFERENCE")
    x = make_input((3, 32, 6, 7), dtype, "cuda", "channels_last")
    mixed = torch.autocast("cuda", dtype=dtype) if parameters != dtype else contextlib.nullcontext()
    with torch.no_grad(), mixed:
        out, kernels = _kernels(lambda: fused(x))
        expected = reference(x)
    assert not any(CLUSTER_KERNEL in k for k in kernels), kernels
    assert_close(out, expected, TOLERANCE[dtype] * 4, "out", rounded_once=False)


def test_the_cluster_kernel_is_deterministic(cluster):
    """A fixed order of every float sum (partials combined in rank order): the same bits each call."""
    fused, _ = _pair("official", 256, torch.bfloat16, "cuda", "cuda")
    x = make_input((40, 256, 28, 28), torch.bfloat16, "cuda", "channels_last")
    with torch.no_grad():
        first = fused(x)
        assert all(torch.equal(fused(x), first) for _ in range(3))


@_profile(max_examples=150)
@given(case=cases(FULL_SIZES), layout=st.sampled_from(sorted(LAYOUTS)))
def test_property_matches_the_reference(case, layout):
    """Shapes with 1s and primes, strided views, ties and NaNs, as the chunked form's property
    test, with the cluster kernel asked for (float64 runs chunked)."""
    _skip_unless_clusters()
    with mock.patch.dict(os.environ, {"FUSED_CBAM_CUDA_INFERENCE": "cluster"}):
        _check_property(case, layout, "cuda", "cuda")


def test_an_unknown_choice_is_refused_naming_the_variable(monkeypatch):
    skip_unless_available("cuda")
    monkeypatch.setenv("FUSED_CBAM_CUDA_INFERENCE", "clusters")
    fused, _ = _pair("official", 16, torch.float32, "cuda", "cuda")
    with torch.no_grad(), pytest.raises(ValueError, match='FUSED_CBAM_CUDA_INFERENCE: expected "chunks" or "cluster"'):
        fused(make_input((2, 16, 5, 5), torch.float32, "cuda"))
