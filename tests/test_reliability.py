"""Reliability of the fused modules and operators in long training runs: determinism, autocast,
export, DistributedDataParallel, tensors of more than 2^31 elements, concurrent threads, and
the refusal of double backward."""

import copy
import math
import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fused_cbam
from fused_cbam import reference
from helpers import (
    COMPILED_BACKENDS,
    OPERATOR_BACKENDS,
    TOLERANCE,
    OperatorLog,
    assert_close,
    backend_available,
    make_input,
    mean_max_argmax,
    needs_cuda,
    operator_namespace,
    skip_unless_available,
)


class Net(nn.Module):
    """A small model around a fused CBAM block: conv stem with BN, CBAM, global average pool, linear."""

    def __init__(self, backend: str, channels: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.cbam = fused_cbam.nn.CBAM(channels, reduction_ratio=4, backend=backend)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        return self.head(self.cbam(self.stem(x)).mean((2, 3)))


def _cbam(channels: int, backend: str, device: str) -> fused_cbam.nn.CBAM:
    """A fused CBAM with non-trivial weights (BN affine parameters included), in train mode."""
    module = fused_cbam.nn.CBAM(channels, backend=backend).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and every parameter gradient of a fresh copy of ``module``."""
    module = copy.deepcopy(module)  # train-mode BN updates its running statistics
    x = x.detach().clone().requires_grad_()
    out = module(x)
    return [out, *torch.autograd.grad(out, [x, *module.parameters()], grad_out)]


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.fixture
def deterministic_algorithms(monkeypatch):
    """``torch.use_deterministic_algorithms(True)`` for one test, then the previous setting."""
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (the CBAM MLP)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


# (2, 300, 45, 47): more channels (300) than one CPU channel block (256) and more pixels (2115)
# than one pixel block (1024), so every reduction runs over several blocks.
DETERMINISM_SHAPES = [pytest.param((2, 32, 9, 11), id="small"), pytest.param((2, 300, 45, 47), id="multi-block")]


@pytest.mark.usefixtures("deterministic_algorithms")
@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("shape", DETERMINISM_SHAPES)
def test_gradients_are_bitwise_identical_run_after_run(backend, device, shape):
    module = _cbam(shape[1], backend, device)
    x = make_input(shape, torch.float32, device)
    grad_out = torch.randn_like(x)
    first = _forward_backward(module, x, grad_out)
    for _ in range(2):
        again = _forward_backward(module, x, grad_out)
        names = ["output", "grad of x", *(f"grad of {n}" for n, _ in module.named_parameters())]
        for name, a, b in zip(names, first, again):
            assert torch.equal(a, b), f"{name} differs between two identical runs"


def _operators_forward_backward(x, scale, spatial_gate, backend):
    """Every output and every gradient of the three operators, for fixed inputs."""
    x, scale, spatial_gate = (t.detach().clone().requires_grad_() for t in (x, scale, spatial_gate))
    outs = [
        *fused_cbam.channel_pool(x, backend=backend),
        *fused_cbam.spatial_pool(x, scale, backend=backend),
        fused_cbam.gate_apply(x, scale, spatial_gate, backend=backend),
    ]
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    return outs + list(torch.autograd.grad(outs, [x, scale, spatial_gate], grads_out))


@pytest.mark.usefixtures("deterministic_algorithms")
def test_cpu_operators_are_bitwise_identical_across_thread_counts():
    """The CPU kernels split work among threads but reduce every output in a fixed order.

    (The module as a whole is not compared across thread counts: PyTorch's own CPU Conv2d weight
    gradient, in the spatial gate, changes with the thread count.)"""
    if not backend_available("cpu"):
        pytest.skip("the compiled CPU backend is unavailable")
    n, c, h, w = 2, 300, 45, 47  # several channel and pixel blocks
    x = make_input((n, c, h, w), torch.float32, "cpu")
    scale, spatial_gate = torch.rand(n, c) + 0.5, torch.rand(n, 1, h, w) + 0.5
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results[count] = _operators_forward_backward(x, scale, spatial_gate, "cpu")
    finally:
        torch.set_num_threads(threads)
    for count in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[count])):
            assert torch.equal(a, b), f"tensor {i} differs between 1 and {count} threads"


# ---------------------------------------------------------------------------------------------
# Autocast


AUTOCAST_CASES = [
    pytest.param("cpu", "cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", "cuda", torch.float16, id="cuda-float16", marks=needs_cuda),
    pytest.param("cuda", "cuda", torch.bfloat16, id="cuda-bfloat16", marks=needs_cuda),
]


@pytest.mark.parametrize("backend,device,autocast_dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_output_dtype_is_the_input_dtype_and_matches_reference(backend, device, autocast_dtype, train):
    """Under autocast the fused operators run in the dtype of x (float32 accumulation), the
    MLP and the spatial conv in the autocast dtype, and the block returns x's dtype: the same
    rule as the reference backend under the same autocast."""
    fused = _cbam(64, backend, device).train(train)
    ref = copy.deepcopy(fused)
    ref.backend = "reference"
    x = make_input((2, 64, 14, 14), torch.float32, device)
    grad_out = torch.randn_like(x)
    with torch.autocast(device, dtype=autocast_dtype):
        out, *grads = _forward_backward(fused, x, grad_out)
        ref_out, *ref_grads = _forward_backward(ref, x, grad_out)
    assert out.dtype == x.dtype == ref_out.dtype
    atol = TOLERANCE[autocast_dtype]
    assert_close(out, ref_out, atol, "output")
    names = ["x", *(n for n, _ in fused.named_parameters())]
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == rg.dtype
        assert_close(g, rg, 4 * atol, f"grad of {name}")


@pytest.mark.parametrize("backend,device,autocast_dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("x_dtype", ["float32", "autocast"])
def test_autocast_inference_follows_the_same_rule(backend, device, autocast_dtype, x_dtype):
    """Eval mode without gradients. With x in the autocast dtype (mixed precision: the parameters
    stay in float32), the one-operator inference path, which reads the parameters as they are;
    with x in float32, the three operators, so that the MLP and the conv follow autocast as in
    training (the parts' gate in the autocast dtype, cast to x's)."""
    fused = _cbam(64, backend, device).eval()
    ref = copy.deepcopy(fused)
    ref.backend = "reference"
    x = make_input((2, 64, 14, 14), torch.float32 if x_dtype == "float32" else autocast_dtype, device)
    with torch.no_grad(), torch.autocast(device, dtype=autocast_dtype):
        with OperatorLog() as log:
            out = fused(x)
        expected = ref(x)
    one_operator = x_dtype == "autocast"
    assert ("fused_cbam.cbam_inference" in log.names) == one_operator, log.names
    assert ("fused_cbam.gate_apply" in log.names) != one_operator, log.names
    assert out.dtype == x.dtype == expected.dtype
    # The reference rounds its MLP's and conv's outputs to the autocast dtype; cbam_inference
    # (x in the autocast dtype) keeps them in float32.
    assert_close(out, expected, TOLERANCE[autocast_dtype], "output", rounded_once=False)


@pytest.mark.parametrize("backend,device,autocast_dtype", AUTOCAST_CASES)
@pytest.mark.parametrize(
    "layout", [fused_cbam.nn.CBAM, fused_cbam.nn.CbamModule, fused_cbam.nn.LightCbamModule, fused_cbam.nn.MMYoloCBAM],
    ids=lambda cls: cls.__name__,
)  # fmt: skip
def test_a_16_bit_x_in_another_dtype_than_autocasts(layout, backend, device, autocast_dtype):
    """float16 x under a bfloat16 autocast (or the other way round): autocast's promotion for
    torch.cat refuses a 16-bit dtype other than its own, and the blocks had failed in their cat
    of the pooled vectors (the reference backend in its cat of the maps too). Same rule as
    above: the MLP and the conv in the autocast dtype, the block in x's, as the reference backend
    computes it; training and eval mode."""
    x_dtype = torch.float16 if autocast_dtype == torch.bfloat16 else torch.bfloat16
    fused = layout(16, backend=backend).to(device)
    ref = copy.deepcopy(fused)
    ref.backend = "reference"
    x = make_input((2, 16, 5, 6), x_dtype, device)
    grad_out = torch.randn_like(x)
    with torch.autocast(device, dtype=autocast_dtype):
        out, *grads = _forward_backward(fused, x, grad_out)
        ref_out, *ref_grads = _forward_backward(ref, x, grad_out)
        with torch.no_grad():
            eval_out, eval_ref = fused.eval()(x), ref.eval()(x)
    assert out.dtype == eval_out.dtype == x_dtype
    atol = TOLERANCE[torch.bfloat16]
    assert_close(out, ref_out, atol, "output", rounded_once=False)
    assert_close(eval_out, eval_ref, atol, "eval output", rounded_once=False)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, 4 * atol, f"gradient {i}", rounded_once=False)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_inference_operator_ignores_autocast(backend, device):
    """Called directly under autocast, cbam_inference computes in x's dtype as without it: no
    operator calls an autocast-eligible ATen operator (the MLP is their own kernel). The Triton
    and CUDA ones, whose MLP was F.linear and at::addmm, failed before autocast was turned off
    inside them."""
    skip_unless_available(backend)
    module = _cbam(16, backend, device).eval()
    operator = operator_namespace(backend).cbam_inference
    x = make_input((2, 16, 5, 6), torch.float32, device)
    expected = operator(x, *module._plain())
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device, dtype=dtype):
            assert torch.equal(operator(x, *module._plain()), expected), dtype


# ---------------------------------------------------------------------------------------------
# Export


def _namespaces(exported) -> set[str]:
    """The operator namespaces (aten, fused_cbam, ...) called by an exported program."""
    return {
        getattr(node.target, "namespace", "python")
        for node in exported.graph_module.graph.nodes
        if node.op == "call_function"
    }


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_torch_export_runs_the_fused_operators_with_a_dynamic_batch(backend, device):
    skip_unless_available(backend)
    model = Net(backend).to(device).eval()
    x = make_input((2, 3, 12, 12), torch.float32, device)
    # On CUDA, nn.BatchNorm2d (cuDNN's, in the stem and in the spatial gate) guards the batch to
    # at most 65535 whatever the CBAM backend: an unbounded Dim fails there, the reference too.
    batch = torch.export.Dim("batch", max=65535)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert operator_namespace(backend).name in _namespaces(exported)
    for batch in (x, make_input((3, 3, 12, 12), torch.float32, device)):
        got, expected = exported.module()(batch), model(batch)
        assert torch.equal(got, expected), f"batch {batch.shape[0]}: differs by {(got - expected).abs().max().item():.3g}"


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_of_an_input_that_requires_grad_records_the_registered_operators(strict):
    """The training path's carriers stay out of exported graphs."""
    skip_unless_available("cpu")
    model = Net("cpu").eval()
    x = make_input((2, 3, 12, 12), torch.float32, "cpu", requires_grad=True)
    exported = torch.export.export(model, (x,), strict=strict)
    targets = {str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"}
    assert "fused_cbam.channel_pool.default" in targets and "aten.empty_strided.default" not in targets, targets
    assert torch.equal(exported.module()(x), model(x))


def test_export_for_cuda_traces_with_fake_tensors_without_a_gpu(monkeypatch):
    """The export of a CUDA model, traced here with fake CUDA tensors (no kernel runs): the CUDA
    trace goes through CUDA-only meta functions (cuDNN's BatchNorm) that a CPU export skips."""
    if not fused_cbam._library.has_kernels("CUDA"):
        pytest.skip("fused_cbam was built without its CUDA kernels")
    monkeypatch.setitem(fused_cbam.backends._UNAVAILABLE, "cuda", None)  # no GPU needed to trace
    with torch._subclasses.fake_tensor.FakeTensorMode(), torch.device("cuda"):
        model = Net("cuda").eval()
        x = torch.randn(2, 3, 12, 12)
        batch = torch.export.Dim("batch", max=65535)
        exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert "fused_cbam" in _namespaces(exported)


def test_converted_to_reference_exports_plain_pytorch():
    """``convert(model, backend="reference")`` leaves no custom operator for exporters."""
    if not hasattr(fused_cbam, "convert"):
        pytest.skip("fused_cbam.convert is not available yet")
    model = Net("auto").eval()
    x = make_input((2, 3, 12, 12), torch.float32, "cpu")
    expected = model(x)
    converted = fused_cbam.convert(copy.deepcopy(model), backend="reference")
    exported = torch.export.export(converted, (x,))
    assert _namespaces(exported) <= {"aten", "python"}, _namespaces(exported)
    assert_close(exported.module()(x), expected, 1e-5, "exported reference model")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")  # TorchScript's
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_of_the_converted_model_runs_in_onnxruntime(tmp_path, dynamo):
    pytest.importorskip("onnxscript", reason="the ONNX exporter (onnx, onnxscript) is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    model = Net("auto").eval()
    model.load_state_dict(_cbam_net_state())
    x = make_input((2, 3, 12, 12), torch.float32, "cpu")
    expected = model(x)
    converted = fused_cbam.convert(copy.deepcopy(model), backend="reference")
    path = str(tmp_path / "net.onnx")
    torch.onnx.export(converted, (x,), path, dynamo=dynamo)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_close(torch.from_numpy(got), expected, 1e-5, "ONNX Runtime output")


# ---------------------------------------------------------------------------------------------
# Distributed


WORLD_SIZE = 2

# How BN behaves in each DDP mode, and the single-process run whose gradients DDP must give:
# - "frozen_bn": BN in eval mode (as in fine-tuning); the shards' mean loss is the batch's loss.
# - "local_bn": BN in train mode, each process normalising its own shard; DDP averages the
#   shards' gradients.
# - "sync_bn": SyncBatchNorm (GPU only in PyTorch; both processes share the one GPU through
#   gloo): the statistics of the whole batch, as BN computes them in one process.
DDP_CASES = [
    pytest.param("cpu", ("frozen_bn", "local_bn"), id="cpu"),
    pytest.param("cuda", ("sync_bn",), id="cuda-sync-bn", marks=needs_cuda),
]


def _ddp_model(state: dict, device: str, mode: str, distributed: bool) -> nn.Module:
    """The model of one DDP mode, in train mode; SyncBatchNorm in the distributed "sync_bn" runs."""
    model = Net(device).to(device)
    model.load_state_dict(state)
    model.train()
    if mode == "sync_bn" and distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if mode == "frozen_bn":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def _ddp_worker(rank, init_file, state, x, target, device, modes, out_dir):
    """One process of the DDP test (top level: the spawn start method pickles it by name)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        for mode in modes:
            model = _ddp_model(state, device, mode, distributed=True)
            device_ids = [0] if device == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
            shard = x.chunk(WORLD_SIZE)[rank].to(device)
            F.cross_entropy(ddp(shard), target.chunk(WORLD_SIZE)[rank].to(device)).backward()
            if rank == 0:
                grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
                torch.save(grads, os.path.join(out_dir, f"{mode}.pt"))
            del ddp
        dist.barrier()  # both ranks are done with gloo
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without gloo's teardown: it aborted a worker ("terminate called without an active
    # exception", SIGABRT) in about 1 run in 15 here, after the results were saved.
    os._exit(0)


def _single_process_grads(state, device, mode, x, target):
    """What DDP must give, computed in one process."""
    model = _ddp_model(state, device, mode, distributed=False)
    shards = WORLD_SIZE if mode == "local_bn" else 1
    for xs, ts in zip(x.chunk(shards), target.chunk(shards)):
        (F.cross_entropy(model(xs.to(device)), ts.to(device)) / shards).backward()
    return {n: p.grad.cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("device,modes", DDP_CASES)
def test_ddp_two_processes_match_one_process(tmp_path, device, modes):
    if not backend_available(device) or not dist.is_available() or not dist.is_gloo_available():
        pytest.skip(f"needs the compiled {device} backend and torch.distributed with gloo")
    state = _cbam_net_state()
    x = make_input((4, 3, 10, 10), torch.float32, "cpu")
    target = torch.randint(0, 5, (4,))
    args = (str(tmp_path / "init"), state, x, target, device, modes, str(tmp_path))
    torch.multiprocessing.spawn(_ddp_worker, args=args, nprocs=WORLD_SIZE)
    for mode in modes:
        ddp_grads = torch.load(tmp_path / f"{mode}.pt")
        expected = _single_process_grads(state, device, mode, x, target)
        assert ddp_grads.keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(ddp_grads[name], g, rtol=1e-5, atol=1e-5, msg=f"{mode}: grad of {name}")


def _cbam_net_state() -> dict:
    """A state dict of ``Net`` with non-trivial BN parameters and statistics."""
    model = Net("cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sync_batchnorm_conversion_keeps_the_fused_block(train):
    """The spatial gate's BN becomes a SyncBatchNorm; without a process group it computes what
    the BN did, and the state_dict keys are the same."""
    model = Net("auto")
    model.load_state_dict(_cbam_net_state())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced.cbam, fused_cbam.nn.CBAM)
    assert isinstance(synced.cbam.SpatialGate.spatial.bn, nn.SyncBatchNorm)
    assert list(synced.state_dict()) == list(model.state_dict())
    model.train(train), synced.train(train)
    x = make_input((4, 3, 10, 10), torch.float32, "cpu")
    grad_out = torch.randn(4, 5)
    results = zip(_forward_backward(synced, x, grad_out), _forward_backward(model, x, grad_out))
    names = ["output", "grad of x", *(f"grad of {n}" for n, _ in model.named_parameters())]
    for name, (a, b) in zip(names, results, strict=True):
        assert_close(a, b, 1e-6, name)


# ---------------------------------------------------------------------------------------------
# Tensors of more than 2^31 elements


def _mem_available() -> int:
    """Bytes of memory available (``MemAvailable`` of /proc/meminfo), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# N * C * H * W = 2 * 23171 * 215 * 216 = 2_152_122_480 > 2^31; the pooled maps stay small.
LARGE_SHAPE = (2, 23171, 215, 216)
LARGE_BYTES = math.prod(LARGE_SHAPE) * 2  # bfloat16: 4.3 GB
# x and one other full-size tensor (an output or a gradient) at a time, plus the checks: the
# test peaks at 9.6 GB of resident memory on the CPU.
LARGE_NEEDS = 2 * LARGE_BYTES + 2 * 2**30
# Sample 1 starts at element 23171 * 46440 = 1_076_061_240; element 2^31 lies in its channel
# 23071, so sample 1's channels from 23000 on hold elements on both sides of 2^31 and beyond.
TAIL_CHANNELS = slice(23000, None)
ROWS = slice(213, None)  # the last two rows of sample 1: every channel, the late ones beyond 2^31


def _fill_large(x: torch.Tensor) -> None:
    """Random values repeating with a prime period: an element read from a wrong offset (an
    index that wrapped by a multiple of 2^32) has, in all likelihood, a different value."""
    period = 9_999_991
    block = torch.randn(period, generator=torch.Generator().manual_seed(0)).to(x.dtype).to(x.device)
    flat = x.view(-1)
    for start in range(0, flat.numel(), period):
        chunk = flat[start : start + period]
        chunk.copy_(block[: chunk.numel()])


def _free_memory(device: str) -> int:
    return _mem_available() if device == "cpu" else torch.cuda.mem_get_info()[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,device",
    # Triton on a GPU only (gpu_check.sh): its interpreter would take hours at this size.
    COMPILED_BACKENDS + [pytest.param("triton", "cuda", id="triton", marks=needs_cuda)],
)
def test_more_than_2_31_elements(backend, device):
    """Every operator, forward and backward, on a bfloat16 x of 2.15e9 elements, checked against
    the reference on the parts of x that lie beyond element 2^31."""
    if not backend_available(backend):
        pytest.skip(f"the {backend} backend is unavailable")
    if _free_memory(device) < LARGE_NEEDS:
        pytest.skip(
            f"needs {LARGE_NEEDS / 2**30:.1f} GiB of free {device} memory, {_free_memory(device) / 2**30:.1f} GiB free"
        )
    n, c, h, w = LARGE_SHAPE
    ops = operator_namespace(backend)
    atol = TOLERANCE[torch.bfloat16]
    x = torch.empty(LARGE_SHAPE, dtype=torch.bfloat16, device=device)
    assert x.numel() > 2**31
    _fill_large(x)
    gen = torch.Generator().manual_seed(1)

    def rand(*shape, offset=0.0, normal=False):
        t = torch.randn(shape, generator=gen) if normal else torch.rand(shape, generator=gen) + offset
        return t.to(x.dtype).to(device)

    def ref_grads(fn, inputs, grads_out):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*inputs), inputs, grads_out)

    scale, spatial_gate = rand(n, c, offset=0.5), rand(n, 1, h, w, offset=0.5)
    x_tail, x_rows = x[1:, TAIL_CHANNELS], x[1:, :, ROWS]  # views: no copy

    # channel_pool: per (n, c) plane
    avg, mx = fused_cbam.channel_pool(x, backend=backend)
    ref_avg, ref_max = reference.channel_pool(x_tail)
    assert_close(avg[1:, TAIL_CHANNELS], ref_avg, atol, "channel_pool mean")
    torch.testing.assert_close(mx[1:, TAIL_CHANNELS], ref_max, rtol=0, atol=0)
    _, _, argmax = ops.channel_pool(x)
    grad_avg, grad_cmax = rand(n, c, normal=True), rand(n, c, normal=True)
    grad_x = ops.channel_pool_backward(grad_avg, grad_cmax, argmax, x)
    (ref_grad_x,) = ref_grads(reference.channel_pool, [x_tail], [grad_avg[1:, TAIL_CHANNELS], grad_cmax[1:, TAIL_CHANNELS]])
    assert_close(grad_x[1:, TAIL_CHANNELS], ref_grad_x, atol, "channel_pool grad of x")
    del grad_x, ref_grad_x

    # spatial_pool: per pixel, over all channels (the late ones beyond 2^31)
    mean, mx = fused_cbam.spatial_pool(x, scale, backend=backend)
    ref_mean, ref_max = reference.spatial_pool(x_rows, scale[1:])
    assert_close(mean[1:, :, ROWS], ref_mean, atol, "spatial_pool mean")
    torch.testing.assert_close(mx[1:, :, ROWS], ref_max, rtol=0, atol=0)
    _, _, argmax = mean_max_argmax(ops.spatial_pool(x, scale))
    grad_mean, grad_max = rand(n, 1, h, w, normal=True), rand(n, 1, h, w, normal=True)
    grad_x, _ = ops.spatial_pool_backward(grad_mean, grad_max, argmax, x, scale)
    ref_grad_x, _ = ref_grads(reference.spatial_pool, [x_rows, scale[1:]], [grad_mean[1:, :, ROWS], grad_max[1:, :, ROWS]])
    assert_close(grad_x[1:, :, ROWS], ref_grad_x, atol, "spatial_pool grad of x")
    del grad_x, ref_grad_x

    # gate_apply: elementwise
    out = fused_cbam.gate_apply(x, scale, spatial_gate, backend=backend)
    ref_out = reference.gate_apply(x_tail, scale[1:, TAIL_CHANNELS], spatial_gate[1:])
    assert_close(out[1:, TAIL_CHANNELS], ref_out, atol, "gate_apply output")
    del out, ref_out
    # x itself as the upstream gradient, so that only one more full-size tensor is made
    grad_x, grad_scale, grad_spatial = ops.gate_apply_backward(x, x, scale, spatial_gate)
    ref_grad_x, ref_grad_scale, _ = ref_grads(
        reference.gate_apply, [x_tail, scale[1:, TAIL_CHANNELS], spatial_gate[1:]], [x_tail]
    )
    assert_close(grad_x[1:, TAIL_CHANNELS], ref_grad_x, atol, "gate_apply grad of x")
    assert_close(grad_scale[1:, TAIL_CHANNELS], ref_grad_scale, atol, "gate_apply grad of channel_gate")
    del grad_x, ref_grad_x
    _, _, ref_grad_spatial = ref_grads(reference.gate_apply, [x_rows, scale[1:], spatial_gate[1:, :, ROWS]], [x_rows])
    assert_close(grad_spatial[1:, :, ROWS], ref_grad_spatial, atol, "gate_apply grad of spatial_gate")

    # The modules' training backward, into one gradient of x (x itself standing in for the gate's):
    # the spatial pooling adds its max's share, the channel pooling its own and the spatial mean's.
    _, _, channel_argmax = ops.channel_pool(x)
    grad_x = x.clone()
    ops.spatial_pool_backward_add(grad_x, grad_mean, grad_max, argmax, x, scale, add_mean=False)
    ops.channel_pool_backward_add(grad_x, grad_avg, grad_cmax, channel_argmax, grad_mean, scale)
    (ref_channel,) = ref_grads(reference.channel_pool, [x_tail], [grad_avg[1:, TAIL_CHANNELS], grad_cmax[1:, TAIL_CHANNELS]])
    ref_spatial, _ = ref_grads(reference.spatial_pool, [x_rows, scale[1:]], [grad_mean[1:, :, ROWS], grad_max[1:, :, ROWS]])
    corner = (slice(1, None), TAIL_CHANNELS, ROWS)
    expected = x[corner].double() + ref_channel[:, :, ROWS].double() + ref_spatial[:, TAIL_CHANNELS].double()
    assert_close(grad_x[corner], expected, atol, "both poolings' shares added", rounded_once=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,device",
    COMPILED_BACKENDS + [pytest.param("triton", "cuda", id="triton", marks=needs_cuda)],
)
def test_the_inference_operator_beyond_2_31_elements(backend, device):
    """The whole block in one operator (its own kernels on the CPU, its chunks of samples) on the
    same bfloat16 x of 2.15e9 elements, in eval mode: the second sample, whose late channels lie
    beyond element 2^31, comes out as it does from a call on that sample alone (where every
    index is below 2^30), bit for bit."""
    if not backend_available(backend):
        pytest.skip(f"the {backend} backend is unavailable")
    if _free_memory(device) < LARGE_NEEDS:
        pytest.skip(
            f"needs {LARGE_NEEDS / 2**30:.1f} GiB of free {device} memory, {_free_memory(device) / 2**30:.1f} GiB free"
        )
    module = _cbam(LARGE_SHAPE[1], backend, device).eval().to(torch.bfloat16)
    with torch.no_grad():
        module.SpatialGate.spatial.bn.running_var.uniform_(0.5, 1.5)
    x = torch.empty(LARGE_SHAPE, dtype=torch.bfloat16, device=device)
    _fill_large(x)
    with torch.no_grad(), OperatorLog() as log:
        tail = module(x)[1:, TAIL_CHANNELS, ROWS].clone()  # (the whole output is freed here)
    assert f"{operator_namespace(backend).name}.cbam_inference" in log.names
    with torch.no_grad():
        alone = module(x[1:])[:, TAIL_CHANNELS, ROWS]
    assert torch.equal(tail, alone)


# ---------------------------------------------------------------------------------------------
# Threads


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # no_grad: the inference path on the CPU
def test_concurrent_forward_calls_from_threads_agree(backend, device, grad):
    module = _cbam(64, backend, device).eval()
    x = make_input((2, 64, 28, 28), torch.float32, device)
    with torch.set_grad_enabled(grad):  # grad mode is per thread: each worker sets its own
        expected = module(x)
    results, errors = [], []
    start = threading.Barrier(4)

    def worker():
        try:
            start.wait()
            with torch.set_grad_enabled(grad):
                for _ in range(5):
                    results.append(module(x))
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 20
    for out in results:
        assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# Forward-mode AD (the fused operators have no forward formulas)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_through_the_modules_gives_the_reference_tangent(backend, device, train):
    """torch.autograd.forward_ad through a module: x with a tangent runs the reference operators,
    so the output's tangent is the reference's (the eval path under no_grad included, where the
    inference operator used to return an output without a tangent)."""
    skip_unless_available(backend)
    module = _cbam(16, backend, device).train(train)
    ref = copy.deepcopy(module)
    ref.backend = "reference"
    x = make_input((2, 16, 5, 6), torch.float32, device)
    tangent = torch.randn_like(x)
    tangents = []
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        for m in (module, ref):
            out = m(torch.autograd.forward_ad.make_dual(x, tangent))
            tangents.append(torch.autograd.forward_ad.unpack_dual(out).tangent)
    assert tangents[0] is not None
    assert_close(tangents[0], tangents[1], 1e-5, "tangent")


@pytest.mark.parametrize("op", ["channel_pool", "spatial_pool", "gate_apply", "cbam_inference"])
def test_the_operators_refuse_forward_mode_ad(op):
    """Called directly with a tangent (forward_ad, torch.func.jvp), each compiled operator says it
    has no forward formula rather than return an output without a tangent, or a wrong one."""
    skip_unless_available("cpu")
    x = make_input((2, 4, 3, 5), torch.float32, "cpu")
    g, h = torch.rand(2, 4), torch.rand(2, 1, 3, 5)
    args = {
        "channel_pool": (), "spatial_pool": (g,), "gate_apply": (g, h),
        "cbam_inference": (torch.randn(2, 4), None, torch.randn(4, 2), None, "sum", torch.randn(1, 2, 3, 3),
                           None, None, None, None, None, 0.0, True),
    }[op]  # fmt: skip
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            getattr(torch.ops.fused_cbam, op)(dual, *args)
    # torch.func.jvp (the eval path returned a wrong tangent there)
    with pytest.raises(RuntimeError, match="cannot use C\\+\\+ torch::autograd::Function with functorch"):
        torch.func.jvp(lambda t: getattr(torch.ops.fused_cbam, op)(t, *args), (x,), (torch.randn_like(x),))


# ---------------------------------------------------------------------------------------------
# torch.func transforms (inside one, the block runs the reference operators)


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_per_sample_gradients_with_vmap_of_grad(backend, device, train):
    """Per-sample gradients as torch.func computes them (e.g. for DP-SGD) match autograd's
    through the fused operators, one sample at a time."""
    skip_unless_available(backend)
    module = _cbam(16, backend, device).train(train)
    if train:  # BatchNorm's running statistics are captured state that grad may not change
        torch.func.replace_all_batch_norm_modules_(module)
    params = {name: p.detach() for name, p in module.named_parameters()}
    x = make_input((3, 16, 5, 6), torch.float32, device)

    def loss(p, sample):
        return torch.func.functional_call(module, p, (sample[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        module.zero_grad()
        module(x[i : i + 1]).square().sum().backward()
        for name, p in module.named_parameters():
            assert_close(per_sample[name][i], p.grad, 1e-5, f"sample {i}: grad of {name}")


@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_vmap_of_the_eval_forward_and_grad_of_x(backend, device):
    """vmap of an eval forward (outside vmap it is the inference operator) and torch.func.grad of x
    give what the fused operators give."""
    skip_unless_available(backend)
    module = _cbam(16, backend, device).eval()
    x = make_input((3, 16, 5, 6), torch.float32, device)
    with torch.no_grad():  # outside vmap: the fused inference path
        expected = module(x)
    batched = torch.func.vmap(module)(x[:, None])[:, 0]
    assert_close(batched, expected, 1e-5, "vmap of the forward")
    x.requires_grad_()
    module(x).square().sum().backward()
    grad_x = torch.func.grad(lambda t: module(t).square().sum())(x.detach())
    assert_close(grad_x, x.grad, 1e-5, "torch.func.grad of x")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # inside torch.func.hessian
@pytest.mark.parametrize("backend,device", OPERATOR_BACKENDS)
def test_jacrev_jacfwd_and_hessian_match_autograd_on_the_reference(backend, device):
    skip_unless_available(backend)
    module = _cbam(16, backend, device).eval().double()
    plain = fused_cbam.convert(copy.deepcopy(module), backend="reference")
    x = make_input((1, 16, 2, 3), torch.float64, device)
    jacobian = torch.autograd.functional.jacobian(plain, x)
    assert_close(torch.func.jacrev(module)(x), jacobian, 1e-12, "jacrev")
    assert_close(torch.func.jacfwd(module)(x), jacobian, 1e-12, "jacfwd")
    hessian = torch.autograd.functional.hessian(lambda t: plain(t).square().sum(), x)
    assert_close(torch.func.hessian(lambda t: module(t).square().sum())(x), hessian, 1e-12, "hessian")


# ---------------------------------------------------------------------------------------------
# CUDA graphs


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_a_training_step_captured_in_a_cuda_graph_replays_on_new_data(backend, memory_format):
    """Launch-bound training (small batches, many blocks) is what CUDA graphs are for: a whole
    forward and backward is captured as PyTorch's whole-network example does (warm-up on a
    side stream, gradients None), and each replay on a new x gives eager's output and
    gradients. A host synchronisation inside the step would make the capture fail. (The warm-up
    also tunes Triton's kernels where tuning is on; gpu_check.sh runs the tests untuned.)"""
    skip_unless_available(backend)
    module = _cbam(32, backend, "cuda")
    eager = copy.deepcopy(module)
    static_x = make_input((4, 32, 7, 9), torch.float32, "cuda", memory_format, requires_grad=True)
    static_grad = torch.randn_like(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            module(static_x).backward(static_grad)
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = module(static_x)
        static_out.backward(static_grad)
    for _ in range(2):
        x = make_input(static_x.shape, torch.float32, "cuda", memory_format)
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        expected = _forward_backward(eager, x, static_grad)
        got = [static_out, static_x.grad, *(p.grad for p in module.parameters())]
        names = ["output", "grad of x", *(f"grad of {n}" for n, _ in module.named_parameters())]
        for name, a, b in zip(names, got, expected):
            assert_close(a, b, TOLERANCE[torch.float32], name)


# ---------------------------------------------------------------------------------------------
# Double backward


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
def test_double_backward_raises_a_clear_error(backend, device):
    module = _cbam(16, backend, device)
    x = make_input((2, 16, 5, 6), torch.float32, device, requires_grad=True)
    # Refused as soon as a backward would build a graph of its own (create_graph=True), rather
    # than returning first gradients whose second-order terms are silently missing.
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(module(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("backend,device", COMPILED_BACKENDS)
@pytest.mark.parametrize("op", ["channel_pool", "spatial_pool", "gate_apply"])
def test_every_operator_refuses_double_backward(backend, device, op):
    x = make_input((2, 5, 3, 4), torch.float32, device, requires_grad=True)
    gates = {"channel_pool": (), "spatial_pool": (torch.rand(2, 5, device=device),)}.get(
        op, (torch.rand(2, 5, device=device), torch.rand(2, 1, 3, 4, device=device))
    )
    out = getattr(fused_cbam, op)(x, *gates, backend=backend)
    loss = sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)))
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_double_backward_works_on_the_reference_backend():
    module = _cbam(16, "reference", "cpu").double().eval()
    x = make_input((1, 16, 3, 4), torch.float64, "cpu", requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    (grad2,) = torch.autograd.grad(grad.square().sum(), x)
    assert grad2.shape == x.shape and grad2.abs().sum() > 0
    assert torch.autograd.gradgradcheck(module, (x,))
