"""Property-based tests: every public operator, on every backend this machine has, against the
reference backend, forward and backward, over shapes (1s and primes), dtypes, value patterns
(ties, NaN) and memory layouts (NCHW, channels_last, sliced, transposed and expanded views); and
the modules' training backward, whose spatial pooling leaves its mean's share to the channel
pooling's pass, against the two operators that add their whole shares.

Hypothesis runs derandomized and without an example database, so CI sees the same examples on
every run; each example carries its own seed for the tensor values. ``FUSED_CBAM_SOAK=K`` (a
whole number) runs K times the examples, randomized: a longer search for rare cases, outside CI.
The Triton cases run in Triton's interpreter without a GPU, so they get fewer examples and tiny
shapes.
"""

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_cbam
from fused_cbam._layout import empty_like_x, mean_and_max
from helpers import (
    COMPILED_BACKENDS,
    TOLERANCE,
    TRITON_DEVICE,
    assert_close,
    backend_available,
    operator_namespace,
)

OPS = ["channel_pool", "spatial_pool", "gate_apply"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "channels_last", "sliced", "transposed", "expanded"]


@dataclass(frozen=True)
class Sizes:
    max_batch: int
    channels: tuple[int, ...]
    spatial: tuple[int, ...]


# 1s, primes, one power of two, and 257: one more than a CPU channel block (256).
FULL_SIZES = Sizes(3, (1, 2, 3, 5, 7, 13, 17, 31, 64, 257), (1, 2, 3, 5, 7, 11, 13))
# The interpreter is slow: shapes that still cross its blocks (BLOCK_C = 8, BLOCK_P = 16).
TINY_SIZES = Sizes(2, (1, 2, 3, 5, 7, 13, 17), (1, 2, 3, 5, 7))


_SOAK = int(os.environ.get("FUSED_CBAM_SOAK", "0"))


def _profile(max_examples: int) -> settings:
    """Reproducible in CI: derandomized, no example database, no per-example deadline; with
    FUSED_CBAM_SOAK=K, K times the examples from a random start (a failure's falsifying example
    holds everything needed to rerun it, its tensors' seed included)."""
    return settings(
        max_examples=max_examples * _SOAK if _SOAK else max_examples,
        deadline=None,
        derandomize=not _SOAK,
        database=None,
        # the autouse random-state fixture of conftest.py is harmless: values come from each
        # example's own seed
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    layout: str
    values: str  # "normal", "ties" (small integers) or "nan" (normal with a few NaNs)
    slice_dim: str  # for the "sliced" layout: "channels" (x[:, ::2]) or "width" (x[..., 1:])
    with_channel: bool  # spatial_pool's scale / gate_apply's channel gate given or None
    with_spatial: bool  # gate_apply's spatial gate given or None
    gate_dtype: str  # "same" as x, or "float32" (converted to x's dtype by the operator)
    transposed_gate: bool  # the [N, C] tensor passed as a non-contiguous view
    seed: int


@st.composite
def cases(draw, sizes: Sizes):
    batches = list(range(1, sizes.max_batch + 1))
    shape = (
        draw(st.sampled_from(batches * 3 + [0])),  # an empty batch in about one case in 3N+1
        draw(st.sampled_from(sizes.channels)),
        draw(st.sampled_from(sizes.spatial)),
        draw(st.sampled_from(sizes.spatial)),
    )
    return Case(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        values=draw(st.sampled_from(["normal", "ties", "nan"])),
        slice_dim=draw(st.sampled_from(["channels", "width"])),
        with_channel=draw(st.booleans()),
        with_spatial=draw(st.booleans()),
        gate_dtype=draw(st.sampled_from(["same", "float32"])),
        transposed_gate=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _values(shape, case: Case, gen: torch.Generator) -> torch.Tensor:
    if case.values == "ties":
        t = torch.randint(-2, 3, shape, generator=gen).double()
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if case.values == "nan":
            t[torch.rand(shape, generator=gen) < 0.05] = float("nan")
    return t.to(case.dtype)


def _base_and_view(case: Case, gen: torch.Generator):
    """The leaf tensor the values live in, and the function that makes x from it (a view)."""
    n, c, h, w = case.shape
    if case.layout == "nchw":
        return _values((n, c, h, w), case, gen), lambda b: b
    if case.layout == "channels_last":
        return _values((n, c, h, w), case, gen).to(memory_format=torch.channels_last), lambda b: b
    if case.layout == "sliced" and case.slice_dim == "channels":
        return _values((n, 2 * c, h, w), case, gen), lambda b: b[:, ::2]
    if case.layout == "sliced":
        return _values((n, c, h, w + 1), case, gen), lambda b: b[..., 1:]
    if case.layout == "transposed":
        return _values((n, c, w, h), case, gen), lambda b: b.transpose(2, 3)
    assert case.layout == "expanded"
    return _values((1, c, h, w), case, gen), lambda b: b.expand(n, c, h, w)


def _gates(op: str, case: Case, gen: torch.Generator) -> tuple:
    """The operator's other inputs (leaves, never zero); None where the case leaves one out."""
    n, c, h, w = case.shape
    dtype = case.dtype if case.gate_dtype == "same" else torch.float32

    def gate(*shape):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)

    channel = gate(c, n).t() if case.transposed_gate else gate(n, c)
    if op == "channel_pool":
        return ()
    if op == "spatial_pool":
        return (channel if case.with_channel else None,)
    return (channel if case.with_channel else None, gate(n, 1, h, w) if case.with_spatial else None)


def _run(op, backend, x, gates):
    out = getattr(fused_cbam, op)(x, *gates, backend=backend)
    return out if isinstance(out, tuple) else (out,)


def _forward_backward(op, backend, device, case, base, view, gates, grads_out=None):
    """Outputs, x, and gradients w.r.t. the base tensor and each given gate (fresh leaves)."""
    base = base.detach().clone().to(device).requires_grad_()
    gates = tuple(None if g is None else g.detach().clone().to(device).requires_grad_() for g in gates)
    x = view(base)
    outs = _run(op, backend, x, gates)
    if grads_out is None:
        gen = torch.Generator().manual_seed(case.seed + 1)
        grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(device) for o in outs]
    inputs = [base, *(g for g in gates if g is not None)]
    grads = torch.autograd.grad(outs, inputs, grads_out)
    return outs, x, grads, grads_out


