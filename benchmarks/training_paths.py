"""A training step of the official layout three ways, in one process on the same module and
inputs: the fused block in one operator (``cbam_training``), the same block on its three
operators (the path that torch.compile, Triton and hooked blocks take), and the official code.
Wall time per step (host and device together: the minimum over rounds of the mean step time),
forward and forward+backward. See benchmarks/NOTES.md ("Seventeenth session").

    python benchmarks/training_paths.py --shapes 2x64x4x4 --threads 1 --steps 500
    python benchmarks/training_paths.py --device cuda --dtype bfloat16 --shapes 64x512x28x28
    python benchmarks/training_paths.py --device cuda --dtype float16 --autocast --shapes 64x512x28x28
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

import fused_cbam
from fused_cbam.bench import providers
from fused_cbam.nn.core import FusedBlock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from official_cbam import OfficialCBAM  # noqa: E402  (the tests' copy of the official code)


@contextlib.contextmanager
def three_operators():
    """The fused blocks decline the whole-block training operator while it is active."""
    taken = FusedBlock._training
    FusedBlock._training = lambda self, x: None
    try:
        yield
    finally:
        FusedBlock._training = taken


def step_time(module, x, grad_out, backward: bool, steps: int, rounds: int) -> float:
    """Seconds a step: the minimum over ``rounds`` of the mean of ``steps`` steps."""

    def run(n):
        for _ in range(n):
            out = module(x)
            if backward:
                out.backward(grad_out)
        if x.is_cuda:
            torch.cuda.synchronize()

    run(max(steps // 10, 3))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run(steps)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="2x64x4x4", help="comma-separated NxCxHxW")
    parser.add_argument("--format", choices=list(providers.FORMATS), default="nchw")
    parser.add_argument("--dtype", choices=list(providers.DTYPES), default="float32")
    parser.add_argument(
        "--autocast", action="store_true",
        help="mixed precision: the modules in float32, x in --dtype, every step under torch.autocast with it",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = providers.DTYPES[args.dtype]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = f"x {args.dtype} under autocast, parameters float32" if args.autocast else args.dtype
    print(f"# {name}, torch {torch.__version__}, {precision}, {args.format}, threads {torch.get_num_threads()}, "
          f"{args.steps} steps x {args.rounds} rounds")  # fmt: skip
    print("| shape | pass | cbam_training | three operators | official code |")
    print("|---|---|---:|---:|---:|")
    module_dtype = torch.float32 if args.autocast else dtype
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.autocast)
    for shape in args.shapes.split(","):
        n, c, h, w = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        official = OfficialCBAM(c).to(device, module_dtype)
        fused = fused_cbam.nn.CBAM(c).to(device, module_dtype)
        fused.load_state_dict(official.state_dict())
        x = torch.randn(n, c, h, w, device=device, dtype=dtype).to(memory_format=providers.FORMATS[args.format])
        x.requires_grad_()
        grad_out = torch.randn_like(x)
        with autocast:
            node = fused(x).grad_fn.name()
        if "CbamTraining" not in node:
            sys.exit(f"the block did not take cbam_training (its node: {node})")
        for backward in (False, True):
            with autocast:
                timed = [step_time(fused, x, grad_out, backward, args.steps, args.rounds)]
                with three_operators():
                    timed.append(step_time(fused, x, grad_out, backward, args.steps, args.rounds))
                timed.append(step_time(official, x, grad_out, backward, args.steps, args.rounds))
            cells = " | ".join(f"{t * 1e6:.0f} µs" for t in timed)
            print(f"| {shape} | {'forward+backward' if backward else 'forward'} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
