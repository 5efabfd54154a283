"""python -m fused_cbam.bench: correctness gate, then speed, memory and bandwidth of the CBAM
block and of each operator, for every provider available on the device, recorded and plotted."""

import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

import fused_cbam

from fused_cbam.bench import providers as prov
from fused_cbam.bench import record, report, timing

GATE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
L2_BYTES = 60 * 2**20  # enough rotating inputs to leave the largest Hopper L2 cold


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m fused_cbam.bench", description=__doc__)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=list(prov.DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--shapes", help="comma-separated CxHxW (default: ResNet-50's CBAM blocks and a YOLO neck)")
    p.add_argument("--batch", type=int, help="default: 64 on GPU, 8 on CPU")
    p.add_argument("--backends", help="comma-separated providers to run (default: all available)")
    p.add_argument("--formats", default="channels_last,nchw", help="channels_last and/or nchw, comma-separated")
    p.add_argument("--quick", action="store_true", help="two shapes, shorter timing, no per-operator table, no max-autotune")
    p.add_argument("--out", default="benchmarks/results", help="folder of the record and the plot")
    args = p.parse_args(argv)
    args.device = _device(p, args.device)
    gpu = args.device.type == "cuda"
    args.dtype = prov.DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    default_shapes = prov.RESNET50_SHAPES[1:3] if args.quick else prov.RESNET50_SHAPES + prov.YOLO_NECK_SHAPES
    args.shapes = [_shape(p, s) for s in (args.shapes.split(",") if args.shapes else default_shapes)]
    args.batch = (64 if gpu else 8) if args.batch is None else args.batch
    if args.batch < 1:
        p.error(f"--batch: expected a positive batch size, got {args.batch}")
    args.formats = args.formats.split(",")
    if set(args.formats) - set(prov.FORMATS):
        p.error(f"--formats: expected channels_last and/or nchw, got {','.join(args.formats)}")
    args.backends = args.backends.split(",") if args.backends else None
    return args


def _device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """The benchmarked device: the CPU or a CUDA GPU that is present."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda (cuda:N), got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {text!r} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device: {text!r} asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    return device


def _shape(parser: argparse.ArgumentParser, text: str) -> tuple[int, int, int]:
    """C, H, W of a ``CxHxW`` shape; the reference module's MLP divides C by 16, so C >= 16."""
    try:
        c, h, w = (int(v) for v in text.split("x"))
    except ValueError:
        parser.error(f"--shapes: expected CxHxW, e.g. 512x28x28, got {text!r}")
    if c < 16 or h < 1 or w < 1:
        parser.error(f"--shapes: expected C >= 16 (the MLP's reduction ratio) and H, W >= 1, got {text!r}")
    return c, h, w


class Runner:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.gpu = self.device.type == "cuda"
        self.min_run_time = 0.2 if args.quick else 1.0  # CPU: seconds of samples
        self.reps = 20 if args.quick else 100  # GPU: timed calls

    def time(self, fn, x_bytes=0):
        """fn(i) runs one call on rotating input i."""
        if self.gpu:
            return timing.time_cuda(fn, self.buffers(x_bytes), self.reps)
        return timing.time_cpu(fn, self.min_run_time)

    def buffers(self, x_bytes):
        return 1 if not self.gpu or x_bytes == 0 else max(2, math.ceil(2 * L2_BYTES / x_bytes) + 1)

    def device_detail(self, fn, x_bytes):
        """On a GPU: the per-call time of CUDA-graph replays (no launch costs), and the device
        activities per call with their summed duration. Nothing on a CPU. A profiler failure is
        recorded, not raised: the timings around it stay usable."""
        if not self.gpu:
            return {}
        graph = timing.time_cuda_graph(fn, self.buffers(x_bytes), self.reps)
        if isinstance(graph, dict):
            detail = {"graph_ms": graph["median_ms"]} | {k: v for k, v in graph.items() if k.startswith("graph_")}
        else:
            detail = {"graph_error": graph}
        try:
            return detail | timing.cuda_kernels(lambda: fn(0))
        except Exception as e:  # noqa: BLE001 - the profiler's failures vary by version
            return detail | {"profile_error": f"{type(e).__name__}: {e}"}


def _max_error(actual, expected):
    scale = max(1.0, expected.abs().max().item())
    return ((actual.float() - expected.float()).abs().max().item()) / scale


def correctness_gate(module, ref, x, grad):
    """Relative max errors against the reference of what the benchmark times: the eval forward
    under no_grad (the one-operator inference path, where the backend has it), and the training
    forward's output and input gradient."""
    module.eval(), ref.eval()
    with torch.no_grad():
        errors = {"forward": _max_error(module(x), ref(x))}
    module.train(), ref.train()
    xa, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out, expected = module(xa), ref(xr)
    errors["train_forward"] = _max_error(out, expected)
    out.backward(grad), expected.backward(grad)
    errors["grad"] = _max_error(xa.grad, xr.grad)
    return errors


def _refused_modes(errors: dict, dtype: torch.dtype) -> dict:
    """{mode: its errors} for each timed mode whose path disagrees with the reference: the
    forward (eval, no_grad) and the training step apart, so that one broken path does not hide
    the other's timing."""
    tolerance = GATE_TOLERANCE[dtype]
    paths = {"forward": ("forward",), "forward+backward": ("train_forward", "grad")}
    return {
        mode: {k: errors[k] for k in keys}
        for mode, keys in paths.items()
        if any(errors[k] > tolerance for k in keys)
    }


