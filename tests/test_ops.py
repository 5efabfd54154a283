"""Every compiled operator against the reference: values, arg-max, gradients, gradcheck, opcheck."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_cbam
from fused_cbam import _library, _registrations, reference
from helpers import (
    COMPILED_BACKENDS,
    FORMATS,
    OPERATOR_BACKENDS,
    SHAPES,
    TOLERANCE,
    assert_close,
    backend_available,
    make_input,
    mean_max_argmax,
    needs_cuda,
    operator_namespace,
    runs_fused,
    skip_unless_available,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _args(op, x):
    """The per-sample tensors each operator takes besides x, fresh and random (never zeros)."""
    n, c, h, w = x.shape
    if op == "channel_pool":
        return ()
    scale = torch.rand(n, c, dtype=x.dtype, device=x.device) + 0.5
    if op == "spatial_pool":
        return (scale.requires_grad_(x.requires_grad),)
    spatial = torch.rand(n, 1, h, w, dtype=x.dtype, device=x.device) + 0.5
    return scale.requires_grad_(x.requires_grad), spatial.requires_grad_(x.requires_grad)


def _run(op, backend, x, args):
    """The public function of ``op`` on ``backend``, checked to dispatch that backend's operator."""
    fn = getattr(fused_cbam, op) if backend != "reference" else getattr(reference, op)
    kwargs = {"backend": backend} if backend != "reference" else {}
    with runs_fused(backend, op):
        out = fn(x, *args, **kwargs)
    return out if isinstance(out, tuple) else (out,)


OPS = ["channel_pool", "spatial_pool", "gate_apply"]


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_reference(backend, device, op, shape, memory_format, dtype):
    x = make_input(shape, dtype, device, memory_format, requires_grad=True)
    args = _args(op, x)
    outs = _run(op, backend, x, args)
    ref_x = x.detach().clone().requires_grad_()
    ref_args = tuple(a.detach().clone().requires_grad_() for a in args)
    ref_outs = _run(op, "reference", ref_x, ref_args)
    atol = TOLERANCE[dtype]
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.dtype == x.dtype
        if op != "gate_apply" and i == 1:  # a max is exact in every dtype
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        else:
            assert_close(out, ref, atol, f"{op} output {i}")
    if op == "gate_apply":
        expected_format = torch.channels_last if memory_format == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1 else torch.contiguous_format
        assert outs[0].is_contiguous(memory_format=expected_format)

    grads_out = [torch.randn_like(o) for o in outs]
    inputs, ref_inputs = (x, *args), (ref_x, *ref_args)
    with runs_fused(backend, f"{op}_backward"):
        grads = torch.autograd.grad(outs, inputs, grads_out)
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, grads_out)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, atol * 4, f"{op} grad of input {i}")


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("max_first", [False, True], ids=["mean_first", "max_first"])
@pytest.mark.parametrize("shape", [(3, 13, 5, 7), (1, 4100, 2, 3)], ids=["3x13x5x7", "split_channels"])
def test_spatial_pool_stacks_its_maps_as_the_conv_takes_them(backend, device, memory_format, max_first, shape):
    """The operator's maps: [N, 2, H, W], NCHW-contiguous in x's either layout, the mean and the max
    in the order asked for; each map's gradient taken from its own channel of the maps'. Also
    with more channels than a few pixels' rows hold (CUDA splits them, then combines the parts)."""
    skip_unless_available(backend)
    if backend == "triton" and device == "cpu" and shape[1] > 2048:
        pytest.skip("Triton's interpreter: 4.5 s a case, and its kernels do not split channels")
    ops = operator_namespace(backend)
    n, c, h, w = shape
    x = make_input(shape, torch.float32, device, memory_format, requires_grad=True)
    scale = (torch.rand(n, c, device=device) + 0.5).requires_grad_()
    maps, argmax = ops.spatial_pool(x, scale, max_first)
    assert maps.shape == (n, 2, h, w) and maps.is_contiguous() and argmax.shape == (n, 1, h, w)
    expected = reference.spatial_maps(x, scale, max_first)
    assert_close(maps, expected, TOLERANCE[torch.float32], "maps")
    up = torch.randn_like(maps)
    got, want = (torch.autograd.grad(m, (x, scale), up) for m in (maps, expected))
    for g, w, name in zip(got, want, ("x", "scale")):
        assert_close(g, w, TOLERANCE[torch.float32], f"grad of {name}")