def check_against_reference(op: str, backend: str, device: str, case: Case) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    base, view = _base_and_view(case, gen)
    gates = _gates(op, case, gen)
    outs, x, grads, grads_out = _forward_backward(op, backend, device, case, base, view, gates)
    ref_outs, _, ref_grads, _ = _forward_backward(op, "reference", device, case, base, view, gates, grads_out)

    atol = TOLERANCE[case.dtype]
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.dtype == case.dtype, f"{op} output {i}: dtype {out.dtype}, expected x's {case.dtype}"
        if op != "gate_apply" and i == 1:  # a max is exact in every dtype
            torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        else:
            assert_close(out, ref, atol, f"{op} output {i}")
    if op == "gate_apply":  # the memory format the fake kernel promises
        promised = empty_like_x(x).stride()
        assert outs[0].stride() == promised or outs[0].numel() == 0, (
            f"gate_apply output strides {outs[0].stride()}, the fake kernel's {promised} (x's {x.stride()})"
        )
    # An expanded x sums N gradients into its base, in x's dtype: N times the error of one, and
    # each element's rounding errors are its N terms', not its own.
    expanded = case.layout == "expanded"
    grad_atol = atol * 4 * (max(1, case.shape[0]) if expanded else 1)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == rg.dtype
        assert_close(g, rg, grad_atol, f"{op} gradient of input {i}", rounded_once=not (expanded and i == 0))


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@_profile(max_examples=300)
@given(case=cases(FULL_SIZES))
def test_compiled_backend_matches_reference(backend, device, op, case):
    if not backend_available(backend):
        pytest.skip(f"the {backend} backend is unavailable")
    check_against_reference(op, backend, device, case)


# On a GPU every new shape autotunes each kernel (compiling and timing its configurations):
# a few examples there, tests/test_triton.py has the rest.
_TRITON_EXAMPLES = 6 if TRITON_DEVICE == "cuda" else 40


