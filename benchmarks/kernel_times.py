"""Where each pass of the CBAM block spends its device time, kernel by kernel: the eval forward
(no grad) and the training step (forward + backward, from gradients set to None) of each provider
named, profiled over a few calls after a warm-up. Per activity (a kernel, copy or fill; on a CPU,
an operator's self time): calls per pass, µs per pass, share of the pass. The benchmark says how
long a pass takes; this says which kernels take it. With ``--host``, also the host's side of each
pass: its wall time per pass until the calls return, and the Python functions that take it
(cProfile, own time), for a pass whose device waits on the host.

    python benchmarks/kernel_times.py --device cuda --dtype bfloat16 --batch 64 --shape 512x28x28 \\
        --format channels_last --providers cuda,compile --out kernels.txt
"""

import argparse

import torch

from fused_cbam.bench import providers, script_args, timing


def passes(module: torch.nn.Module, x: torch.Tensor) -> dict:
    """The block's two passes, as calls without arguments."""
    xg, grad = x.clone().requires_grad_(), torch.randn_like(x)

    def forward():
        module.eval()
        with torch.no_grad():
            module(x)

    def training_step():
        module.train()
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).backward(grad)

    return {"eval forward": forward, "training step": training_step}


def table(title: str, rows: list[tuple[str, float, float]], top: int) -> list[str]:
    heading = f"## {title}: {_total(rows):.1f} µs in {sum(calls for _, calls, _ in rows):.0f} activities"
    return _listing(heading, rows, top, "µs", "activity")


def host_table(title: str, wall_us: float, rows: list[tuple[str, float, float]], top: int) -> list[str]:
    heading = (f"### {title}, host: {wall_us:.1f} µs a pass until its calls return; under cProfile "
               f"{_total(rows):.1f} µs in {sum(calls for _, calls, _ in rows):.0f} function calls")  # fmt: skip
    return _listing(heading, rows, top, "µs (profiled)", "function")


def _total(rows) -> float:
    return sum(us for _, _, us in rows)


def _listing(heading: str, rows: list[tuple[str, float, float]], top: int, time_column: str, what: str) -> list[str]:
    """``heading``, then the ``top`` rows (name, calls, µs) with their share of all, and the rest in one line."""
    total = _total(rows)
    lines = [heading, "", f"| {time_column} | share | calls | {what} |", "|---:|---:|---:|---|"]
    for name, calls, us in rows[:top]:
        lines.append(f"| {us:.1f} | {us / total:.0%} | {calls:g} | {name[:140]} |")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"| {_total(rest):.1f} | | {sum(c for _, c, _ in rest):g} | ({len(rest)} others) |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    script_args.add_problem(p, batch=64, dtype="bfloat16")
    p.add_argument("--providers", default=None, help="comma-separated, as the benchmark's --backends "
                   "(default: the fused block on this device's backend, and compile)")  # fmt: skip
    p.add_argument("--reps", type=int, default=5, help="profiled calls of each pass")
    p.add_argument("--top", type=int, default=15, help="activities listed per pass")
    p.add_argument("--host", action="store_true", help="also where the host's time of each pass goes")
    p.add_argument("--out", help="also write the tables to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = args.providers.split(",") if args.providers else [device.type, "compile"]
    torch.manual_seed(0)
    x = script_args.problem_input(args)
    n, c, h, w = x.shape
    ref = providers.reference_module(c, device, x.dtype)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    lines = [f"# {name}, torch {torch.__version__}, x [{n}, {c}, {h}, {w}] {args.dtype} {args.format}, "
             f"{'device activities' if cuda else 'host operators, self time'} per pass, {args.reps} passes profiled",
             ""]  # fmt: skip
    for provider in providers.providers(device, names):
        for title, fn in passes(provider.make(ref), x).items():
            rows = timing.activity_table(timing.profiled_events(fn, args.reps, cuda), args.reps, device=cuda)
            lines += table(f"{provider.name}, {title}", rows, args.top)
            if args.host:
                lines += host_table(f"{provider.name}, {title}", *timing.host_profile(fn, args.reps, cuda), args.top)
    print("\n".join(lines))
    script_args.write_out(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