def bench_block(runner, providers, shape, fmt, env):
    args, device = runner.args, runner.device
    memory_format = prov.FORMATS[fmt]
    c, h, w = shape
    ref = prov.reference_module(c, device, args.dtype)
    x = torch.randn(args.batch, c, h, w, device=device, dtype=args.dtype).to(memory_format=memory_format)
    grad = torch.randn_like(x)
    x_bytes = x.numel() * x.element_size()
    xs = [x.clone() for _ in range(runner.buffers(x_bytes))]
    x_grads = [t.clone().requires_grad_() for t in xs]
    rows = []
    for provider in providers:
        module = provider.make(ref)
        base = dict(env, dtype=str(args.dtype).removeprefix("torch."), format=fmt, batch=args.batch,
                    shape=f"{c}x{h}x{w}", provider=provider.name, kind=provider.kind, target="cbam")
        refused = _refused_modes(correctness_gate(module, ref, x, grad), args.dtype) if provider.kind == "fused" else {}
        if refused:
            tqdm.write(f"REFUSED {provider.name} at {base['shape']} {fmt}: {refused}")
            rows.append(dict(base, mode="refused", errors=refused))
        if "forward" not in refused:
            module.eval()
            with torch.no_grad():
                fwd = runner.time(lambda i: module(xs[i]), x_bytes)
                fwd |= runner.device_detail(lambda i: module(xs[i]), x_bytes)
            rows.append(dict(base, mode="forward", **fwd))
        if provider.forward_only or "forward+backward" in refused:
            continue
        module.train()

        def step(i):
            # From gradients set to None, as an optimizer's zero_grad leaves them (and as PyTorch's
            # whole-network CUDA-graph capture wants them): nothing accumulated into last step's,
            # x's gradient handed over as an activation's would be, not added (one |x| kernel).
            module.zero_grad(set_to_none=True)
            x_grads[i].grad = None
            module(x_grads[i]).backward(grad)

        fwd_bwd = runner.time(step, x_bytes) | runner.device_detail(step, x_bytes)
        saved = timing.saved_bytes(lambda: module(x_grads[0]), module)
        peak = timing.peak_bytes(lambda: step(0), device, compiled=provider.name.startswith("compile"))
        rows.append(dict(base, mode="forward+backward", **fwd_bwd, saved_bytes=saved, saved_over_x=saved / x_bytes, peak_bytes=peak))
    return rows


def bench_operators(runner, shape, fmt, env, bandwidth, backends):
    args, device = runner.args, runner.device
    memory_format = prov.FORMATS[fmt]
    c, h, w = shape
    x = torch.randn(args.batch, c, h, w, device=device, dtype=args.dtype).to(memory_format=memory_format)
    g = torch.rand(args.batch, c, device=device, dtype=args.dtype)
    s = torch.rand(args.batch, 1, h, w, device=device, dtype=args.dtype)
    x_bytes = x.numel() * x.element_size()
    xs = [x.clone() for _ in range(runner.buffers(x_bytes))]
    rows = []
    for backend in backends:
        for op, fn in prov.operator_calls(backend).items():
            with torch.no_grad():
                t = runner.time(lambda i: fn(xs[i], g, s), x_bytes)
                t |= runner.device_detail(lambda i: fn(xs[i], g, s), x_bytes)
            moved = prov.operator_bytes(op, x)
            achieved = moved / (t["median_ms"] / 1e3)
            if "graph_ms" in t:  # the kernels' own bandwidth, without launch costs
                t["graph_bandwidth_fraction"] = moved / (t["graph_ms"] / 1e3) / bandwidth
            rows.append(dict(env, dtype=str(args.dtype).removeprefix("torch."), format=fmt, batch=args.batch,
                             shape=f"{c}x{h}x{w}", provider=backend, target=op, mode="forward", **t,
                             bytes=moved, bandwidth=achieved, bandwidth_fraction=achieved / bandwidth))
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    env = record.environment(args.device, args.quick)
    runner = Runner(args)
    providers = prov.providers(args.device, args.backends, args.quick)
    bandwidth = timing.copy_bandwidth(args.device, lambda fn: runner.time(fn))
    env["copy_bandwidth"] = bandwidth
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | commit {env['commit']}")
    print(f"dtype {args.dtype} | batch {args.batch} | copy bandwidth {bandwidth / 1e9:.1f} GB/s | providers {[p.name for p in providers]}")
    op_backends = [p.name for p in providers if p.kind == "fused" and p.name in fused_cbam.available_backends()]
    op_backends = (["reference"] if any(p.name == "reference" for p in providers) else []) + op_backends
    jobs = [(shape, fmt) for fmt in args.formats for shape in args.shapes]
    out_dir = Path(args.out)
    path = record.record_path(out_dir, env)
    rows = []
    for shape, fmt in tqdm(jobs, desc="benchmark", unit="shape"):
        job_rows = bench_block(runner, providers, shape, fmt, env)
        if not args.quick:
            job_rows += bench_operators(runner, shape, fmt, env, bandwidth, op_backends)
        record.append(path, job_rows)  # each shape as it finishes: an interrupted run keeps them
        rows += job_rows
    print(report.block_table(rows))
    for title, summary in report.summaries(rows):  # where the run covers the ResNet-50 shapes
        print(f"{title}:\n{summary}")
    if not args.quick:
        print(report.operator_table(rows))
    plot = report.plot(rows, out_dir / path.with_suffix(".png").name)
    print(f"record: {path}\nplot: {plot}")


if __name__ == "__main__":
    main()
