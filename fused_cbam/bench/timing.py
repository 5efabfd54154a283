"""Timing and memory measurements, one method per device, each returning plain numbers."""

import cProfile
import pstats
import statistics
import time
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _quantiles(samples: list[float]) -> dict[str, float]:
    """Median and the 20%/80% quantiles, in milliseconds."""
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median_ms": statistics.median(samples) * 1e3, "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3}


def time_cpu(fn: Callable[[int], object], min_run_time: float) -> dict[str, float]:
    """torch.utils.benchmark on the CPU (the input index is ignored). Each sample is the mean of
    a block of calls (``blocked_autorange`` sizes the blocks), so the 20%/80% quantiles are those
    of block means: narrower than the spread of single calls."""
    fn(0)  # warm-up (and compilation, for compiled providers)
    # torch.utils.benchmark times one thread unless told otherwise
    timer = benchmark.Timer("fn(0)", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return _quantiles(measurement.times)


def time_cuda(fn: Callable[[int], object], buffers: int, reps: int, warmup: int = 5) -> dict[str, float]:
    """CUDA events around each call; calls rotate among ``buffers`` input copies so that the
    inputs of one call are not in L2 from the call before."""
    for i in range(warmup):
        fn(i % buffers)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(i % buffers)
        ends[i].record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def time_cuda_graph(fn: Callable[[int], object], buffers: int, reps: int) -> dict[str, float | str] | str:
    """Replays of a CUDA graph holding one call per input copy, per call: the device's time
    without the host's launch costs (what CUDA graphs, or torch.compile's "reduce-overhead",
    give), the capture mode that took the calls, and what the default mode refused where the
    other took them. Returns the reason instead when the calls cannot be captured.

    The default mode ("global") fails a capture on a prohibited call from any thread, the
    autograd engine's own included; "thread_local" watches the capturing thread only. A call
    that only the default mode refuses is captured in the second, and its record says so."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream: autotuning, compilation
        for i in range(buffers):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    failures = []
    for mode in ("global", "thread_local"):
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, capture_error_mode=mode):
                for i in range(buffers):
                    fn(i)
        except Exception as e:  # e.g. a host synchronisation inside the calls
            # A capture that fails ends before torch.cuda.graph restores the stream it replaced:
            # later measurements would run on the capture stream.
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize()
            failures.append(f"{mode}: {capture_failure(e)}")
            continue
        per_replay = time_cuda(lambda _: graph.replay(), 1, reps)
        result = {k: v / buffers for k, v in per_replay.items()} | {"graph_capture_mode": mode}
        # What the default mode refused is kept: in thread_local mode a call from another thread
        # runs when captured instead of failing it, so the replays may leave some work out.
        return result | ({"graph_global_error": failures[0]} if failures else {})
    return "capture failed: " + "; ".join(failures)


def capture_failure(e: BaseException) -> str:
    """What stopped a capture. The call refused inside it raises first; torch.cuda.graph then
    ends the capture, which raises again ("operation failed due to a previous error during
    capture") with the first as its context: both are kept, the first first."""
    chain = [e]
    while len(chain) < 8:
        last = chain[-1]
        earlier = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if earlier is None:
            break
        chain.append(earlier)
    return " <- ".join(f"{type(err).__name__}: {_first_line(err)}" for err in reversed(chain))


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


# The host's calls that launch a kernel: the runtime's (cudaLaunchKernel, cudaLaunchKernelExC)
# and the driver's (cuLaunchKernel, cuLaunchKernelEx: Triton's launcher).
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel")


def cuda_kernels(fn: Callable[[], object], reps: int = 3) -> dict[str, float]:
    """Device activities (kernels, copies, fills) per call and their summed duration, and the
    host's time in kernel-launch calls, from the profiler: with the eager time and the graph
    time, it tells launch-bound calls from device-bound ones, and of a launch-bound call's host
    time what the driver's launches take (the rest is Python and the dispatcher)."""
    return activity_summary(profiled_events(fn, reps, cuda=True), reps)


def profiled_events(fn: Callable[[], object], reps: int, cuda: bool) -> list:
    """The profiler's events of ``reps`` calls of ``fn`` after one unprofiled call: the host's,
    and with ``cuda`` the device's."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(reps):
            fn()
        sync()
    return prof.events()


def _device_activities(events) -> list:
    """The device's activities (kernels, copies, fills). User ranges are left out, as PyTorch's
    own tables do: Inductor wraps each compiled call in one, which the profiler also lists on the
    device, spanning the call's kernels and its gaps."""
    return [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]


def activity_summary(events, reps: int) -> dict[str, float]:
    """Per call: device activities and their summed duration; host launch calls and theirs."""
    device_events = _device_activities(events)
    launches = [
        e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(_LAUNCH_CALLS)
    ]
    return {
        "kernels": len(device_events) / reps,
        "device_busy_ms": sum(e.time_range.elapsed_us() for e in device_events) / reps / 1e3,
        "launch_calls": len(launches) / reps,
        "launch_api_ms": sum(e.time_range.elapsed_us() for e in launches) / reps / 1e3,
    }


def activity_table(events, reps: int, device: bool) -> list[tuple[str, float, float]]:
    """(name, calls, µs) per call, the longest first: of each device activity (``device``), else
    of each host operator's self time (on a CPU the operators are the kernels)."""
    if device:
        timed = [(e.name, e.time_range.elapsed_us()) for e in _device_activities(events)]
    else:
        timed = [(e.name, e.self_cpu_time_total) for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    rows: dict[str, tuple[int, float]] = {}
    for name, us in timed:
        calls, total = rows.get(name, (0, 0.0))
        rows[name] = (calls + 1, total + us)
    return sorted(((name, calls / reps, us / reps) for name, (calls, us) in rows.items()), key=lambda r: -r[2])


def host_profile(fn: Callable[[], object], reps: int, cuda: bool) -> tuple[float, list[tuple[str, float, float]]]:
    """The host's side of ``reps`` calls of ``fn`` after one call: the wall time per call until
    the calls have returned, not profiled (on a GPU, the device's work may still be queued then:
    this is what the host pays to issue it), and per Python or builtin function its own time
    per call under cProfile, which slows every call it counts, as (name, calls, µs), the longest
    first. For a host-bound pass (its device waits on the host), it says which of the host's
    steps take the time."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    wall_us = (time.perf_counter() - start) / reps * 1e6
    sync()
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [fn() for _ in range(reps)])
    sync()
    rows = [(_function_name(*where), calls / reps, own * 1e6 / reps)
            for where, (_, calls, own, _, _) in pstats.Stats(profiler).stats.items()]  # fmt: skip
    return wall_us, sorted(rows, key=lambda r: -r[2])


def _function_name(path: str, line: int, name: str) -> str:
    """``package/module.py:line(name)``: the path from the last ``site-packages`` or ``fused_cbam``
    folder on (else from the file's folder)."""
    if path == "~":  # a builtin
        return name
    parts = path.split("/")
    anchor = max((i for i, part in enumerate(parts) if part in ("site-packages", "fused_cbam")), default=len(parts) - 2)
    tail = parts[anchor + 1 :] if parts[anchor] == "site-packages" else parts[anchor:]
    return f"{'/'.join(tail)}:{line}({name})"


def saved_bytes(fn: Callable[[], torch.Tensor], module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd keeps for backward after ``fn()``, leaving out
    the module's own parameters and buffers (they are held whether or not autograd saves them)."""
    owned = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


class _LiveStorageTracker(TorchDispatchMode):
    """Follows the storages that operators create (until they die) and their peak total."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def peak_bytes(fn: Callable[[], None], device: torch.device, compiled: bool) -> int | None:
    """Peak memory allocated during ``fn()`` above what was allocated before it. On the CPU,
    the storages that operators create are followed; compiled code is not seen that way (None)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if compiled:
        return None
    with _LiveStorageTracker() as tracker:
        fn()
    return tracker.peak


def copy_bandwidth(device: torch.device, time: Callable) -> float:
    """The device's copy bandwidth in bytes/s (bytes read + written), measured on 256 MiB."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    median_ms = time(lambda _: dst.copy_(src))["median_ms"]
    return 2 * src.numel() * src.element_size() / (median_ms / 1e3)