def _maxima_as_torch_max_gives(ops, x):
    """The channel and spatial poolings' maxima and int32 arg-maxima of x (scale 1), checked
    bit for bit against torch.max's (NaN wins, then the first index; a zero's sign too)."""
    _, cmax, cidx = ops.channel_pool(x)
    _, smax, sidx = mean_max_argmax(ops.spatial_pool(x, torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)))
    ref_c = reference._opmath(x).flatten(2).max(dim=2)
    ref_s = reference._opmath(x).max(dim=1, keepdim=True)
    torch.testing.assert_close(cmax, ref_c.values.to(x.dtype), equal_nan=True, rtol=0, atol=0)
    assert cidx.dtype == sidx.dtype == torch.int32
    torch.testing.assert_close(cidx, ref_c.indices.int(), rtol=0, atol=0)
    torch.testing.assert_close(smax, ref_s.values.to(x.dtype), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(sidx, ref_s.indices.int(), rtol=0, atol=0)
    for got, want in ((cmax, ref_c.values), (smax, ref_s.values)):  # -0.0 and +0.0 compare equal
        signed = ~want.isnan()
        assert torch.equal(got.signbit()[signed], want.signbit()[signed]), "the sign of a zero maximum"
    return cmax, cidx, smax, sidx


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_and_nan_follow_the_max_rule(backend, device, memory_format, dtype):
    """Ties send the whole gradient to the lowest index; NaN is the max and its first copy wins."""
    x = torch.randint(-2, 3, (2, 19, 6, 7), device=device).to(dtype)  # many ties
    x[0, 3, 2, 4] = x[1, 5, 0, 0] = x[1, 5, 3, 3] = float("nan")
    x[1, 7, 1, 1] = x[1, 9, 1, 1] = float("nan")
    if memory_format == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    _, cidx, _, sidx = _maxima_as_torch_max_gives(torch.ops.fused_cbam, x)
    assert cidx[0, 3].item() == 2 * 7 + 4 and cidx[1, 5].item() == 0  # the first NaN wins
    assert sidx[1, 0, 1, 1].item() == 7


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 2, 4300), (2, 4500, 1, 3)], ids=["P=8600", "C=4500"])
def test_ties_and_nan_in_the_later_blocks_of_long_rows(backend, device, memory_format, dtype, shape):
    """Rows longer than the kernels' blocks (the CPU's 4096 values, 256-value spans and 128-value
    search; Triton's and CUDA's tiles): a NaN only in a later block is still the max, its first
    copy the arg-max, and a tie goes to the first copy wherever the later ones sit."""
    skip_unless_available(backend)
    if backend == "triton":  # (slow in its interpreter; its tiles, at most 1024 long, are crossed too)
        shape = tuple(min(size, 1100) for size in shape)
    n, c, h, w = shape
    x = torch.randint(-2, 3, shape, device=device).to(dtype)  # many ties, the first one early
    long_planes = h * w > c
    if long_planes:  # NaN twice in a channel's row over H x W
        planes = x.view(n, c, h * w)
        planes[0, 1, -5] = planes[0, 1, -2] = float("nan")
    else:  # in a pixel's row over C
        x[1, -7, 0, 1] = x[1, -2, 0, 1] = float("nan")
    if memory_format == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    cmax, cidx, smax, sidx = _maxima_as_torch_max_gives(operator_namespace(backend), x)
    if long_planes:
        assert cmax[0, 1].isnan() and cidx[0, 1].item() == h * w - 5
    else:
        assert smax[1, 0, 0, 1].isnan() and sidx[1, 0, 0, 1].item() == c - 7


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 19, 6, 7), (3, 3, 2, 4300), (3, 4500, 1, 3)], ids=["small", "P=8600", "C=4500"])
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "offset3"])
def test_infinities_zeros_and_lone_nans_follow_the_max_rule(backend, device, memory_format, dtype, shape, offset):
    """Rows of -inf only (the arg-max is their first index), +inf ties, +inf beside -inf (their
    sum is NaN without a NaN), -inf then NaN, -0.0 tied with +0.0 (equal: the first one's sign),
    and a lone NaN at a row's start, middle or end, with x aligned or 3 elements past a 16-byte
    boundary (rows start in a vector kernel's scalar head). The kernels fold without the NaN rule
    while a row holds neither NaN nor such infinities and fold again with it where they show:
    each case must come out as torch.max's."""
    skip_unless_available(backend)
    if backend == "triton":  # (slow in its interpreter; its tiles, at most 1024 long, are crossed too)
        shape = tuple(min(size, 1100) for size in shape)
    n, c, h, w = shape
    p, ninf, inf, nan = h * w, float("-inf"), float("inf"), float("nan")
    mid = p // 2
    values = torch.randint(-2, 3, shape, device=device).to(dtype)
    planes = values.view(n, c, p)  # rows of the channel pooling along p, of the spatial one along c
    planes[0, 0] = ninf  # a plane of -inf only
    planes[0, -1] = ninf  # -inf, then +inf last
    planes[0, -1, -1] = inf
    planes[1, 0, -3:] = inf  # +inf tied in a later block, after -inf
    planes[1, 0, 1] = ninf
    planes[1, -1] = 0.0  # -0.0 first, then +0.0, and -inf
    planes[1, -1, 0] = -0.0
    planes[1, -1, 2] = ninf
    planes[1, 1] = ninf  # -inf, then NaN last
    planes[1, 1, -1] = nan
    planes[2, 0, 1], planes[2, 1, mid], planes[2, -1, -1] = nan, nan, nan  # lone NaNs: start, middle, end
    planes[0, :, mid] = ninf  # a pixel of -inf only
    planes[0, 1:, 0] = inf  # a pixel of -inf, then +inf tied
    planes[1, :, mid] = ninf  # a pixel of -inf, then NaN in its last channel
    planes[1, -1, mid] = nan
    planes[2, :, 0] = 0.0  # a pixel of -0.0, then +0.0
    planes[2, 0, 0] = -0.0
    planes[2, c // 2, -2] = nan  # a lone NaN in the middle of a pixel's channels
    if memory_format == "channels_last":
        values = values.permute(0, 2, 3, 1)  # [n, h, w, c] contiguous
    storage = torch.empty(offset + values.numel(), device=device, dtype=dtype)
    x = storage[offset:].view(values.shape)
    x.copy_(values)
    if memory_format == "channels_last":
        x = x.permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last if memory_format == "channels_last" else torch.contiguous_format)
    cmax, cidx, smax, sidx = _maxima_as_torch_max_gives(operator_namespace(backend), x)
    assert cmax[0, 0].item() == ninf and cidx[0, 0].item() == 0
    assert smax[0, 0].flatten()[mid].item() == ninf and sidx[0, 0].flatten()[mid].item() == 0
    assert sidx[0, 0].flatten()[0].item() == 1 and cidx[1, 1].item() == p - 1
    assert smax[2, 0].flatten()[0].item() == 0 and smax[2, 0].flatten()[0].signbit()


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_gradcheck_float64(backend, device, op, memory_format):
    x = make_input((2, 5, 3, 4), torch.float64, device, memory_format, requires_grad=True)
    args = _args(op, x)
    assert torch.autograd.gradcheck(lambda *t: _run(op, backend, *t[:1], t[1:]), (x, *args))


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_error_is_bounded_by_eager_error(backend, device, op, dtype):
    """Against float64, the fused error is at most twice what eager PyTorch makes in that dtype."""
    x = make_input((4, 64, 14, 14), dtype, device)
    args = _args(op, x)
    fused = _run(op, backend, x, args)
    exact = _run(op, "reference", x.double(), tuple(a.double() for a in args))
    eager = {
        "channel_pool": lambda: (x.mean((2, 3)), x.amax((2, 3))),
        "spatial_pool": lambda: ((x * args[0][:, :, None, None]).mean(1, keepdim=True),),
        "gate_apply": lambda: (x * args[0][:, :, None, None] * args[1],),
    }[op]()
    for f, e, ex in zip(fused, eager, exact):
        fused_err = (f.double() - ex).abs().max().item()
        eager_err = (e.double() - ex).abs().max().item()
        assert fused_err <= 2 * eager_err + 1e-6, f"{op}: fused error {fused_err:.3g} vs eager {eager_err:.3g}"


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(backend, device, op):
    x = make_input((0, 4, 3, 5), torch.float32, device, requires_grad=True)
    args = _args(op, x)
    outs = _run(op, backend, x, args)
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in _run(op, "reference", x, args)]
    grads = torch.autograd.grad(outs, (x, *args), [torch.ones_like(o) for o in outs])
    assert [g.shape for g in grads] == [t.shape for t in (x, *args)]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_every_output_element_is_written(backend, device, memory_format):
    """Every output is allocated filled with NaN (arg-max: int max): from finite inputs no NaN,
    and no arg-max outside x, may survive."""
    ops = torch.ops.fused_cbam
    x = make_input((4, 32, 9, 9), torch.float32, device, memory_format)
    g, h = (t.detach() for t in _args("gate_apply", x))
    avg, cmax, cidx = ops.channel_pool(x)
    mean, smax, sidx = mean_max_argmax(ops.spatial_pool(x, g))
    outs = [avg, cmax, mean, smax, ops.gate_apply(x, g, h)]
    outs += ops.gate_apply_backward(torch.randn_like(x), x, g, h)
    outs.append(ops.channel_pool_backward(torch.randn_like(avg), torch.randn_like(avg), cidx, x))
    outs += ops.spatial_pool_backward(torch.randn_like(mean), torch.randn_like(mean), sidx, x, g)
    grad_x = torch.randn_like(x)
    outs.append(ops.spatial_pool_backward_add(grad_x, torch.randn_like(mean), torch.randn_like(mean), sidx, x, g))
    outs.append(grad_x)
    for i, out in enumerate(outs):
        assert out.isfinite().all(), f"output {i} has elements that were not written"
    assert 0 <= cidx.min() and cidx.max() < 81 and 0 <= sidx.min() and sidx.max() < 32


