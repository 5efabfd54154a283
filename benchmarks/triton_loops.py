"""The loops of every Triton kernel compiled for sm_90, read in their SASS, without a GPU: for
each launch the operators make (recorded under Triton's interpreter, as
tests/test_triton_sm90.py records them) and each configuration of its autotuner, the registers a
thread, its stack (spilled registers) and, per loop, its instructions and how many are warp
shuffles (SHFL), block barriers (BAR) and global loads (LDG, and LDGSTS: cp.async). A shuffle
in a streaming loop is a sum across lanes inside it, which the next step waits for: Triton's MLP
layer had 320 shuffles a step (benchmarks/NOTES.md, twenty-second session); a barrier may be
that too, or a layout conversion of a loaded block.

    python benchmarks/triton_loops.py [--kernel _mlp_layer_kernel] [--dtype bfloat16] [--shape 64x8x8] [--out FILE]

The launches are specialized as Triton's JIT specializes them on a GPU (sizes and strides equal
to 1 as constants, pointers and sizes divisible by 16 marked so), which decides how wide the
loads are: the record's shape should divide as the shapes of interest do.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_triton_sm90  # noqa: E402  (the recorder and compiler of the sm_90 test)

from fused_cbam.bench import script_args  # noqa: E402

_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BACK_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
# Opcodes counted in each loop: warp shuffles, block barriers (not MEMBAR or DEPBAR), and global
# loads, plain and asynchronous (cp.async, which Triton's pipelined loops use).
COUNTED = ("SHFL", "BAR", "LDG", "LDGSTS")


def _opcode(text: str) -> str:
    """An instruction's opcode without its modifiers or predicate: "@!P0 LDG.E.128 ..." -> "LDG"."""
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def loops(sass: str) -> list[dict]:
    """Each branch back to an earlier address in a kernel's SASS (a loop, or a region a loop
    encloses): its instructions and how many of them are each of COUNTED."""
    instructions = [(int(m[1], 16), m[2]) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    found = []
    for address, text in instructions:
        target = _BACK_BRANCH.search(text)
        if target and int(target[1], 16) < address:
            body = [_opcode(t) for a, t in instructions if int(target[1], 16) <= a <= address]
            found.append({"instructions": len(body), **{op: body.count(op) for op in COUNTED}})
    return found


def _tool_output(binary, *flags: str) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(binary.asm["cubin"])
        cubin.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, *flags, cubin.name], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip


def _x_dtype(record: dict) -> str:
    """The dtype of x in a recorded launch: the only 16-bit pointers a launch has are x's dtype."""
    return "bfloat16" if "*bf16" in record["signature"].values() else "float32"


def _flags(constants: dict) -> dict:
    """A launch's compile-time flags and block sizes (its upper-case constants)."""
    return {k: v for k, v in constants.items() if k.isupper()}


def report(records: list[dict], kernel: str | None, dtype: str | None) -> list[str]:
    # One record a kernel, signature and flags: records that differ only in an argument's
    # alignment or a lower-case constant would compile and report the same lines again.
    distinct = {}
    for r in records:
        if kernel in (None, r["kernel"]) and dtype in (None, _x_dtype(r)):
            key = (r["module"], r["kernel"], json.dumps(r["signature"]), json.dumps(_flags(r["constants"])))
            distinct.setdefault(key, r)
    lines = []
    for record, constants, binary in test_triton_sm90.sm90_binaries(list(distinct.values())):
        flags = _flags(constants) | {"num_warps": binary.metadata.num_warps}
        usage = _tool_output(binary, "-res-usage")
        registers, stack = re.search(r"REG:(\d+)", usage)[1], re.search(r"STACK:(\d+)", usage)[1]
        found = loops(_tool_output(binary, "-sass"))
        cells = "; ".join(f"{lp['instructions']} ins, " + ", ".join(f"{op} {lp[op]}" for op in COUNTED) for lp in found)
        types = "/".join(sorted({t for t in record["signature"].values() if t.startswith("*") and t != "*i32"}))
        lines.append(f"{record['kernel']} ({record['module'].rsplit('.', 1)[-1]}, {types}) {flags}: "
                     f"{registers} registers, {stack} B of stack; loops: {cells or 'none'}")  # fmt: skip
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", help="only this kernel (its function's name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="only the launches on x in this dtype")
    p.add_argument("--shape", default="64x8x8", help="CxHxW of the recorded calls: the JIT specializes on "
                   "sizes divisible by 16, as the ResNet shapes' C and most of their H x W are")  # fmt: skip
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--record", help=argparse.SUPPRESS)  # (the interpreter's half, run in a child)
    args = p.parse_args(argv)
    c, h, w = (int(v) for v in args.shape.split("x"))
    if args.record:
        records = test_triton_sm90.record_launches(lambda: test_triton_sm90.run_every_operator(c, h, w))
        Path(args.record).write_text(json.dumps(records))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "launches.json"
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, __file__, "--record", str(path), "--shape", args.shape], check=True, env=env)
        records = json.loads(path.read_text())
    text = "\n".join(report(records, args.kernel, args.dtype)) + "\n"
    print(text, end="")
    script_args.write_out(args.out, text)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off") and "--record" not in sys.argv:
        sys.exit("run without TRITON_INTERPRET: the tool records under the interpreter in a child process")
    main()
