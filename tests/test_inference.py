"""The whole-block inference operator (cbam_inference: C++ CPU, CUDA and Triton) and the
modules' use of it: under no_grad/inference mode in eval, every plain layout computes its block in that one
operator; the result must equal the reference backend's, and anything else must take the
three-operator path."""

import pytest
import torch
import torch.nn.utils.prune
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fused_cbam
from fused_cbam import reference
from layouts import MMYolo
from helpers import (
    COMPILED_BACKENDS,
    OPERATOR_BACKENDS,
    SHAPES,
    TOLERANCE,
    TRITON_DEVICE,
    OperatorLog,
    assert_close,
    make_input,
    operator_namespace,
    skip_unless_available,
)
from test_properties import FULL_SIZES, TINY_SIZES, _base_and_view, _profile, cases

# The tests of results run on every backend with the operator (cuda skips without a GPU; triton
# runs under its interpreter on the CPU).
on_each_device = pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)


def _inference_op(backend):
    return operator_namespace(backend).cbam_inference


def _logged_name(backend):
    return f"{operator_namespace(backend).name}.cbam_inference"


LAYOUTS = {
    "official": lambda c, **kw: fused_cbam.nn.CBAM(c, reduction_ratio=min(16, c), **kw),
    "official-avg": lambda c, **kw: fused_cbam.nn.CBAM(c, reduction_ratio=min(16, c), pool_types=("avg",), **kw),
    "timm": lambda c, **kw: fused_cbam.nn.CbamModule(c, rd_channels=max(1, c // 4), **kw),
    "timm-light": lambda c, **kw: fused_cbam.nn.LightCbamModule(c, rd_channels=max(1, c // 4), **kw),
    "mmyolo": lambda c, **kw: fused_cbam.nn.MMYoloCBAM(c, reduce_ratio=min(16, c), **kw),
    "ultralytics": lambda c, **kw: fused_cbam.nn.UltralyticsCBAM(c, **kw),
    "ultralytics-k3": lambda c, **kw: fused_cbam.nn.UltralyticsCBAM(c, kernel_size=3, **kw),
}


def _pair(layout, channels, dtype=torch.float32, device="cpu", backend="auto"):
    """The fused module (eval, random weights and BN statistics) and the same on the reference backend."""
    fused = LAYOUTS[layout](channels, backend=backend).to(device)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for name, b in fused.named_buffers():
            if "running" in name:
                b.add_(torch.rand_like(b))
    reference = LAYOUTS[layout](channels, backend="reference").to(device)
    reference.load_state_dict(fused.state_dict())
    return fused.to(dtype).eval(), reference.to(dtype).eval()


def _run_logged(module, x):
    with torch.no_grad(), OperatorLog() as log:
        out = module(x)
    return out, log.names


def _check_one_operator(layout, dtype, memory_format, shape, backend, device):
    fused, reference = _pair(layout, shape[1], dtype, device, backend)
    x = make_input(shape, dtype, device, memory_format)
    out, ops = _run_logged(fused, x)
    assert _logged_name(backend) in ops and not any(op.endswith(".channel_pool") for op in ops), ops
    with torch.no_grad():
        expected = reference(x)
    assert_close(out, expected, TOLERANCE[dtype] * 4, "out", rounded_once=False)  # the MLP, the conv
    if memory_format == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference_in_one_operator(layout, dtype, memory_format, shape, backend, device):
    skip_unless_available(backend)
    _check_one_operator(layout, dtype, memory_format, shape, backend, device)


# The interpreter is slow (4 s for one 45 x 47 block): shapes that still cross its blocks
# (BLOCK_C = 8, BLOCK_P = 16, 64 pixels per program of the spatial gate) and its chunks of 2.
TRITON_SHAPES = [
    pytest.param((3, 5, 7, 9), id="odd-two-chunks"),
    pytest.param((2, 1, 4, 4), id="C=1"),
    pytest.param((3, 4, 1, 1), id="HW=1"),
    pytest.param((2, 20, 6, 5), id="C-over-blocks"),
    pytest.param((1, 3, 9, 11), id="P-over-blocks"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_the_reference_in_one_operator(layout, dtype, memory_format, shape):
    skip_unless_available("triton")
    _check_one_operator(layout, dtype, memory_format, shape, "triton", TRITON_DEVICE)


@on_each_device
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision_in_one_operator(layout, dtype, backend, device):
    """Under autocast with x in its dtype and the parameters in float32 (mixed precision): the
    operator, which reads the parameters as they are, against the reference under the same
    autocast (its MLP and conv in the autocast dtype)."""
    skip_unless_available(backend)
    fused, reference = _pair(layout, 16, torch.float32, device, backend)
    x = make_input((3, 16, 5, 7), dtype, device, "channels_last")
    with torch.autocast(device, dtype=dtype):
        out, ops = _run_logged(fused, x)
        expected = _run_logged(reference, x)[0]
    assert _logged_name(backend) in ops and not any(op.endswith(".channel_pool") for op in ops), ops
    assert out.dtype == dtype
    assert_close(out, expected, TOLERANCE[dtype] * 4, "out", rounded_once=False)


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_batches_larger_than_one_chunk(memory_format):
    """Chunks of samples sized to the L2 cache: a batch of many chunks, odd sizes, 2 threads or 1."""
    skip_unless_available("cpu")
    fused, reference = _pair("official", 64)
    x = make_input((37, 64, 29, 31), torch.float32, "cpu", memory_format)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(fused(x))
                assert_close(outs[-1], reference(x), TOLERANCE[torch.float32] * 4, f"out, {n} threads")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]), "the result depends on the number of threads"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# 256 channels: every chunk on the vector paths; 255: the scalar ones; "misaligned": x's data
# one element past a 16-byte boundary (a view into a larger buffer), so every chunk is too.
@pytest.mark.parametrize("case", ["256", "255", "misaligned"])
@pytest.mark.needs_cuda
def test_batches_larger_than_one_chunk_on_the_gpu(memory_format, dtype, backend, case):
    """On a GPU, chunks of samples take half of the L2 cache (25-30 MB on an H100/H200): x of
    about 2.5 chunks, odd spatial size."""
    skip_unless_available(backend)
    channels = 255 if case == "255" else 256
    fused, reference = _pair("official", channels, dtype, "cuda", backend)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sample_bytes = channels * 29 * 31 * dtype.itemsize
    x = make_input((max(3, l2 * 5 // 4 // sample_bytes), channels, 29, 31), dtype, "cuda", memory_format)
    if case == "misaligned":
        buffer = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        x = buffer[1:].as_strided(x.shape, x.stride()).copy_(x)
    out, ops = _run_logged(fused, x)
    assert _logged_name(backend) in ops, ops
    with torch.no_grad():
        assert_close(out, reference(x), TOLERANCE[dtype] * 4, "out", rounded_once=False)  # the MLP, the conv


@pytest.mark.parametrize("chunk_bytes", ["0", "1", "3000000"])
@pytest.mark.needs_cuda
def test_the_cuda_chunk_size_leaves_the_output_as_it_is(chunk_bytes, monkeypatch):
    """``FUSED_CBAM_CUDA_CHUNK_BYTES`` (for measuring the chunking): the whole batch in one chunk
    (0, and also 1: fewer bytes than a sample, as when a sample outgrows half the L2), or a few
    samples a chunk; each sample's output is computed alone either way, so the bits do not
    change."""
    skip_unless_available("cuda")
    fused, _ = _pair("official", 64, torch.bfloat16, "cuda", "cuda")
    x = make_input((37, 64, 29, 31), torch.bfloat16, "cuda", "channels_last")
    out, ops = _run_logged(fused, x)
    assert _logged_name("cuda") in ops, ops
    monkeypatch.setenv("FUSED_CBAM_CUDA_CHUNK_BYTES", chunk_bytes)
    assert torch.equal(_run_logged(fused, x)[0], out)


@pytest.mark.parametrize("chunk_bytes,chunks", [(None, 3), ("0", 1), ("1", 1), ("3780", 2), ("2519", 5)])
def test_the_triton_chunk_size_leaves_the_output_as_it_is(chunk_bytes, chunks, monkeypatch):
    """``FUSED_CBAM_TRITON_CHUNK_BYTES``, as the CUDA operator's variable: the chunks it makes (of
    samples of 5 x 7 x 9 float32, 1260 bytes; two samples a chunk in the interpreter without it),
    with the same bits here; a value that is not a number of bytes is refused, naming the
    variable. (On a GPU the poolings' splits and tuning follow a chunk's samples, so the float
    sums' order, and their last bits, may change with the chunk.)"""
    pytest.importorskip("triton")
    from fused_cbam.triton import _common, inference

    if not _common.INTERPRET:
        pytest.skip("counts the chunks in Triton's interpreter")
    fused, _ = _pair("official", 5, torch.float32, "cpu", "triton")
    x = make_input((5, 5, 7, 9), torch.float32, "cpu", "channels_last")
    with torch.no_grad():
        expected = fused(x)
    if chunk_bytes is not None:
        monkeypatch.setenv("FUSED_CBAM_TRITON_CHUNK_BYTES", chunk_bytes)
    pooled, pool = [], inference.channel_pool
    monkeypatch.setattr(inference, "channel_pool", lambda xs: pooled.append(xs.shape[0]) or pool(xs))
    with torch.no_grad():
        assert torch.equal(inference.cbam_inference(x, *fused._plain()), expected)
    assert len(pooled) == chunks and sum(pooled) == 5, pooled
    monkeypatch.setenv("FUSED_CBAM_TRITON_CHUNK_BYTES", "half")
    with pytest.raises(ValueError, match="FUSED_CBAM_TRITON_CHUNK_BYTES: expected a whole number"):
        inference.cbam_inference(x, *fused._plain())


def test_a_short_last_chunk_joins_the_one_before():
    """Each chunk reads the MLP's weights once: a last chunk whose x costs less than they do is
    merged into the one before (here 1 x 1 samples of 512 channels: a chunk of many hundreds of
    samples, and a tail of a few)."""
    skip_unless_available("cpu")
    fused, reference = _pair("official", 512)
    for n in (1537, 1540, 3077):
        x = make_input((n, 512, 1, 1), torch.float32, "cpu")
        with torch.no_grad():
            assert_close(fused(x), reference(x), TOLERANCE[torch.float32] * 4, f"out, batch {n}")


# The MLP's variants, with their layers: two over both pools (official), two over their mix
# (timm's light), one over the mean (ultralytics).
MLP_LAYERS = {"official": 2, "timm-light": 2, "ultralytics": 1}
# Views and allocations: no launch on a GPU.
_NO_COMPUTE = {"empty", "empty_like", "empty_strided", "new_empty", "view", "slice", "select", "as_strided", "alias", "detach"}


@pytest.mark.parametrize("layout", sorted(MLP_LAYERS))
def test_the_triton_operator_runs_nothing_but_its_kernels(layout, monkeypatch):
    """Between its kernels the Triton operator only allocates and views: no torch op converts a
    parameter or computes part of the MLP, each of which would be one more launch on a GPU; the
    MLP and its sigmoid take one launch a layer, per chunk (two samples in the interpreter)."""
    pytest.importorskip("triton")
    from fused_cbam.triton import _common, inference

    if not _common.INTERPRET:
        pytest.skip("counts the launches in Triton's interpreter (on a GPU: the profiler's test below)")
    from triton.runtime.interpreter import InterpretedFunction

    launches, log = [], OperatorLog()
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        start = len(log.names)
        try:
            return original(self, *args, **kwargs)
        finally:
            del log.names[start:]  # the torch ops the interpreter runs inside a launch

    monkeypatch.setattr(InterpretedFunction, "run", run)
    # A channels_last model: its spatial conv weight is not contiguous, and is read as it is.
    fused, reference = (m.to(memory_format=torch.channels_last) for m in _pair(layout, 24, torch.bfloat16, "cpu", "triton"))
    x = make_input((4, 24, 5, 6), torch.bfloat16, "cpu", "channels_last")
    with torch.no_grad(), log:
        out = inference.cbam_inference(x, *fused._plain())
    outside = [name.split(".", 1)[1] for name in log.names]  # "aten.empty_like" -> "empty_like"
    assert set(outside) <= _NO_COMPUTE, outside
    assert launches.count("_mlp_layer_kernel") == 2 * MLP_LAYERS[layout], launches
    with torch.no_grad():
        assert_close(out, reference(x), TOLERANCE[torch.bfloat16] * 4, "out", rounded_once=False)


def _triton_kernel_names() -> set:
    import triton

    import fused_cbam.triton as package
    from fused_cbam.triton import channel_pool, gate_apply, inference, spatial_pool

    modules = (package._common, channel_pool, gate_apply, inference, spatial_pool)
    return {name for m in modules for name, v in vars(m).items() if isinstance(v, triton.runtime.JITFunction)}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", sorted(MLP_LAYERS))
@pytest.mark.needs_cuda
def test_the_gpu_operator_launches_nothing_but_its_kernels(layout, backend):
    """On a GPU, one call (one chunk) launches the operator's own kernels only: no ATen kernel
    converts a parameter or computes part of the MLP (cuBLAS, elementwise), and the MLP with its
    sigmoid takes one kernel a layer."""
    skip_unless_available(backend)
    # A channels_last model: its spatial conv weight is not contiguous, and is read as it is.
    fused, reference = (m.to(memory_format=torch.channels_last) for m in _pair(layout, 64, torch.bfloat16, "cuda", backend))
    x = make_input((4, 64, 14, 14), torch.bfloat16, "cuda", "channels_last")
    args = fused._plain()
    operator = _inference_op(backend)
    operator(x, *args)  # Triton compiles and tunes on its first call
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        out = operator(x, *args)
        torch.cuda.synchronize()
    with torch.no_grad():
        assert_close(out, reference(x), TOLERANCE[torch.bfloat16] * 4, "out", rounded_once=False)
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = _triton_kernel_names() if backend == "triton" else None
    foreign = [k for k in kernels if ("fused_cbam::gpu::" not in k if ours is None else k not in ours)]
    assert kernels and not foreign, kernels
    assert sum("mlp_layer_kernel" in k for k in kernels) == MLP_LAYERS[layout], kernels


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.needs_cuda
def test_many_samples_in_one_chunk_on_the_gpu(backend):
    """600000 samples of 2 x 1 x 1 (4.8 MB, under half of an H100's or H200's L2): one chunk on
    CUDA, whose MLP kernel's blocks then stride over the samples (a grid's second dimension takes
    at most 65535 blocks); on Triton chunks of 65535 samples, the most its kernels' grids take."""
    skip_unless_available(backend)
    fused, reference = _pair("official", 2, torch.float32, "cuda", backend)
    x = make_input((600000, 2, 1, 1), torch.float32, "cuda", "nchw")
    out, ops = _run_logged(fused, x)
    assert _logged_name(backend) in ops, ops
    with torch.no_grad():
        assert_close(out, reference(x), TOLERANCE[torch.float32] * 4, "out")


@on_each_device
def test_inference_mode_empty_batch_and_nan(backend, device):
    skip_unless_available(backend)
    fused, reference = _pair("timm", 8, device=device, backend=backend)
    with torch.inference_mode():
        assert fused(torch.randn(0, 8, 5, 5, device=device)).shape == (0, 8, 5, 5)
        x = torch.randn(2, 8, 5, 5, device=device)
        x[1, 3, 2, 2] = float("nan")
        out, expected = fused(x), reference(x)
    assert_close(out, expected, TOLERANCE[torch.float32] * 4, "out")
    assert out[1].isnan().all() and not out[0].isnan().any()


@pytest.mark.filterwarnings("ignore:fused_cbam.nn.ChannelGate. pool_types")
@pytest.mark.parametrize(
    "why",
    ["grad", "train", "keep_gates", "silu", "no_spatial", "max_only", "lse", "reference_backend"],
)
def test_other_cases_take_the_three_operator_path(why):
    skip_unless_available("cpu")
    kwargs = {
        "no_spatial": {"no_spatial": True}, "max_only": {"pool_types": ("max",)}, "lse": {"pool_types": ("avg", "lse")}
    }.get(why, {})
    if why == "silu":
        fused = fused_cbam.nn.CbamModule(16, act_layer=nn.SiLU)
    else:
        fused = fused_cbam.nn.CBAM(16, **kwargs, backend="reference" if why == "reference_backend" else "auto")
    fused.train(why == "train")
    fused.keep_gates = why == "keep_gates"
    x = torch.randn(2, 16, 6, 6)
    if why == "grad":
        with OperatorLog() as log:
            fused(x)
        ops = log.names
    else:
        ops = _run_logged(fused, x)[1]
    if why == "reference_backend":
        assert not any(name.startswith("fused_cbam.") for name in ops), ops
    else:
        assert_took_the_three_operators(ops)


@pytest.mark.parametrize("part", ["bn", "relu"])
def test_spatial_conv_parts_set_to_none(part):
    """A part of the spatial conv module set to None after construction (its BatchNorm folded into
    the conv, say) stays in its ``_modules`` as None: the block computes what the original does,
    in the one operator where that is the plain block (a ReLU the official spatial conv never
    had) and in the three otherwise (no BatchNorm)."""
    skip_unless_available("cpu")
    blocks = _pair("official", 16)
    for block in blocks:
        spatial = block.SpatialGate.spatial
        if part == "relu":  # (the official spatial conv has no ReLU: one set, then removed)
            spatial.relu = nn.ReLU()
        setattr(spatial, part, None)
    fused, reference = blocks
    x = torch.randn(2, 16, 6, 6)
    out, ops = _run_logged(fused, x)
    if part == "relu":
        assert "fused_cbam.cbam_inference" in ops, ops
    else:
        assert_took_the_three_operators(ops)
    with torch.no_grad():
        assert_close(out, reference(x), TOLERANCE[torch.float32] * 4, "out")


def assert_took_the_three_operators(names):
    """The block ran the training path's operators (not the inference operator, nor only plain
    PyTorch)."""
    assert "fused_cbam.cbam_inference" not in names, names
    assert {"fused_cbam.channel_pool", "fused_cbam.gate_apply"} <= set(names), names


def _operator_args(memory_format="nchw", c=12, hidden=3, k=7, bn=True, device="cpu"):
    x = make_input((3, c, 9, 10), torch.float32, device, memory_format)

    def randn(*shape):
        return torch.randn(shape, device=device)

    norm = [randn(1), randn(1).abs() + 0.5, randn(1), randn(1), 1e-5] if bn else [None] * 4 + [0.0]
    return (
        x, randn(hidden, c), randn(hidden), randn(c, hidden, 1, 1), None, "sum", randn(1, 2, k, k), randn(1), *norm,
        True,
    )


@on_each_device
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_opcheck(memory_format, backend, device):
    skip_unless_available(backend)
    torch.library.opcheck(_inference_op(backend).default, _operator_args(memory_format, device=device))


@on_each_device
@pytest.mark.parametrize("bn", [True, False], ids=["bn", "no-bn"])
def test_operator_formula(bn, backend, device):
    """The operator against its formula written out in plain PyTorch."""
    skip_unless_available(backend)
    x, w1, b1, w2, _, _, conv_weight, conv_bias, mean, var, gamma, beta, eps, max_first = _operator_args(
        k=3, bn=bn, device=device
    )
    norm = (mean, var, gamma, beta, eps, max_first)
    out = _inference_op(backend)(x, w1, b1, w2, None, "sum", conv_weight, conv_bias, *norm)

    def mlp(v):
        return torch.relu(v @ w1.T + b1) @ w2.flatten(1).T

    g = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
    y = x * g[:, :, None, None]
    u = torch.nn.functional.conv2d(torch.stack([y.amax(1), y.mean(1)], 1), conv_weight, conv_bias, padding=1)
    if bn:
        u = (u - mean) / torch.sqrt(var + eps) * gamma + beta
    assert_close(out, y * torch.sigmoid(u), 1e-5, "out")


@on_each_device
def test_operator_formula_one_layer_average_only(backend, device):
    """Without fc2, pooling "avg": fc1 of the average pool alone gives the channel logits."""
    skip_unless_available(backend)
    x, _, _, _, _, _, conv_weight, _, *norm = _operator_args(k=3, bn=False, device=device)
    w1, b1 = torch.randn(12, 12, device=device), torch.randn(12, device=device)
    out = _inference_op(backend)(x, w1, b1, None, None, "avg", conv_weight, None, *norm)
    y = x * torch.sigmoid(x.mean((2, 3)) @ w1.T + b1)[:, :, None, None]
    u = torch.nn.functional.conv2d(torch.stack([y.amax(1), y.mean(1)], 1), conv_weight, padding=1)
    assert_close(out, y * torch.sigmoid(u), 1e-5, "out")


@on_each_device
@pytest.mark.parametrize("other", ["all", "fc1_bias", "bn_mean", "conv_weight"])
def test_parameters_in_another_dtype_than_x(other, backend, device):
    """A bfloat16 x with parameters in float32 (all, or one of a group): no operator misreads them,
    and the result is the formula's within bfloat16's rounding of the pools, maps and layers. The
    BatchNorm's mean, 100.3 (100.5 in bfloat16) over a variance of 0.01 with the conv's logits
    near 100, shifts the logits by 2 if a float32 mean is rounded: the conv's group is read in
    float32 when one of it is."""
    skip_unless_available(backend)
    args = list(_operator_args(device=device))
    args[0] = args[0].to(torch.bfloat16)
    args[6] = args[6] * 1e-3  # conv weight: logits near the bias
    args[7:12] = [torch.full((1,), v, device=device) for v in (100.0, 100.3, 0.01, 1.0, 0.0)]
    names = ["fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "pooling", "conv_weight", "conv_bias",
             "bn_mean", "bn_var", "bn_weight", "bn_bias"]  # fmt: skip
    for i, name in enumerate(names, start=1):
        if isinstance(args[i], torch.Tensor) and other not in ("all", name):
            args[i] = args[i].to(torch.bfloat16)
    out = _inference_op(backend)(*args)
    assert out.dtype == torch.bfloat16
    want = reference.cbam_inference(*args)
    assert_close(out, want, TOLERANCE[torch.bfloat16] * 4, "out", rounded_once=False)


# Parameters the whole-block operators refuse (index in _operator_args), and what they say
# (cbam_training's too: tests/test_training.py). A meta tensor stays on its device.
BAD_PARAMETERS = [
    (1, torch.randn(3, 5), "fc1_weight: expected shape \\[3, 12\\]"),
    (2, torch.randn(4), "fc1_bias: expected shape"),
    (3, torch.randn(3, 12), "fc2_weight: expected shape \\[12, 3\\]"),
    (4, torch.randn(5), "fc2_bias: expected shape"),
    (6, torch.randn(1, 2, 4, 4), "conv_weight: expected shape \\[1, 2, K, K\\] \\(or"),
    (5, "max", "pooling: expected"),
    (6, torch.randn(1, 3, 7, 7), "conv_weight: expected shape"),
    (7, torch.randn(2), "conv_bias: expected shape"),
    (9, None, "bn_mean, bn_var: expected both or neither"),
    (1, torch.ones(3, 12, dtype=torch.int64), "fc1_weight: expected a floating-point tensor"),
    (1, torch.randn(3, 12, device="meta"), "fc1_weight: expected .*device"),
    (8, torch.randn(1, device="meta"), "bn_mean: expected .*device"),
]


def with_bad_parameter(args, index, value, device):
    args = list(args)
    args[index] = value.to(device) if isinstance(value, torch.Tensor) and not value.is_meta else value
    return args


@pytest.mark.parametrize("index,value,match", BAD_PARAMETERS)
@on_each_device
def test_bad_parameters_name_the_argument(index, value, match, backend, device):
    skip_unless_available(backend)
    args = with_bad_parameter(_operator_args(device=device), index, value, device)
    with pytest.raises((ValueError, TypeError), match=match):
        _inference_op(backend)(*args)


@on_each_device
def test_fc2_bias_without_fc2_weight_is_refused(backend, device):
    skip_unless_available(backend)
    args = list(_operator_args(device=device))
    args[3], args[4] = None, torch.randn(12, device=device)
    with pytest.raises(ValueError, match="fc2_bias: expected None without fc2_weight"):
        _inference_op(backend)(*args)


@on_each_device
@pytest.mark.parametrize("given", [10, 11], ids=["bn_weight", "bn_bias"])
def test_bn_affine_without_running_statistics_is_refused(given, backend, device):
    """Accepted and ignored before (the formula applies them only with the statistics), and a
    backward then failed on an unused input."""
    skip_unless_available(backend)
    args = list(_operator_args(device=device))
    args[8:12] = [None] * 4
    args[given] = torch.randn(1, device=device)
    with pytest.raises(ValueError, match="bn_weight, bn_bias: expected None without bn_mean and bn_var"):
        _inference_op(backend)(*args)


def _float(t):
    """A float32 view of the graph (gradients flow back to t in its own dtype)."""
    return t.float() if isinstance(t, torch.Tensor) else t


@on_each_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["sum-bn", "avg-one-layer", "mix-one-map"])
def test_backward_recomputes_the_formula(variant, dtype, backend, device):
    """The operator's backward (for graphs traced from eval-mode modules) gives the gradients of
    its formula, for every input, in x's dtype; gradcheck and gradgradcheck in float64 where the
    backend has it."""
    skip_unless_available(backend)
    args = list(_operator_args(c=4, hidden=2, k=3, device=device))
    args[0] = args[0][:2, :, :4, :5].contiguous()  # (gradcheck's numerical Jacobian: one forward per element)
    if variant == "avg-one-layer":
        args[1:6] = [torch.randn(4, 4, device=device), torch.randn(4, device=device), None, None, "avg"]
    elif variant == "mix-one-map":
        args[5], args[6] = "mix", torch.randn(1, 1, 3, 3, device=device)
    op = _inference_op(backend)
    if dtype == torch.float32 and backend != "triton":  # (Triton has no float64)
        args64 = [a.double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.autograd.gradcheck(lambda *a: op(*a), args64, fast_mode=True)
    # x in the dtype, the parameters (biases included) too, as a .to(dtype) model holds them
    leaves = [a.to(dtype).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*leaves)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad)
    expected = torch.autograd.grad(reference.cbam_inference(*[_float(a) for a in leaves]), tensors, grad)
    for i, (actual, want) in enumerate(zip(grads, expected)):
        assert actual.dtype == dtype, f"gradient of tensor argument {i}: {actual.dtype}"
        assert_close(actual, want, 1e-4 if dtype == torch.float32 else 2e-2, f"gradient of tensor argument {i}")
    if dtype == torch.float32 and backend != "triton":  # second derivatives, through the recomputation
        assert torch.autograd.gradgradcheck(lambda *a: op(*a), args64, fast_mode=True)
    # Arguments tied together (one tensor twice, one computed from another), with create_graph
    tied = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    bias = tied[2]
    tied_args = [tied[0], tied[1], bias, tied[3], tied[4], *tied[5:]]
    if tied_args[4] is None and tied_args[3] is not None:
        tied_args[4] = bias.sum() + torch.zeros(tied_args[3].shape[0], device=device)
    for create_graph in (False, True):
        grad = torch.autograd.grad(op(*tied_args).square().sum(), [tied[0], bias], create_graph=create_graph)
        expected = torch.autograd.grad(reference.cbam_inference(*tied_args).square().sum(), [tied[0], bias])
        for name, actual, want in zip(("x", "fc1 bias"), grad, expected):
            assert_close(actual, want, 1e-4, f"tied arguments, create_graph={create_graph}: grad of {name}")


@on_each_device
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_traces_the_inference_operator(layout, backend, device):
    """fullgraph: the modules' choice of path and their parameter gathering trace without breaks."""
    skip_unless_available(backend)
    torch._dynamo.reset()
    fused, reference = _pair(layout, 16, device=device, backend=backend)
    x = make_input((2, 16, 7, 9), torch.float32, device, "channels_last")
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    compiled = torch.compile(fused, fullgraph=True, backend=keep_graph)
    with torch.no_grad():
        out = compiled(x)
        expected = reference(x)
    assert len(graphs) == 1 and "cbam_inference" in graphs[0] and "channel_pool" not in graphs[0], graphs
    assert_close(out, expected, TOLERANCE[torch.float32] * 4, "out")


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@_profile(max_examples=150)
@given(case=cases(FULL_SIZES), layout=st.sampled_from(sorted(LAYOUTS)))
def test_property_matches_the_reference(case, layout, backend, device):
    """Shapes with 1s and primes, every dtype, strided views (sliced, transposed, expanded), ties
    and NaNs: the inference operator against the same layout on the reference backend."""
    skip_unless_available(backend)
    _check_property(case, layout, backend, device)


@_profile(max_examples=40)
@given(case=cases(TINY_SIZES), layout=st.sampled_from(sorted(LAYOUTS)))
def test_triton_property_matches_the_reference(case, layout):
    """The same on Triton, fewer and smaller examples (its interpreter is slow); float64, which
    its kernels do not take, is refused with a TypeError."""
    skip_unless_available("triton")
    if case.dtype == torch.float64:
        with pytest.raises(TypeError, match="float64"):
            _check_property(case, layout, "triton", TRITON_DEVICE)
        return
    _check_property(case, layout, "triton", TRITON_DEVICE)


def _check_property(case, layout, backend, device):
    gen = torch.Generator().manual_seed(case.seed)
    base, view = _base_and_view(case, gen)
    x = view(base.to(device))
    torch.manual_seed(case.seed)
    fused, reference = _pair(layout, case.shape[1], case.dtype, device, backend)
    out, ops = _run_logged(fused, x)
    assert _logged_name(backend) in ops, ops
    with torch.no_grad():
        expected = reference(x)
    assert out.dtype == case.dtype
    assert_close(out, expected, TOLERANCE[case.dtype] * 4, "out", rounded_once=False)  # the MLP, the conv


@pytest.mark.parametrize("hook", ["prune", "forward_hook"])
def test_parts_with_hooks_leave_the_inference_operator(hook):
    """Pruning recomputes a weight in a forward pre-hook, from weight_orig: the inference operator,
    which reads .weight directly, would use a stale one. A block whose parts have hooks runs them."""
    skip_unless_available("cpu")
    block = fused_cbam.nn.CbamModule(32, backend="cpu").eval()
    seen = []
    if hook == "prune":
        torch.nn.utils.prune.l1_unstructured(block.channel.fc1, "weight", amount=0.3)
        with torch.no_grad():
            block.channel.fc1.weight_orig.mul_(5)  # as after an optimizer step; .weight is stale
    else:
        block.spatial.conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad(), OperatorLog() as log:
        out = block(x)
    assert_took_the_three_operators(log.names)
    assert_close(out, block(x), 1e-6, "no_grad output against the grad-enabled forward")
    assert seen == ([] if hook == "prune" else [(2, 1, 8, 8)] * 2)


def _changed_part(block, change: str) -> None:
    conv = block.spatial.conv.conv
    if change == "reflect_padding":
        conv.padding_mode = "reflect"
    elif change == "stride_2":
        conv.stride = (2, 2)
    elif change == "dilation_2":
        conv.dilation = (2, 2)
    elif change == "grouped_fc1":
        block.channel.fc1 = nn.Conv2d(16, 4, 1, groups=2, bias=False)
    else:
        block.channel.fc2 = nn.Conv2d(4, 16, 1, padding=1, bias=False)


@pytest.mark.parametrize("change", ["reflect_padding", "stride_2", "dilation_2", "grouped_fc1", "padded_fc2"])
def test_parts_the_operator_does_not_compute_run_as_they_are(change):
    """A part the inference operator does not compute (a spatial conv with reflect padding, a
    stride or a dilation; an MLP layer that is a grouped or padded 1x1 conv) leaves the block in
    eval mode without gradients to its parts: what they give (the kept gates take that path too),
    or the error they raise, never the operator's output for the plain part."""
    skip_unless_available("cpu")
    block = fused_cbam.nn.CbamModule(16, rd_channels=4, backend="cpu").eval()
    _changed_part(block, change)
    x = torch.randn(2, 16, 8, 8)
    results = []
    for keep_gates in (False, True):
        block.keep_gates = keep_gates
        with torch.no_grad(), OperatorLog() as log:
            try:
                results.append(block(x))
            except (RuntimeError, ValueError) as error:
                results.append(type(error))
        assert "fused_cbam.cbam_inference" not in log.names, log.names
    fast, parts = results
    if isinstance(parts, type):
        assert fast is parts
    else:
        assert torch.equal(fast, parts)


class _Scaled:
    """Mixed into a part's class: its forward gives twice what the part's gives."""

    def forward(self, x):
        return super().forward(x) * 2.0


def _with_part(block, path: str, make):
    """Replace the part at ``path`` by ``make(part)`` (same parameters)."""
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent), name, make(block.get_submodule(path)))
    return block


def _rebased(part, mixin):
    """``part`` with ``mixin`` put in front of its class (a subclass with its own forward)."""
    part.__class__ = type(f"Scaled{type(part).__name__}", (mixin, type(part)), {})
    return part


class _Called:
    """Mixed into a part's class: its __call__ doubles what its forward gives."""

    def __call__(self, *args):
        return 2 * super().__call__(*args)


class _HalfGate:
    """Mixed into a channel half: another gate from the same logits."""

    def to_gate(self, logits):
        return torch.sigmoid(2 * logits)


def _renamed(part, mixin):
    """``_rebased``, keeping the class's name."""
    part.__class__ = type(type(part).__name__, (mixin, type(part)), {})
    return part


class _BatchNormAct2d(nn.BatchNorm2d):  # named like timm's, but not timm's: a ReLU after the BN
    def forward(self, x):
        return torch.relu(super().forward(x))


SUBCLASSED = {
    "official Linear": lambda: _with_part(fused_cbam.nn.CBAM(16, 4), "ChannelGate.mlp.1", lambda p: _rebased(p, _Scaled)),
    "official mlp Sequential": lambda: _with_part(fused_cbam.nn.CBAM(16, 4), "ChannelGate.mlp", lambda p: _rebased(p, _Scaled)),
    "official BasicConv": lambda: _with_part(fused_cbam.nn.CBAM(16, 4), "SpatialGate.spatial", lambda p: _rebased(p, _Scaled)),
    "timm conv module": lambda: _with_part(fused_cbam.nn.CbamModule(16, rd_channels=4), "spatial.conv", lambda p: _rebased(p, _Scaled)),
    "timm BatchNormAct2d look-alike": lambda: _with_part(
        fused_cbam.nn.CbamModule(16, rd_channels=4), "spatial.conv.bn", lambda p: _rebased(p, _BatchNormAct2d)
    ),
    "mmyolo conv module": lambda: _with_part(fused_cbam.nn.MMYoloCBAM(16, 4), "channel_attention.fc.0", lambda p: _rebased(p, _Scaled)),
    # mmcv's ConvModule (here the tests' stand-in, converted) with its activation first
    "mmyolo ConvModule act first": lambda: _with_part(
        fused_cbam.convert(MMYolo.CBAM(16, 4, 7)), "spatial_attention.conv", lambda p: setattr(p, "order", ("act", "conv", "norm")) or p
    ),
    "mmyolo ConvModule with a norm": lambda: _with_part(
        fused_cbam.convert(MMYolo.CBAM(16, 4, 7)), "channel_attention.fc.0", lambda p: p.add_module("bn", nn.BatchNorm2d(4)) or p
    ),
    "mmyolo third layer": lambda: _with_part(fused_cbam.nn.MMYoloCBAM(16, 4), "channel_attention.fc", lambda p: p.append(nn.Tanh())),
    "instance forward": lambda: _with_part(
        fused_cbam.nn.CBAM(16, 4), "ChannelGate.mlp.1", lambda p: setattr(p, "forward", lambda x, f=p.forward: 2 * f(x)) or p
    ),
    "own __call__": lambda: _with_part(fused_cbam.nn.CBAM(16, 4), "SpatialGate.spatial", lambda p: _rebased(p, _Called)),
    "function in BasicConv.relu": lambda: _with_part(
        fused_cbam.nn.CBAM(16, 4), "SpatialGate.spatial", lambda p: object.__setattr__(p, "relu", torch.tanh) or p
    ),
    "Flatten look-alike": lambda: _with_part(fused_cbam.nn.CBAM(16, 4), "ChannelGate.mlp.0", lambda p: _renamed(p, _Scaled)),
    "half subclass": lambda: _with_part(fused_cbam.nn.CbamModule(16, rd_channels=4), "channel", lambda p: _rebased(p, _HalfGate)),
}


@pytest.mark.parametrize("case", SUBCLASSED)
def test_parts_with_a_forward_of_their_own_leave_the_inference_operator(case):
    """The operator reads the parts' weights and calls none of their forwards: a part or a
    container whose forward is not the one the operator assumes (a subclass, a look-alike of
    timm's class, mmcv's ConvModule in another order) takes the three operators instead of giving
    a silently different result."""
    skip_unless_available("cpu")
    torch.manual_seed(0)
    block = SUBCLASSED[case]().eval()
    block.backend = "cpu"
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad(), OperatorLog() as log:
        out = block(x)
    assert_took_the_three_operators(log.names)
    assert_close(out, block(x), 1e-6, "no_grad output against the grad-enabled forward")


def test_global_forward_hooks_leave_the_inference_operator():
    """A hook registered for every module runs on the parts in the three-operator path."""
    skip_unless_available("cpu")
    block = fused_cbam.nn.CBAM(16, 4, backend="cpu").eval()
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: 2 * out if isinstance(module, nn.Linear) else None
    )
    try:
        x = torch.randn(2, 16, 5, 6)
        with torch.no_grad(), OperatorLog() as log:
            out = block(x)
        assert_took_the_three_operators(log.names)
        assert_close(out, block(x), 1e-6, "no_grad output against the grad-enabled forward")
    finally:
        handle.remove()


def test_parameters_in_another_dtype_leave_the_inference_operator():
    """The operator would cast them; the parts' own forward refuses, as the original's does."""
    skip_unless_available("cpu")
    block = fused_cbam.nn.CBAM(16, 4, backend="cpu").eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        block(torch.randn(2, 16, 5, 6, dtype=torch.bfloat16))