def _opcheck_cases(device):
    """(operator, args) for all six operators, contiguous and channels_last, with and without grad."""
    ops = torch.ops.fused_cbam
    for memory_format in ("nchw", "channels_last"):
        for requires_grad in (False, True):
            x = make_input((2, 6, 3, 5), torch.float32, device, memory_format, requires_grad)
            g, h = _args("gate_apply", x)
            _, _, cidx = ops.channel_pool(x.detach())
            mean, _, sidx = mean_max_argmax(ops.spatial_pool(x.detach(), g.detach()))
            avg = torch.randn(2, 6, device=device)
            yield ops.channel_pool.default, (x,)
            yield ops.spatial_pool.default, (x, g)
            yield ops.spatial_pool.default, (x, None)
            yield ops.spatial_pool.default, (x, g, True)
            yield ops.gate_apply.default, (x, g, h)
            yield ops.gate_apply.default, (x, None, h)
            if not requires_grad:
                yield ops.channel_pool_backward.default, (avg, torch.randn_like(avg), cidx, x)
                yield ops.spatial_pool_backward.default, (torch.randn_like(mean), torch.randn_like(mean), sidx, x, g)
                yield ops.spatial_pool_backward.default, (torch.randn_like(mean), torch.randn_like(mean), sidx, x, None)
                yield ops.gate_apply_backward.default, (torch.randn_like(x), x, g, h)
                yield ops.gate_apply_backward.default, (torch.randn_like(x), x, g, None)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# C and H x W not multiples of the vector width (scalar paths), then both multiples of 32 (the
