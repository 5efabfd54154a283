"""The spatial gate's K x K convolution (2 maps -> 1, or 1 -> 1) forward and backward with its
maps in NCHW and in channels_last strides, at the bench shapes: on the CPU, oneDNN pads NCHW
maps to 16 channels and channels_last was 6x faster in the backward (benchmarks/NOTES.md,
"The spatial conv on the CPU"), so the blocks hand it channels_last maps there. This measures
whether cuDNN wants the same on a GPU.

    python benchmarks/spatial_conv_layouts.py [--device cuda] [--batch 64] [--dtype bfloat16]
                                              [--sizes 56,28,14,7] [--out FILE]
"""

import argparse

import torch

from fused_cbam.bench import providers, script_args, timing


def conv_step(maps: torch.Tensor, conv: torch.nn.Conv2d, grad: torch.Tensor):
    """One forward and backward of the conv on ``maps`` (the input's gradient included)."""

    def step(_: int):
        maps.grad = None
        conv(maps).backward(grad)

    return step


def measure(device: torch.device, batch: int, dtype: torch.dtype, size: int, channels: int, layout: str) -> float:
    """Median milliseconds of one forward and backward."""
    conv = torch.nn.Conv2d(channels, 1, 7, padding=3, bias=False).to(device, dtype)
    base = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    # clone sets the strides: a one-channel NCHW tensor also counts as channels_last-contiguous
    maps = base.clone(memory_format=providers.FORMATS[layout]).requires_grad_()
    grad = torch.randn(batch, 1, size, size, device=device, dtype=dtype)
    step = conv_step(maps, conv, grad)
    if device.type == "cuda":
        return timing.time_cuda(step, buffers=1, reps=50)["median_ms"]
    return timing.time_cpu(step, min_run_time=0.2)["median_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    script_args.add_device(parser)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", choices=providers.DTYPES, default="bfloat16")
    parser.add_argument("--sizes", default="56,28,14,7", help="H = W of the maps, comma-separated")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.backends.cudnn.benchmark = False  # the modules run with PyTorch's default
    lines = [
        f"spatial conv 7x7 forward+backward, {name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}",
        "| maps | H = W | NCHW ms | channels_last ms |",
        "|---|---:|---:|---:|",
    ]
    dtype = providers.DTYPES[args.dtype]
    for channels in (2, 1):
        for size in (int(s) for s in args.sizes.split(",")):
            ms = [measure(device, args.batch, dtype, size, channels, layout) for layout in providers.FORMATS]
            lines.append(f"| {channels} | {size} | {ms[0]:.3f} | {ms[1]:.3f} |")
    print("\n".join(lines))
    script_args.write_out(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
