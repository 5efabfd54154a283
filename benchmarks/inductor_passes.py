"""What torch.compile makes of the reference CBAM block: the kernels Inductor generates for the
forward (eval, no grad) and for a training step (forward + backward), and which of them touch
a tensor of x's size. Those are the passes over x that the fused operators are measured against.

    python benchmarks/inductor_passes.py [--device cuda] [--shape 512x28x28] [--batch 64]
                                         [--dtype bfloat16] [--format channels_last] [--out FILE]

The generated code is parsed as text: a tensor is "x-sized" when the code declares it (an input's
``assert_size_stride`` or a buffer's ``empty_strided_*``) with as many elements as x. Kernel calls
are Inductor's own kernels (``name(...)`` on the CPU, ``name.run(...)`` for Triton) and extern
calls (``extern_kernels.name(...)``). A heuristic reading, for notes, not a test.
"""

import argparse
import re
from math import prod

import torch
from torch._inductor.utils import run_and_get_code

from fused_cbam.bench import providers, script_args

_DECLARED = re.compile(r"(?:assert_size_stride\((\w+), \(([\d, ]*)\)|(\w+) = empty_strided_\w+\(\(([\d, ]*)\))")
_GROUPED = re.compile(r"assert_size_stride_grouped\(\(([\w, ]*)\), \(((?:\([\d, ]*\),? ?)*)\)")
_CALL = re.compile(r"^\s*(?:\w+ = )?((?:extern_kernels\.)?\w+?)(?:\.run)?\((.*)\)\s*$")


def _numel(shape: str) -> int:
    return prod(int(d) for d in shape.replace(" ", "").split(",") if d)


def x_sized_names(code: str, numel: int) -> set[str]:
    names = set()
    for m in _DECLARED.finditer(code):
        name, shape = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if _numel(shape) == numel:
            names.add(name)
    for m in _GROUPED.finditer(code):  # assert_size_stride_grouped((a, b), ((shape a), (shape b)), ...)
        group = re.findall(r"\w+", m.group(1))
        shapes = re.findall(r"\(([\d, ]*)\)", m.group(2))
        names.update(name for name, shape in zip(group, shapes) if _numel(shape) == numel)
    return names


def kernel_calls(code: str, numel: int) -> list[tuple[str, list[str]]]:
    """(kernel, its x-sized arguments) for each kernel call of each ``call`` function, in order."""
    big = x_sized_names(code, numel)
    kernels = set(re.findall(r"^(\w+) = async_compile\.\w+\(", code, flags=re.M))
    calls = []
    for line in code.splitlines():
        m = _CALL.match(line)
        if m and (m.group(1) in kernels or m.group(1).startswith("extern_kernels.")):
            args = re.findall(r"\b\w+\b", m.group(2))
            calls.append((m.group(1), [a for a in dict.fromkeys(args) if a in big]))
    return calls


def summarize(title: str, codes: list[str], numel: int) -> list[str]:
    lines = [f"## {title}"]
    passes = accesses = 0
    for i, code in enumerate(codes):
        for name, big in kernel_calls(code, numel):
            if big:
                passes += 1
                accesses += len(big)
            lines.append(f"  [graph {i}] {name}: x-sized {', '.join(big) if big else '-'}")
    lines.append(f"  kernels touching x-sized tensors: {passes}; x-sized arguments in all: {accesses}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    script_args.add_problem(p, batch=8, dtype="float32")
    p.add_argument("--out", help="also write the summary and the generated code to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x = script_args.problem_input(args)
    n, c, h, w = x.shape
    ref = providers.reference_module(c, device, x.dtype)

    torch._dynamo.reset()
    compiled = torch.compile(ref.eval())
    with torch.no_grad():
        _, forward_codes = run_and_get_code(compiled, x)

    torch._dynamo.reset()
    compiled = torch.compile(ref.train())
    xg, grad = x.clone().requires_grad_(), torch.randn_like(x)
    _, step_codes = run_and_get_code(lambda t: compiled(t).backward(grad), xg)

    header = (
        f"torch.compile (default mode) of the reference CBAM block: x [{n}, {c}, {h}, {w}] "
        f"{args.dtype} {args.format} on {device.type} ({torch.__version__})"
    )
    summary = [header, *summarize("forward, eval", forward_codes, x.numel())]
    summary += summarize("training step, forward + backward", step_codes, x.numel())
    print("\n".join(summary))
    modules = "".join(f"# ---- generated module {i}\n{code}\n" for i, code in enumerate(forward_codes + step_codes))
    script_args.write_out(args.out, "\n".join(summary) + "\n\n" + modules)


if __name__ == "__main__":
    main()