# vector paths in either format: CUDA's 16-byte vectors, AVX512's 32 16-bit values)
@pytest.mark.parametrize("shape", [(3, 11, 5, 6), (2, 32, 8, 8)], ids=["3x11x5x6", "2x32x8x8"])
def test_backward_operators_that_add_into_the_gradient(backend, device, memory_format, dtype, shape):
    """Each adds to grad_x (in place) what its writing twin returns, and the same grad_scale."""
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    x = make_input(shape, dtype, device, memory_format)
    g = (torch.rand(shape[:2], device=device) + 0.5).to(dtype)
    _, _, cidx = ops.channel_pool(x)
    mean, _, sidx = mean_max_argmax(ops.spatial_pool(x, g))
    grad_avg, grad_cmax = torch.randn_like(g), torch.randn_like(g)
    grad_mean, grad_smax = torch.randn_like(mean), torch.randn_like(mean)
    start = torch.randn_like(x)
    # One rounding of the sum in x's dtype against two (the twin's output, then the addition).
    atol = TOLERANCE[dtype] * 2
    tuned = backend == "triton" and _triton_tunes()
    added = start.clone()
    ops.channel_pool_backward_add(added, grad_avg, grad_cmax, cidx)
    expected = start + ops.channel_pool_backward(grad_avg, grad_cmax, cidx, x)
    assert_close(added, expected, atol, "channel_pool_backward_add", rounded_once=False)
    for scale in (g, None):
        added = start.clone()
        grad_scale = ops.spatial_pool_backward_add(added, grad_mean, grad_smax, sidx, x, scale)
        grad_x, expected_scale = ops.spatial_pool_backward(grad_mean, grad_smax, sidx, x, scale)
        assert_close(added, start + grad_x, atol, "spatial_pool_backward_add", rounded_once=False)
        if tuned:  # (two tuners: each may pick its own blocks, so its own order of the sum)
            assert_close(grad_scale, expected_scale, TOLERANCE[dtype], "grad_scale")
        else:
            assert torch.equal(grad_scale, expected_scale)
    if dtype == torch.float32:
        for op, args in [
            (ops.channel_pool_backward_add.default, (start.clone(), grad_avg, grad_cmax, cidx)),
            (ops.spatial_pool_backward_add.default, (start.clone(), grad_mean, grad_smax, sidx, x, g)),
            (ops.spatial_pool_backward_add.default, (start.clone(), grad_mean, grad_smax, sidx, x, None)),
        ]:
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 11, 5, 6), (2, 32, 8, 8)], ids=["3x11x5x6", "2x32x8x8"])
def test_the_spatial_mean_share_moves_to_the_channel_backward(backend, device, memory_format, dtype, shape):
    """spatial_pool_backward_add(add_mean=False) adds only the max's share, grad_max * scale at each
    pixel's arg-max element, and returns the same grad_scale; channel_pool_backward_add, given the
    scale and grad_mean (a channel of the stacked maps' gradient, NCHW or channels_last, read in
    place), adds the mean's share with its own: together what the two operators add otherwise."""
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    n, c, h, w = shape
    x = make_input(shape, dtype, device, memory_format)
    g = (torch.rand(n, c, device=device) + 0.5).to(dtype)
    _, _, cidx = ops.channel_pool(x)
    _, _, sidx = mean_max_argmax(ops.spatial_pool(x, g))
    grad_avg, grad_cmax = torch.randn_like(g), torch.randn_like(g)
    # grad_mean C times larger: its share (/ C) as large as the others, so that losing it shows in bfloat16
    grad_maps = torch.randn(n, 2, h, w, device=device, dtype=dtype) * torch.tensor([c, 1], device=device, dtype=dtype)[:, None, None]
    for maps_format in ("nchw", "channels_last"):
        if maps_format == "channels_last":
            grad_maps = grad_maps.contiguous(memory_format=torch.channels_last)
        _check_the_mean_share_moved(ops, backend, x, g, cidx, sidx, grad_avg, grad_cmax, grad_maps)


def _check_the_mean_share_moved(ops, backend, x, g, cidx, sidx, grad_avg, grad_cmax, grad_maps):
    dtype = x.dtype
    grad_mean, grad_smax = grad_maps[:, :1], grad_maps[:, 1:]
    start = torch.randn_like(x)

    both = start.clone()
    expected_scale = ops.spatial_pool_backward_add(both, grad_mean, grad_smax, sidx, x, g)
    ops.channel_pool_backward_add(both, grad_avg, grad_cmax, cidx)

    moved = start.clone()
    grad_scale = ops.spatial_pool_backward_add(moved, grad_mean, grad_smax, sidx, x, g, add_mean=False)
    at_max = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(1, sidx.long(), True)
    assert torch.equal(moved[~at_max], start[~at_max]), "add_mean=False changed elements off the arg-max"
    max_share = start.double() + grad_smax.double() * g.double()[:, :, None, None]
    assert_close(moved[at_max], max_share[at_max].to(dtype), TOLERANCE[dtype], "the max's share")
    if backend == "triton" and _triton_tunes():  # (two tuners: each may pick its own blocks)
        assert_close(grad_scale, expected_scale, TOLERANCE[dtype], "grad_scale")
    else:
        assert torch.equal(grad_scale, expected_scale)
    ops.channel_pool_backward_add(moved, grad_avg, grad_cmax, cidx, grad_mean, g)
    assert_close(moved, both, TOLERANCE[dtype] * 2, "both shares", rounded_once=False)
    if dtype == torch.float32:
        torch.library.opcheck(
            ops.spatial_pool_backward_add.default, (start.clone(), grad_mean, grad_smax, sidx, x, g), {"add_mean": False}
        )
        torch.library.opcheck(
            ops.channel_pool_backward_add.default, (start.clone(), grad_avg, grad_cmax, cidx, grad_mean, g)
        )


