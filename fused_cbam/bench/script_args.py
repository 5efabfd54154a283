"""What the profiling scripts in benchmarks/ share: the one problem they look at (device, shape,
batch, dtype, memory format), its input, and the file their tables also go to."""

import argparse

import torch
from torch import Tensor

from fused_cbam.bench import providers


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_problem(parser: argparse.ArgumentParser, batch: int, dtype: str) -> None:
    """--device, --shape (CxHxW), --batch, --dtype and --format, with these defaults."""
    add_device(parser)
    parser.add_argument("--shape", default="512x28x28", help="CxHxW")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--dtype", choices=list(providers.DTYPES), default=dtype)
    parser.add_argument("--format", choices=list(providers.FORMATS), default="channels_last")


def problem_input(args: argparse.Namespace) -> Tensor:
    """x of the problem add_problem's arguments describe, from random values."""
    c, h, w = (int(v) for v in args.shape.split("x"))
    x = torch.randn(args.batch, c, h, w, device=args.device, dtype=providers.DTYPES[args.dtype])
    return x.to(memory_format=providers.FORMATS[args.format])


def write_out(path: str | None, text: str) -> None:
    """The script's printed text, also written to ``path`` where --out names one."""
    if path:
        with open(path, "w") as f:
            f.write(text)
