"""Tests of the Triton operators ``torch.ops.fused_cbam_triton.*`` against ``fused_cbam.reference``.

Without a GPU they run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be
set before anything with @triton.jit is imported), where every kernel has one fixed, small
block configuration, so the shapes below run each loop, mask and split path.
"""

import functools
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton")
tl = triton.language

import fused_cbam.nn  # noqa: E402
import fused_cbam.triton  # noqa: E402,F401  (registers torch.ops.fused_cbam_triton)
from fused_cbam import reference  # noqa: E402
from fused_cbam.triton import _common  # noqa: E402
from fused_cbam._layout import empty_like_x  # noqa: E402
from helpers import fused_and_reference, mean_max_argmax  # noqa: E402

OPS = torch.ops.fused_cbam_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Under the interpreter BLOCK_C = 8 and BLOCK_P = 16 (see fused_cbam/triton/*.py).
SHAPES = [
    (2, 3, 5, 7),  # odd sizes; P = 35 spans three BLOCK_P chunks and two splits of the P reductions
    (1, 33, 3, 5),  # C not a multiple of BLOCK_C; a single split
    (2, 1, 4, 4),  # C == 1: a channels_last tensor is also contiguous (treated as NCHW)
    (3, 4, 1, 1),  # H == W == 1: P == 1
    (0, 3, 4, 5),  # empty batch: nothing launched
]
if DEVICE == "cuda":
    SHAPES.append((2, 40, 48, 48))  # long P reductions split over several programs with GPU blocks

# (atol, rtol) per dtype; atol is scaled by the magnitude of the expected tensor.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = ["nchw", "channels_last"]


def _ids(values):
    return ["x".join(map(str, v)) for v in values]


def make_x(shape, dtype, fmt, requires_grad=False, values=None):
    x = torch.randn(shape, device=DEVICE) if values is None else values
    x = x.to(dtype)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def randn(*shape, dtype):
    return torch.randn(shape, device=DEVICE).to(dtype)


def gates(shape, dtype):
    n, c, h, w = shape
    g = torch.sigmoid(torch.randn(n, c, device=DEVICE)).to(dtype)
    s = torch.sigmoid(torch.randn(n, 1, h, w, device=DEVICE)).to(dtype)
    return g, s


def assert_close(actual, expected, dtype, exact=False):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
        return
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.float().abs().nan_to_num(0, 0, 0).max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=True)


def first_argmax(v, dim):
    """Lowest index of the maximum along dim, NaN being the maximum (the rule of the reference)."""
    v = v.float()
    idx = torch.arange(v.shape[dim], device=v.device).view([-1 if d == dim else 1 for d in range(v.dim())])
    big = torch.iinfo(torch.int64).max
    nan = v.isnan()
    at_max = v == torch.where(nan, float("-inf"), v).amax(dim, keepdim=True)
    first_max = torch.where(at_max, idx, big).amin(dim)
    first_nan = torch.where(nan, idx, big).amin(dim)
    return torch.where(nan.any(dim), first_nan, first_max).to(torch.int32)


def assert_format_like_x(t, x):
    assert t.stride() == empty_like_x(x).stride(), (t.stride(), empty_like_x(x).stride())


# ---------------------------------------------------------------------------------------------
# Forward values


def check_channel_pool(x):
    avg, mx, argmax = OPS.channel_pool(x)
    ref_avg, ref_max = reference.channel_pool(x)
    assert_close(avg, ref_avg, x.dtype)
    assert_close(mx, ref_max, x.dtype, exact=True)
    assert argmax.dtype == torch.int32
    torch.testing.assert_close(argmax, first_argmax(x.flatten(2), 2), rtol=0, atol=0)


def check_spatial_pool(x, scale):
    mean, mx, argmax = mean_max_argmax(OPS.spatial_pool(x, scale))
    ref_mean, ref_max = reference.spatial_pool(x, scale)
    assert_close(mean, ref_mean, x.dtype)
    assert_close(mx, ref_max, x.dtype, exact=True)
    y = x.float() if scale is None else x.float() * scale.float()[:, :, None, None]
    torch.testing.assert_close(argmax, first_argmax(y, 1).unsqueeze(1), rtol=0, atol=0)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_forward(shape, dtype, fmt):
    check_forward(shape, dtype, fmt)


def check_forward(shape, dtype, fmt):
    x = make_x(shape, dtype, fmt)
    g, h = gates(shape, dtype)
    check_channel_pool(x)
    check_spatial_pool(x, g)
    check_spatial_pool(x, None)
    for cg, sg in [(g, h), (g, None), (None, h), (None, None)]:
        out = OPS.gate_apply(x, cg, sg)
        assert_format_like_x(out, x)
        # Same float32 products in the same order as the reference: equal, not just close.
        assert_close(out, reference.gate_apply(x, cg, sg), dtype, exact=True)


# (2, 5, 6, 7): the P reductions of channel pooling run as two splits merged afterwards;
# (2, 19, 3, 5): the C loop of spatial pooling runs over three BLOCK_C chunks.
SPECIAL_SHAPES = [(2, 5, 6, 7), (2, 19, 3, 5)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SPECIAL_SHAPES, ids=_ids(SPECIAL_SHAPES))
def test_ties_and_infinities(shape, dtype, fmt):
    # Few distinct values: every max is tied many times, across chunks and splits; the lowest
    # index must win.
    n, c, h, w = shape
    values = torch.randint(-2, 3, shape, device=DEVICE).float()
    values[0, 3] = float("-inf")  # a plane of -inf only: argmax 0
    values[1, :, 2, 3] = float("inf")  # a position where every channel ties at +inf
    x = make_x(shape, dtype, fmt, values=values)
    scale = torch.randint(1, 3, (n, c), device=DEVICE).to(dtype)
    check_channel_pool(x)
    check_spatial_pool(x, None)
    check_spatial_pool(x, scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SPECIAL_SHAPES, ids=_ids(SPECIAL_SHAPES))
def test_nan(shape, dtype, fmt):
    n, c, h, w = shape
    values = torch.randn(shape, device=DEVICE)
    planes = values.view(n, c, h * w)
    planes[0, 1, -1] = float("nan")  # only in the last chunk / split of its plane
    planes[0, 0, 0] = 100.0  # a large max early in the plane, NaN late: NaN wins
    planes[0, 0, -1] = float("nan")
    planes[1, c - 1, 1] = float("inf")  # +inf, then two NaNs in one plane: the first NaN wins
    planes[1, c - 1, 3] = float("nan")
    planes[1, c - 1, -2] = float("nan")
    planes[1, 0, 3] = float("nan")  # position 3 of sample 1: NaN in channels 0 and c-1
    planes[0, 0, 5] = 100.0  # position 5 of sample 0: large in channel 0, NaN in the last channel
    planes[0, c - 1, 5] = float("nan")
    x = make_x(shape, dtype, fmt, values=values)
    check_channel_pool(x)
    check_spatial_pool(x, None)
    check_spatial_pool(x, torch.rand(n, c, device=DEVICE).to(dtype))
    # The gradient of each max goes to the first NaN, as in the reference.
    x.requires_grad_(True)
    up = randn(n, c, dtype=dtype)
    (grad,) = torch.autograd.grad(OPS.channel_pool(x)[1], x, up)
    (ref_grad,) = torch.autograd.grad(reference.channel_pool(x)[1], x, up)
    assert_close(grad, ref_grad, dtype)
    up = randn(n, 1, h, w, dtype=dtype)
    (grad,) = torch.autograd.grad(OPS.spatial_pool(x, None)[0][:, 1:], x, up)
    (ref_grad,) = torch.autograd.grad(reference.spatial_pool(x, None)[1], x, up)
    assert_close(grad, ref_grad, dtype)


# ---------------------------------------------------------------------------------------------
# Backward: autograd of the forward ops (which calls the *_backward ops) against the reference's
# autograd, with the same random upstream gradients.


def grads(outputs, inputs, upstream):
    pairs = [(o, u) for o, u in zip(outputs, upstream) if u is not None]
    wanted = [i for i in inputs if i is not None]
    return torch.autograd.grad([o for o, _ in pairs], wanted, [u for _, u in pairs])


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_backward(shape, dtype, fmt):
    check_backward(shape, dtype, fmt)


def check_backward(shape, dtype, fmt):
    n, c, h, w = shape
    x = make_x(shape, dtype, fmt, requires_grad=True)
    g, s = gates(shape, dtype)

    up = (randn(n, c, dtype=dtype), randn(n, c, dtype=dtype))
    (dx,) = grads(OPS.channel_pool(x)[:2], [x], up)
    (ref_dx,) = grads(reference.channel_pool(x), [x], up)
    assert_format_like_x(dx, x)
    assert_close(dx, ref_dx, dtype)

    up = (randn(n, 1, h, w, dtype=dtype), randn(n, 1, h, w, dtype=dtype))
    for scale in (g.clone().requires_grad_(True), None):
        got = grads(mean_max_argmax(OPS.spatial_pool(x, scale))[:2], [x, scale], up)
        want = grads(reference.spatial_pool(x, scale), [x, scale], up)
        assert_format_like_x(got[0], x)
        for a, b in zip(got, want):
            assert_close(a, b, dtype)

    dout = randn(*shape, dtype=dtype)
    for cg, sg in [(g, s), (g, None), (None, s), (None, None)]:
        cg = cg.clone().requires_grad_(True) if cg is not None else None
        sg = sg.clone().requires_grad_(True) if sg is not None else None
        for dout_fmt in FORMATS:  # grad_out in either memory format
            d = make_x(shape, dtype, dout_fmt, values=dout)
            got = grads([OPS.gate_apply(x, cg, sg)], [x, cg, sg], [d])
            want = grads([reference.gate_apply(x, cg, sg)], [x, cg, sg], [d])
            assert_format_like_x(got[0], x)
            for a, b in zip(got, want):
                assert_close(a, b, dtype)


# ---------------------------------------------------------------------------------------------
# Every GPU block configuration. Elsewhere each kernel runs with the interpreter's configuration
# (on a GPU: the one its autotuner picks, or the first in gpu_check.sh's test runs). Here each
# GPU configuration in turn is swapped into every tuner, on shapes beyond the largest blocks
# along the contiguous dimension (P = H * W in NCHW, up to 1024; C in channels_last, up to 256),
# so that every block shape an autotuner may pick on a GPU has run in CI (in float32; the
# interpreter's split lengths and untuned blocks stay its own).

CONFIG_CASES = [((1, 3, 35, 33), "nchw"), ((1, 260, 6, 6), "channels_last")]


def check_block(shape, fmt):
    """The Triton CBAM block against the reference backend: a training step (its backward adds
    into one gradient of x) and an eval forward (``cbam_inference``)."""
    make = functools.partial(fused_cbam.nn.CBAM, reduction_ratio=2)
    fused, ref = fused_and_reference(make, "triton", DEVICE, shape[1])
    x = make_x(shape, torch.float32, fmt)
    dout = randn(*shape, dtype=torch.float32)
    got = grads([fused(x.requires_grad_())], [x, *fused.parameters()], [dout])
    want = grads([ref(x)], [x, *ref.parameters()], [dout])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_close(fused(x), ref(x), torch.float32)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("index", range(max(len(gpu) for _, gpu in _common.TUNED_KERNELS)))
def test_every_gpu_configuration(index, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (the block's MLP)
    for tuner, gpu_configs in _common.TUNED_KERNELS:
        monkeypatch.setattr(tuner, "configs", [gpu_configs[index % len(gpu_configs)]])
        monkeypatch.setattr(tuner, "best_config", None, raising=False)  # set by each launch
    for shape, fmt in CONFIG_CASES:
        check_forward(shape, torch.float32, fmt)
        check_backward(shape, torch.float32, fmt)
        check_block(shape, fmt)
    unrun = [t.fn.__name__ for t, _ in _common.TUNED_KERNELS if t.best_config is not t.configs[0]]
    assert not unrun, f"kernels not run with the swapped configuration: {unrun}"


def test_backward_ops_direct():
    """The *_backward ops called directly: shapes, empty gradients of absent inputs, formats."""
    x = make_x((2, 3, 5, 7), torch.float32, "channels_last")
    g, s = gates(x.shape, x.dtype)
    _, _, am = mean_max_argmax(OPS.spatial_pool(x, None))
    up = (randn(2, 1, 5, 7, dtype=x.dtype), randn(2, 1, 5, 7, dtype=x.dtype))
    dx, dscale = OPS.spatial_pool_backward(*up, am, x, None)
    assert dscale.shape == (0,) and dx.is_contiguous(memory_format=torch.channels_last)
    dx, dg, dh = OPS.gate_apply_backward(torch.randn_like(x), x, None, None)
    assert dg.shape == (0,) and dh.shape == (0,)
    # With no gate, grad_x is grad_out itself (a new tensor, in x's format).
    d = torch.randn(x.shape, device=DEVICE)
    dx, _, _ = OPS.gate_apply_backward(d, x, None, None)
    assert_format_like_x(dx, x)
    torch.testing.assert_close(dx, d, rtol=0, atol=0)
    assert dx.data_ptr() != d.data_ptr()
    dx, dg, dh = OPS.gate_apply_backward(torch.randn_like(x), x, g, s)
    assert dg.shape == (2, 3) and dh.shape == (2, 1, 5, 7)


@pytest.mark.usefixtures("poison")
def test_every_output_written():
    """With torch.empty poisoned (NaN / int max), finite inputs must give finite outputs."""
    for fmt in FORMATS:
        for shape in [(2, 3, 5, 7), (1, 33, 3, 5)]:
            x = make_x(shape, torch.float32, fmt)
            n, c, h, w = shape
            g, s = gates(shape, x.dtype)
            outs = list(OPS.channel_pool(x)) + list(OPS.spatial_pool(x, g)) + [OPS.gate_apply(x, g, s)]
            ga, gm = randn(n, c, dtype=x.dtype), randn(n, c, dtype=x.dtype)
            outs.append(OPS.channel_pool_backward(ga, gm, outs[2], x))
            gmean, gmax = randn(n, 1, h, w, dtype=x.dtype), randn(n, 1, h, w, dtype=x.dtype)
            outs += list(OPS.spatial_pool_backward(gmean, gmax, outs[4], x, g))
            outs += list(OPS.gate_apply_backward(torch.randn_like(x), x, g, s))
            for o in outs:
                assert o.isfinite().all()
            assert int(outs[2].max()) < h * w and int(outs[4].max()) < c


def test_no_kernel_adds_atomically():
    """What makes the kernels deterministic (the interpreter, which runs the programs one after
    another, cannot show it): no Triton atomic and no CUDA atomicAdd/atomicCAS in any kernel."""
    root = pathlib.Path(__file__).parent.parent
    sources = [*root.glob("fused_cbam/triton/*.py"), *root.glob("csrc/cuda/*.cu*")]
    assert len(sources) >= 8
    for path in sources:
        text = path.read_text()
        assert "tl.atomic_" not in text and "atomicAdd" not in text and "atomicCAS" not in text, path


def test_backward_deterministic():
    """The same inputs give bitwise the same gradients (on a GPU; the interpreter runs the
    programs in order, where atomics would be deterministic too)."""
    shape = (2, 3, 5, 7) if DEVICE == "cpu" else (4, 64, 56, 56)
    x = make_x(shape, torch.bfloat16, "channels_last")
    g, s = gates(shape, x.dtype)
    dout = torch.randn_like(x)
    _, _, am = mean_max_argmax(OPS.spatial_pool(x, g))
    up = (randn(shape[0], 1, *shape[2:], dtype=x.dtype), randn(shape[0], 1, *shape[2:], dtype=x.dtype))
    first = OPS.gate_apply_backward(dout, x, g, s) + OPS.spatial_pool_backward(*up, am, x, g)
    again = OPS.gate_apply_backward(dout, x, g, s) + OPS.spatial_pool_backward(*up, am, x, g)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_grids_larger_than_a_launch_are_refused():
    """One program per row of a few elements (the NCHW configurations with BLOCK_C = 1) needs
    more programs than a CUDA grid holds once x has 2^31 elements: a clear error, checked on the
    grid itself (a tensor that large would not fit the interpreter)."""
    assert _common.checked_grid(lambda meta: (meta["rows"], 3))({"rows": _common.MAX_PROGRAMS}) == (2**31 - 1, 3)
    with pytest.raises(ValueError, match=r"x: too large for the Triton kernels' grid \(2147483648 programs"):
        _common.checked_grid(lambda meta: (meta["rows"], 3))({"rows": 2**31})
    with pytest.raises(ValueError, match="x: too large"):
        _common.checked_grid((2**31, 1))({})


def test_extents_whose_loops_would_wrap_are_refused():
    """H·W or C within a block of 2^31: the kernels' int32 loops would wrap past the last block."""
    one = torch.empty(1, 1, 1, 1, device=DEVICE)
    _common.check_x(one.expand(1, 1, 1, _common.MAX_EXTENT), "channel_pool")
    _common.check_x(one.expand(1, _common.MAX_EXTENT, 1, 1), "channel_pool")
    for shape in [(1, 1, 3, 715827882), (1, 1, 1, 2**31 - 1), (1, _common.MAX_EXTENT + 1, 1, 1)]:
        with pytest.raises(ValueError, match=r"x must have C and H \* W of at most 2\^31 - 1024"):
            _common.check_x(one.expand(shape), "channel_pool")


def test_tuned_kernels_launch_one_call_at_a_time(monkeypatch):
    """Triton's autotuner keeps the call it is timing on itself: two threads tuning one kernel at
    once would mix up their arguments (and an adding kernel's restored grad_x). Every launch of a
    tuned kernel holds the lock."""
    held = []
    for tuner, _ in _common.TUNED_KERNELS:

        def run(*args, _run=tuner.run, **kwargs):
            held.append(_common.TUNER_LOCK.locked())
            return _run(*args, **kwargs)

        monkeypatch.setattr(tuner, "run", run)
    check_block((1, 3, 5, 7), "nchw")
    assert len(held) >= 5 and all(held), held


def test_errors():
    with pytest.raises(TypeError, match="float64"):
        OPS.channel_pool(torch.randn(1, 2, 3, 3, device=DEVICE, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        x = torch.randn(1, 2, 3, 3, device=DEVICE)
        OPS.gate_apply(x, torch.rand(1, 2, device=DEVICE, dtype=torch.float16), None)
    with pytest.raises(ValueError, match="shape"):
        OPS.spatial_pool(torch.randn(1, 2, 3, 3, device=DEVICE), torch.rand(1, 3, device=DEVICE))


def test_non_contiguous_input():
    # Neither NCHW nor channels_last: made contiguous first, results unchanged.
    base = torch.randn(2, 5, 6, 7, device=DEVICE)
    x = base[:, :, 1:5, ::2]
    check_channel_pool(x)
    check_spatial_pool(x, None)
    g, s = gates(x.shape, x.dtype)
    assert_close(OPS.gate_apply(x, g, s), reference.gate_apply(x, g, s), x.dtype, exact=True)


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt, requires_grad):
    shape = (2, 3, 2, 3)
    x = make_x(shape, torch.float32, fmt, requires_grad=requires_grad)
    g, s = gates(shape, x.dtype)
    g.requires_grad_(requires_grad)
    s.requires_grad_(requires_grad)
    torch.library.opcheck(OPS.channel_pool, (x,))
    torch.library.opcheck(OPS.spatial_pool, (x, g))
    torch.library.opcheck(OPS.spatial_pool, (x, None))
    torch.library.opcheck(OPS.spatial_pool, (x, g, True))
    torch.library.opcheck(OPS.gate_apply, (x, g, s))
    torch.library.opcheck(OPS.gate_apply, (x, None, s))


def test_opcheck_backward_ops():
    shape = (2, 3, 2, 3)
    x = make_x(shape, torch.float32, "channels_last")
    g, s = gates(shape, x.dtype)
    _, _, am_c = OPS.channel_pool(x)
    _, _, am_s = mean_max_argmax(OPS.spatial_pool(x, g))
    utils = ("test_schema", "test_faketensor")
    up = (randn(2, 3, dtype=x.dtype), randn(2, 3, dtype=x.dtype))
    torch.library.opcheck(OPS.channel_pool_backward, (*up, am_c, x), test_utils=utils)
    up = (randn(2, 1, 2, 3, dtype=x.dtype), randn(2, 1, 2, 3, dtype=x.dtype))
    torch.library.opcheck(OPS.spatial_pool_backward, (*up, am_s, x, g), test_utils=utils)
    torch.library.opcheck(OPS.gate_apply_backward, (torch.randn_like(x), x, g, s), test_utils=utils)


def _cbam_like(x, w_mlp, w_conv):
    avg, mx, _ = OPS.channel_pool(x)
    g = torch.sigmoid(avg @ w_mlp + mx @ w_mlp)
    s_mean, s_max, _ = mean_max_argmax(OPS.spatial_pool(x, g))
    h = torch.sigmoid(torch.nn.functional.conv2d(torch.cat([s_max, s_mean], dim=1), w_conv, padding=1))
    return OPS.gate_apply(x, g, h)


def test_torch_compile():
    torch._dynamo.reset()
    x = make_x((2, 4, 5, 6), torch.float32, "channels_last", requires_grad=True)
    w_mlp = torch.randn(4, 4, device=DEVICE, requires_grad=True)
    w_conv = torch.randn(1, 2, 3, 3, device=DEVICE, requires_grad=True)
    compiled = torch.compile(_cbam_like, fullgraph=True)
    dout = torch.randn(x.shape, device=DEVICE)
    out = compiled(x, w_mlp, w_conv)
    got = torch.autograd.grad(out, [x, w_mlp, w_conv], dout)
    ref_out = _cbam_like(x, w_mlp, w_conv)
    want = torch.autograd.grad(ref_out, [x, w_mlp, w_conv], dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_autotuning_can_be_turned_off(monkeypatch):
    """FUSED_CBAM_TRITON_AUTOTUNE=0 (gpu_check.sh's test runs): the first GPU configuration only;
    the interpreter always has its one fixed configuration."""
    from fused_cbam.triton import _common

    gpu_configs = [_common.config(BLOCK_C=1, BLOCK_P=1024), _common.config(BLOCK_C=2, BLOCK_P=512)]
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "TUNE", True)
    assert _common.configs_to_try(gpu_configs, _common.INTERPRET_CONFIG) == gpu_configs
    monkeypatch.setattr(_common, "TUNE", False)
    assert _common.configs_to_try(gpu_configs, _common.INTERPRET_CONFIG) == gpu_configs[:1]
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert _common.configs_to_try(gpu_configs, _common.INTERPRET_CONFIG) == [_common.INTERPRET_CONFIG]


@triton.jit
def _split_bounds_kernel(bounds_ptr, length, BLOCK: tl.constexpr):
    split = tl.program_id(0)
    start, end = _common.split_range(split, tl.num_programs(0), length, BLOCK)
    tl.store(bounds_ptr + 2 * split, start.to(tl.int64))
    tl.store(bounds_ptr + 2 * split + 1, end.to(tl.int64))


@pytest.mark.parametrize("length", [1, 1000, _common.MAX_EXTENT], ids=str)
def test_split_ranges_tile_the_row_up_to_2_31(length):
    """The splits of a row (4 per SM on a GPU: 528 on an H200; GPU block length) cover it exactly,
    in order, at lengths up to the largest H·W that check_x takes."""
    splits, block = 528, 1024
    bounds = torch.full((splits, 2), -1, dtype=torch.int64, device=DEVICE)
    _split_bounds_kernel[(splits,)](bounds, length, BLOCK=block)
    starts, ends = bounds[:, 0].tolist(), bounds[:, 1].tolist()
    assert starts[0] == 0 and ends[-1] == length
    assert all(0 <= s <= e <= length and (s % block == 0 or s == length) for s, e in zip(starts, ends))
    assert all(e == s for e, s in zip(ends[:-1], starts[1:]))  # no gap, no overlap