def _strided_pool_grads(grads: torch.Tensor) -> list:
    """(name, view) pairs of gradients laid out as the modules' backward hands them over: the
    channels of a stacked [N, 2, ...] gradient (the spatial conv's input gradient, NCHW or
    channels_last), an expanded one (zero strides), and a transposed one (copied, not read)."""
    n, _, h, w = grads.shape
    return [
        ("nchw-channel", grads[:, 1:]),
        ("channels-last-channel", grads.contiguous(memory_format=torch.channels_last)[:, 1:]),
        ("expanded", grads[:, :1, :1, :1].expand(n, 1, h, w)),
        ("transposed", grads[:, :1].transpose(2, 3).contiguous().transpose(2, 3)),
    ]


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
# Rows of 30 and 11 (scalar paths), then of 24 and 8 (the CUDA kernels' vector paths)
@pytest.mark.parametrize("shape", [(3, 11, 5, 6), (3, 8, 4, 6)], ids=["3x11x5x6", "3x8x4x6"])
def test_backward_operators_read_strided_gradients(backend, device, memory_format, shape):
    """The poolings' backward operators take their gradients in any strides, with the results of
    contiguous copies: the spatial pooling's CUDA and Triton kernels read a channel of a stacked
    gradient in place (the modules' spatial conv hands the two maps' gradients over so), as the
    channel pooling's CUDA kernel reads columns; the other kernels copy."""
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    n, c, h, w = shape
    x = make_input(shape, torch.float32, device, memory_format)
    g = torch.rand(n, c, device=device) + 0.5
    _, _, cidx = ops.channel_pool(x)
    _, _, sidx = mean_max_argmax(ops.spatial_pool(x, g))
    # The mean's and the max's gradients are different views, so that a swap of their strides shows.
    means = _strided_pool_grads(torch.randn(n, 2, h, w, device=device))
    maxes = _strided_pool_grads(torch.randn(n, 2, h, w, device=device))
    for (name, mean_view), (_, max_view) in zip(means, maxes):
        mean_dense, max_dense = mean_view.contiguous(), max_view.contiguous()
        for scale in (g, None):
            got = ops.spatial_pool_backward(mean_view, max_view, sidx, x, scale)
            want = ops.spatial_pool_backward(mean_dense, max_dense, sidx, x, scale)
            for i, (a, b) in enumerate(zip(got, want)):
                assert torch.equal(a, b), f"{name}, scale {scale is not None}: output {i}"
            start = torch.randn_like(x)
            added, expected = start.clone(), start.clone()
            grad_scale = ops.spatial_pool_backward_add(added, mean_view, max_view, sidx, x, scale)
            expected_scale = ops.spatial_pool_backward_add(expected, mean_dense, max_dense, sidx, x, scale)
            assert torch.equal(added, expected) and torch.equal(grad_scale, expected_scale), name
    pooled = torch.randn(n, 3 * c, device=device)
    views = [("columns", pooled[:, c:2 * c], pooled[:, 2 * c:]), ("expanded", pooled[:, :1].expand(n, c), pooled[:, 1:2].expand(n, c)),
             ("transposed", torch.randn(c, n, device=device).t(), torch.randn(c, n, device=device).t())]  # fmt: skip
    for name, avg_view, max_view in views:
        avg_dense, max_dense = avg_view.contiguous(), max_view.contiguous()
        got = ops.channel_pool_backward(avg_view, max_view, cidx, x)
        assert torch.equal(got, ops.channel_pool_backward(avg_dense, max_dense, cidx, x)), name
        start = torch.randn_like(x)
        added, expected = start.clone(), start.clone()
        ops.channel_pool_backward_add(added, avg_view, max_view, cidx)
        ops.channel_pool_backward_add(expected, avg_dense, max_dense, cidx)
        assert torch.equal(added, expected), name
    # An empty batch with gradients that would be copied
    empty = make_input((0, c, h, w), torch.float32, device, memory_format)
    transposed = torch.randn(0, 1, w, h, device=device).transpose(2, 3)
    no_index = torch.zeros(0, 1, h, w, dtype=torch.int32, device=device)
    dx, _ = ops.spatial_pool_backward(transposed, transposed, no_index, empty, None)
    assert dx.shape == empty.shape


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_arg_max_elements_take_both_gradient_terms_at_once(backend, device, memory_format):
    """At an arg-max element the mean's and the max's terms are summed before they are rounded
    or multiplied, as in the reference: adding the max term to a rounded sum overflowed float16
    (an inf that makes GradScaler skip the step), and w·s + g·s gave inf - inf = NaN for an
    infinite scale or x, where the reference's (w + g)·s is -inf."""
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    def laid_out(t):
        return t.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else t

    # float16: the mean's share 3e4 everywhere, the max term -4e4 at the arg-max; 4e4 held in grad_x.
    inf = float("inf")
    x = laid_out(torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=device).view(1, 2, 1, 2).half())
    _, _, argmax = ops.channel_pool(x)
    held = torch.full_like(x, 4e4)
    grad_avg, grad_max = torch.full((1, 2), 6e4, device=device).half(), torch.full((1, 2), -4e4, device=device).half()
    ops.channel_pool_backward_add(held, grad_avg, grad_max, argmax)
    assert torch.equal(held, torch.tensor([[inf, 3e4], [3e4, inf]], device=device).view(1, 2, 1, 2).half()), held
    # float32: one channel of the scale infinite; then a +inf of x at an arg-max pixel
    x = laid_out(torch.tensor([[1.0, 2.0], [5.0, 0.0], [0.0, 1.0]], device=device).view(1, 3, 1, 2))
    x_inf = x.clone()
    x_inf[0, 1, 0, 0] = inf
    grad_mean, grad_max = torch.full((1, 1, 1, 2), 0.3, device=device), torch.full((1, 1, 1, 2), -1.0, device=device)
    for x, scale in ((x, torch.tensor([[1.0, inf, 1.0]], device=device)), (x_inf, torch.ones(1, 3, device=device))):
        x_ref, scale_ref = x.clone().requires_grad_(), scale.clone().requires_grad_()
        mean, mx = reference.spatial_pool(x_ref, scale_ref)
        expected = torch.autograd.grad((mean * grad_mean + mx * grad_max).sum(), (x_ref, scale_ref))
        assert any(e.isinf().any() for e in expected) and not any(e.isnan().any() for e in expected)
        _, _, argmax = mean_max_argmax(ops.spatial_pool(x, scale))
        written = ops.spatial_pool_backward(grad_mean, grad_max, argmax, x, scale)
        added = torch.zeros_like(x)
        added_scale = ops.spatial_pool_backward_add(added, grad_mean, grad_max, argmax, x, scale)
        for actual in (written, (added, added_scale)):
            for a, e in zip(actual, expected):
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