@pytest.mark.parametrize("op", OPS)
@_profile(max_examples=_TRITON_EXAMPLES)
@given(case=cases(TINY_SIZES))
def test_triton_matches_reference(op, case):
    if not backend_available("triton"):
        pytest.skip("the Triton backend is unavailable (Triton missing, or no GPU and no TRITON_INTERPRET=1)")
    if case.dtype == torch.float64:  # the Triton backend's documented limit: a clear TypeError
        x = torch.zeros(case.shape, dtype=case.dtype, device=TRITON_DEVICE)
        with pytest.raises(TypeError, match="supports float16, bfloat16 and float32"):
            _run(op, "triton", x, ())
        return
    check_against_reference(op, "triton", TRITON_DEVICE, case)


@dataclass(frozen=True)
class PairCase:
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    channels_last: bool  # x's memory format
    maps_channels_last: bool  # the stacked maps' gradient's (the spatial conv's input gradient)
    max_first: bool
    seed: int


@st.composite
def pair_cases(draw, sizes: Sizes, dtypes):
    batches = list(range(1, sizes.max_batch + 1))
    return PairCase(
        shape=(
            draw(st.sampled_from(batches * 3 + [0])),
            draw(st.sampled_from(sizes.channels)),
            draw(st.sampled_from(sizes.spatial)),
            draw(st.sampled_from(sizes.spatial)),
        ),
        dtype=draw(st.sampled_from(dtypes)),
        channels_last=draw(st.booleans()),
        maps_channels_last=draw(st.booleans()),
        max_first=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_the_backward_pair(backend: str, device: str, case: PairCase) -> None:
    """The modules' training backward adds the spatial pooling's max share
    (``spatial_pool_backward_add(add_mean=False)``) and then the channel pooling's share with the
    spatial mean's (``channel_pool_backward_add(..., spatial_grad_mean, spatial_scale)``): the
    same gradient of x and of the scale as the two operators that add their whole shares."""
    ops = operator_namespace(backend)
    gen = torch.Generator().manual_seed(case.seed)
    n, c, h, w = case.shape

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype).to(device)

    x = randn(n, c, h, w)
    x = x.contiguous(memory_format=torch.channels_last) if case.channels_last else x
    scale = (torch.rand(n, c, generator=gen, dtype=torch.float64) + 0.5).to(case.dtype).to(device)
    _, _, channel_argmax = ops.channel_pool(x)
    _, spatial_argmax = ops.spatial_pool(x, scale, case.max_first)
    grad_maps = randn(n, 2, h, w)
    grad_maps = grad_maps.contiguous(memory_format=torch.channels_last) if case.maps_channels_last else grad_maps
    grad_mean, grad_max = mean_and_max(grad_maps, case.max_first)
    grad_mean.mul_(c)  # its share (/ C) as large as the others, so that losing it shows in 16 bits
    grad_avg, grad_channel_max = randn(n, c), randn(n, c)
    start = torch.empty_like(x).copy_(randn(n, c, h, w))  # the gate's gradient, in x's format

    whole = start.clone()
    expected_scale = ops.spatial_pool_backward_add(whole, grad_mean, grad_max, spatial_argmax, x, scale)
    ops.channel_pool_backward_add(whole, grad_avg, grad_channel_max, channel_argmax)
    moved = start.clone()
    grad_scale = ops.spatial_pool_backward_add(moved, grad_mean, grad_max, spatial_argmax, x, scale, add_mean=False)
    ops.channel_pool_backward_add(moved, grad_avg, grad_channel_max, channel_argmax, grad_mean, scale)
    assert moved.stride() == start.stride()
    assert_close(moved, whole, TOLERANCE[case.dtype] * 2, "gradient of x", rounded_once=False)
    assert_close(grad_scale, expected_scale, TOLERANCE[case.dtype], "gradient of the scale")


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@_profile(max_examples=200)
@given(case=pair_cases(FULL_SIZES, DTYPES))
def test_compiled_backend_backward_pair_matches_the_whole_shares(backend, device, case):
    if not backend_available(backend):
        pytest.skip(f"the {backend} backend is unavailable")
    check_the_backward_pair(backend, device, case)


@_profile(max_examples=_TRITON_EXAMPLES // 2)
@given(case=pair_cases(TINY_SIZES, [torch.float32, torch.bfloat16, torch.float16]))
def test_triton_backward_pair_matches_the_whole_shares(case):
    if not backend_available("triton"):
        pytest.skip("the Triton backend is unavailable (Triton missing, or no GPU and no TRITON_INTERPRET=1)")
    check_the_backward_pair("triton", TRITON_DEVICE, case)