# The adding operators' first calls of a shape on the GPU, with tuning on (each script's own process).
_TUNED_SETUP = """
import threading, torch, fused_cbam.triton
ops = torch.ops.fused_cbam_triton
x = torch.randn(3, 37, 29, 31, device="cuda").to(memory_format=torch.channels_last)
g = torch.rand(3, 37, device="cuda") + 0.5
_, _, cidx = ops.channel_pool(x)
maps, sidx = ops.spatial_pool(x, g)
mean = maps[:, :1]
"""
_TUNED_ADD_SCRIPT = _TUNED_SETUP + """
start = torch.randn_like(x)
added = start.clone()
ops.channel_pool_backward_add(added, g, g, cidx)
torch.testing.assert_close(added, start + ops.channel_pool_backward(g, g, cidx, x))
added = start.clone()
ops.spatial_pool_backward_add(added, mean, mean, sidx, x, g)
torch.testing.assert_close(added, start + ops.spatial_pool_backward(mean, mean, sidx, x, g)[0])
"""


def _triton_tunes() -> bool:
    from fused_cbam.triton import _common

    return _common.TUNE and not _common.INTERPRET


# Four threads make the first calls of one shape at once, so that each call is tuned while the
# others are: with the tuner's state shared, a thread's grad_x was restored from another's copy.
_TUNED_THREADS_SCRIPT = _TUNED_SETUP + """
starts = [torch.randn_like(x) for _ in range(4)]
added = [start.clone() for start in starts]
barrier, errors = threading.Barrier(4), []
def worker(i):
    try:
        barrier.wait()
        ops.channel_pool_backward_add(added[i], g, g, cidx)
        ops.spatial_pool_backward_add(added[i], mean, mean, sidx, x, g)
        torch.cuda.synchronize()
    except Exception as e:
        errors.append(e)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
grad = ops.channel_pool_backward(g, g, cidx, x) + ops.spatial_pool_backward(mean, mean, sidx, x, g)[0]
for start, got in zip(starts, added):
    torch.testing.assert_close(got, start + grad)
"""


@needs_cuda
def test_triton_autotuner_tunes_one_call_at_a_time():
    """Threads (nn.DataParallel's replicas, a threaded server) that first call an adding operator
    at once each get their own one addition."""
    skip_unless_available("triton")
    env = {**os.environ, "FUSED_CBAM_TRITON_AUTOTUNE": "1"}
    subprocess.run([sys.executable, "-c", _TUNED_THREADS_SCRIPT], env=env, check=True, timeout=180)


@needs_cuda
def test_triton_add_operators_under_the_autotuner():
    """With tuning on, the first call of a shape runs each configuration several times: the
    tuner must restore grad_x between them so that it holds one addition (gpu_check.sh's test
    runs turn tuning off, hence a process of its own)."""
    skip_unless_available("triton")
    env = {**os.environ, "FUSED_CBAM_TRITON_AUTOTUNE": "1"}
    subprocess.run([sys.executable, "-c", _TUNED_ADD_SCRIPT], env=env, check=True, timeout=120)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_backward_operators_that_add_refuse_a_gradient_of_another_layout(backend, device):
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    x = make_input((2, 4, 3, 5), torch.float32, device, "channels_last")
    mean, _, sidx = mean_max_argmax(ops.spatial_pool(x, None))
    with pytest.raises(ValueError, match="grad_x.*dense in x's memory format"):
        ops.spatial_pool_backward_add(torch.zeros(2, 4, 3, 5, device=device), mean, mean, sidx, x, None)
    with pytest.raises(ValueError, match="grad_x.*shape"):
        ops.spatial_pool_backward_add(torch.zeros(2, 4, 3, 6, device=device), mean, mean, sidx, x, None)
    # A grad_x that is no gradient of any x is named as grad_x, not as x.
    avg, _, cidx = ops.channel_pool(x)
    with pytest.raises(ValueError, match="grad_x"):
        ops.channel_pool_backward_add(torch.zeros(4, 3, 5, device=device), avg, avg, cidx)
    with pytest.raises(TypeError, match="grad_x"):
        ops.channel_pool_backward_add(torch.zeros(2, 4, 3, 5, device=device, dtype=torch.int32), avg, avg, cidx)


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
def test_opcheck_every_operator(backend, device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


_LIBRARY_ALONE = """
import sys, torch
torch.ops.load_library(sys.argv[1])  # the operators, and none of the Python package's registrations
assert "fused_cbam" not in sys.modules
torch.manual_seed(0)
leaves = {
    "x": torch.randn(2, 5, 4, 3), "g": torch.rand(2, 5), "fc1": torch.randn(3, 5), "fc1_bias": torch.randn(3),
    "fc2": torch.randn(5, 3), "conv": torch.randn(1, 2, 3, 3), "bn_weight": torch.randn(1),
}
leaves = {name: t.double().requires_grad_() for name, t in leaves.items()}
x, g = leaves["x"], leaves["g"]
ops = torch.ops.fused_cbam
avg, mx, _ = ops.channel_pool(x)
maps, _ = ops.spatial_pool(x, g)
mean, smx = maps[:, :1], maps[:, 1:]
out = ops.gate_apply(x, g, mean.sigmoid())
block = ops.cbam_inference(
    x, leaves["fc1"], leaves["fc1_bias"], leaves["fc2"], None, "sum", leaves["conv"], None,
    torch.zeros(1, dtype=x.dtype), torch.ones(1, dtype=x.dtype), leaves["bn_weight"], None, 1e-5, True,
)
loss = (avg * avg).sum() + mx.sum() + (mean * smx).sum() + out.square().sum() + block.square().sum()
loss.backward()
torch.save({name: (t.detach(), t.grad) for name, t in leaves.items()}, sys.argv[2])
"""


_DLOPEN_NOW = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char** argv) {
  if (!dlopen(argv[1], RTLD_NOW | RTLD_LOCAL)) { fprintf(stderr, "%s\n", dlerror()); return 1; }
  return 0;
}
"""


def test_a_program_without_python_loads_the_library(tmp_path):
    """A C++ program (a libtorch application, say) can dlopen the library with every symbol
    bound at once (RTLD_NOW): it needs libtorch, not Python. Before, its Python module init left
    PyModule_Create2 unresolved there."""
    skip_unless_available("cpu")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    program = tmp_path / "dlopen_now"
    subprocess.run([compiler, "-x", "c", "-", "-o", str(program), "-ldl"], input=_DLOPEN_NOW, text=True, check=True)
    site = Path(torch.__file__).parent.parent
    libraries = [str(Path(torch.__file__).parent / "lib"), *map(str, sorted(site.glob("nvidia/*/lib")))]
    result = subprocess.run(
        [str(program), _library.library_path()], capture_output=True, text=True, timeout=60,
        env={"LD_LIBRARY_PATH": os.pathsep.join(libraries), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_library_alone_has_the_forward_operators_gradients(tmp_path):
    """Loaded without the Python package (a TorchScript or AOTInductor graph run from C++, or
    torch.ops.load_library), the forward operators still have their autograd, cbam_inference's
    included: before, their gradients were silently missing (only PyTorch's warning that no
    autograd kernel exists)."""
    skip_unless_available("cpu")
    saved = tmp_path / "grads.pt"
    subprocess.run([sys.executable, "-c", _LIBRARY_ALONE, _library.library_path(), str(saved)], check=True, timeout=120)
    got = torch.load(saved)
    leaves = {name: value.requires_grad_() for name, (value, _) in got.items()}
    x, g = leaves["x"], leaves["g"]
    avg, mx = reference.channel_pool(x)
    mean, smx = reference.spatial_pool(x, g)
    out = reference.gate_apply(x, g, mean.sigmoid())
    block = reference.cbam_inference(
        x, leaves["fc1"], leaves["fc1_bias"], leaves["fc2"], None, "sum", leaves["conv"], None,
        torch.zeros(1, dtype=x.dtype), torch.ones(1, dtype=x.dtype), leaves["bn_weight"], None, 1e-5, True,
    )  # fmt: skip
    loss = (avg * avg).sum() + mx.sum() + (mean * smx).sum() + out.square().sum() + block.square().sum()
    loss.backward()
    for name, (_, grad) in got.items():
        assert_close(grad, leaves[name].grad, 1e-12, f"grad of {name}")


def test_every_operator_has_a_kernel_for_each_built_device():
    """Every operator of the library, as its schemas declare them, is one that the package knows
    (``_library.OPERATORS``, those with a fake kernel), with a kernel for each device it was built for."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_cbam::")]
    assert sorted(names) == sorted(f"fused_cbam::{name}" for name in _library.OPERATORS)
    keys = ["CPU"] + (["CUDA"] if _library.build_info().get("cuda") else [])
    for name in names:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name} has no {key} kernel"


def _operators(namespace) -> tuple[str, ...]:
    """The operators of a namespace: the C++ library's, or Triton's (all but the library's own)."""
    return _library.OPERATORS if namespace is torch.ops.fused_cbam else tuple(_registrations.FAKES)


def test_every_namespace_takes_the_arguments_of_the_fake_kernels():
    """The C++ library's operators (refused at load otherwise) and the Triton ones take the
    arguments that their shared fake kernels name."""
    namespaces = [operator_namespace(b) for b in ("cpu", "triton") if backend_available(b)]
    for namespace in namespaces:
        for name in _operators(namespace):
            schema = getattr(namespace, name).default._schema
            assert [a.name for a in schema.arguments] == _registrations.arguments(name), schema


def test_every_operator_takes_any_layout_under_torch_compile():
    """flexible_layout lets Inductor hand the operators its own tensors: with its default for custom
    operators it copied x back to eager's stride order for every call of a compiled training step."""
    namespaces = [operator_namespace(b) for b in ("cpu", "triton") if backend_available(b)]
    for namespace in namespaces:
        for name in _operators(namespace):
            op = getattr(namespace, name).default
            assert torch.Tag.flexible_layout in op.tags, f"{namespace.name}::{name} tags {op.tags}"


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_every_operator_refuses_x_without_channels(backend, device):
    """C = 0 is refused by each operator itself, not only by the Python functions before it."""
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    x = torch.randn(2, 0, 3, 4, device=device)
    per_channel, per_pixel = torch.randn(2, 0, device=device), torch.randn(2, 1, 3, 4, device=device)
    channel_idx = torch.zeros(2, 0, dtype=torch.int32, device=device)
    pixel_idx = torch.zeros(2, 1, 3, 4, dtype=torch.int32, device=device)
    calls = {
        "channel_pool": (x,),
        "spatial_pool": (x, None),
        "gate_apply": (x, None, None),
        "channel_pool_backward": (per_channel, per_channel, channel_idx, x),
        "channel_pool_backward_add": (torch.zeros_like(x), per_channel, per_channel, channel_idx),
        "spatial_pool_backward": (per_pixel, per_pixel, pixel_idx, x, None),
        "spatial_pool_backward_add": (torch.zeros_like(x), per_pixel, per_pixel, pixel_idx, x, None),
        "gate_apply_backward": (torch.randn_like(x), x, None, None),
        "cbam_inference": (
            x, torch.randn(1, 0, device=device), None, torch.randn(0, 1, device=device), None, "sum",
            torch.randn(1, 2, 7, 7, device=device), None, None, None, None, None, 1e-5, True,
        ),  # fmt: skip
    }
    for name, args in calls.items():
        with pytest.raises(ValueError, match="channel"):
            getattr(ops, name)(*args)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_gate_apply_backward_names_a_bad_grad_out(backend, device):
    skip_unless_available(backend)
    ops = operator_namespace(backend)
    x = torch.randn(2, 3, 4, 5, device=device)
    with pytest.raises(TypeError, match="grad_out.*dtype"):
        ops.gate_apply_backward(torch.randn_like(x, dtype=torch.float16), x, None, None)
    with pytest.raises(ValueError, match="grad_out.*shape"):
        ops.gate_apply_backward(torch.randn(2, 3, 5, 4, device=device), x, None, None)


# Sums this long: a float32 accumulator adding one term at a time stops growing once the terms
# fall below half an ulp of the sum (2^24 ones sum to 2^24, so a plane of 2^25 ones averaged 0.5).
# Triton's interpreter would take minutes at these sizes: the compiled backends, and Triton on a GPU.
LONG_BACKENDS = COMPILED_BACKENDS + [pytest.param("triton", "cuda", id="triton", marks=needs_cuda)]


@pytest.mark.parametrize("backend,device", LONG_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_sums_over_2_25_terms_are_exact_for_ones(backend, device, memory_format):
    """2^25 pixels of ones in bfloat16 (128 MiB): every sum the operators take over them."""
    skip_unless_available(backend)
    x = torch.ones(1, 2, 4096, 8192, dtype=torch.bfloat16, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else x
    ops = operator_namespace(backend)
    avg, _, _ = ops.channel_pool(x)
    assert torch.equal(avg, torch.ones_like(avg)), avg
    scale = torch.ones(1, 2, dtype=x.dtype, device=device)
    mean, _, argmax = mean_max_argmax(ops.spatial_pool(x, scale))
    ones = torch.ones_like(mean)
    _, grad_scale = ops.spatial_pool_backward(ones, torch.zeros_like(mean), argmax, x, scale)
    assert torch.equal(grad_scale, torch.full_like(grad_scale, 2.0**24)), grad_scale  # sum_p 1/C
    _, grad_g, grad_h = ops.gate_apply_backward(x, x, scale, ones)
    assert torch.equal(grad_g, torch.full_like(grad_g, 2.0**25)), grad_g
    # The inference operator: gate sigmoid(avg) from fc1 = identity, h = sigmoid(mean map) from
    # a 1x1 conv taking the mean map only.
    eye = torch.eye(2, dtype=x.dtype, device=device)
    conv = torch.tensor([1.0, 0.0], dtype=x.dtype, device=device).view(1, 2, 1, 1)
    out = ops.cbam_inference(x, eye, None, None, None, "avg", conv, None, None, None, None, None, 0.0, False)
    g = torch.tensor(1.0).sigmoid()
    assert_close(out, torch.full_like(out, g * g.sigmoid()), TOLERANCE[torch.bfloat16], "cbam_inference")


@pytest.mark.parametrize("backend,device", LONG_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_long_float32_sums_are_as_accurate_as_torch(backend, device, memory_format):
    """Means and gradient sums over 2^20 pixels of values 1 + |N(0, 1)|: relative errors against
    float64 within a few float32 ulps (torch's own pairwise sums: about 2e-7), where one float32
    accumulator per channel gave 2.5e-5."""
    skip_unless_available(backend)
    torch.manual_seed(0)
    x = make_input((2, 8, 1024, 1024), torch.float32, device, memory_format).abs_().add_(1)
    ops = operator_namespace(backend)
    exact = x.double().mean((2, 3))

    def error(actual, expected):
        return ((actual.double() - expected) / expected).abs().max().item()

    assert error(ops.channel_pool(x)[0], exact) < 1e-6
    scale = torch.rand(2, 8, device=device) + 0.5
    mean, _, argmax = mean_max_argmax(ops.spatial_pool(x, scale))
    grad_mean = torch.rand_like(mean) + 1
    _, grad_scale = ops.spatial_pool_backward(grad_mean, torch.zeros_like(mean), argmax, x, scale)
    assert error(grad_scale, (x.double() * grad_mean.double()).sum((2, 3)) / 8) < 1e-6
    grad_out = torch.rand_like(x) + 1
    spatial = torch.rand_like(mean) + 0.5
    _, grad_g, _ = ops.gate_apply_backward(grad_out, x, scale, spatial)
    assert error(grad_g, (grad_out.double() * x.double() * spatial.double()).sum((2, 3))) < 1e-6


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 3277), (1, 257, 3, 7)], ids=["P=16385", "C=257"])
def test_sums_across_the_kernels_blocks(backend, device, memory_format, shape):
    """Sizes one past the CPU kernels' summing blocks (256 terms, rows of 4096 values, 16384),
    with ties (values in steps of 0.25) so that the first maximum sits in an earlier block than
    later equal ones: forward and every gradient against the reference."""
    skip_unless_available(backend)
    x = (make_input(shape, torch.float32, device, memory_format) * 4).round() / 4
    x.requires_grad_()
    g = (torch.rand(shape[:2], device=device) + 0.5).requires_grad_()
    h = (torch.rand(shape[0], 1, *shape[2:], device=device) + 0.5).requires_grad_()
    leaves = (x, g, h)
    for op in OPS:
        args = {"channel_pool": (), "spatial_pool": (g,), "gate_apply": (g, h)}[op]
        outs = _run(op, backend, x, args)
        refs = _run(op, "reference", x, args)
        grads = [torch.randn_like(o) for o in outs]
        actual = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
        expected = torch.autograd.grad(refs, leaves, grads, allow_unused=True)
        for i, (out, ref) in enumerate(zip(outs, refs)):
            assert_close(out, ref, 2e-6, f"{op} output {i}")
        for name, a, e in zip("xgh", actual, expected):
            assert (a is None) == (e is None), f"{op}: grad of {name}"
            if a is not None:
                assert_close(a, e, 2e-6, f"{op}: grad of {name}")
