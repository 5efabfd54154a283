"""Every Triton kernel compiles for a Hopper GPU (sm_90) with every GPU configuration of its
autotuner, without a GPU: the interpreter runs every operator once and records each launch's
argument types and compile-time constants; a process without the interpreter then compiles
each recorded launch with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``, down to
the cubin (Triton's own ptxas), and checks its shared memory and threads against Hopper's limits per block.

Errors that only a GPU compile shows (lowering, layouts, register or shared-memory limits) then
show in CI rather than in a GPU session's minutes. The device runs Triton 3.6, CI its own
version: this checks CI's.

    python tests/test_triton_sm90.py RECORDS.json   # the compiling half, run by the test
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Hopper's limits per block: shared memory (227 KiB, opt-in) and threads.
SM90_SHARED_BYTES = 227 * 1024
MAX_THREADS = 1024
def record_launches(run_operators) -> list[dict]:
    """Each distinct launch made by ``run_operators()`` under the interpreter: kernel (module and
    name), signature, constants, the arguments Triton's JIT would take as 16-byte aligned, and for
    an autotuned launch the index of its tuner. Arguments are specialized as the JIT specializes
    them on a GPU (an int equal to 1 becomes a constant; pointers and ints divisible by 16 are
    marked so), so that the compiled code vectorizes and pipelines its loads as it would there."""
    import triton
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import native_specialize_impl

    from fused_cbam.triton import _common

    records, current_tuner = {}, [None]
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        params = inspect.signature(self.fn).parameters
        signature, constants, aligned = {}, {}, []
        for name in self.arg_names:
            if params[name].annotation in (triton.language.constexpr, "tl.constexpr"):
                signature[name], constants[name] = "constexpr", bound[name]
                continue
            kind, specialization = native_specialize_impl(BaseBackend, bound[name], False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = specialization
            elif specialization == "D":
                aligned.append(name)
        record = {"module": self.fn.__module__, "kernel": self.fn.__name__, "signature": signature,
                  "constants": constants, "aligned": aligned, "tuner": current_tuner[0]}  # fmt: skip
        records[json.dumps(record, sort_keys=True)] = record
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def tracking(index, tuner_run):
        def run(*args, **kwargs):
            current_tuner[0] = index
            try:
                return tuner_run(*args, **kwargs)
            finally:
                current_tuner[0] = None

        return run

    tuners = [tuner for tuner, _ in _common.TUNED_KERNELS]
    originals = [tuner.run for tuner in tuners]
    InterpretedFunction.run = recording_run
    for index, tuner in enumerate(tuners):
        tuner.run = tracking(index, tuner.run)
    try:
        run_operators()
    finally:
        InterpretedFunction.run = original_run
        for tuner, run in zip(tuners, originals):
            tuner.run = run
    return list(records.values())


def sm90_binaries(records: list[dict]):
    """(record, constants, compiled kernel) for every record, autotuned ones once per GPU
    configuration."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_cbam.triton import _common

    target = GPUTarget("cuda", 90, 32)
    for record in records:
        kernel = getattr(importlib.import_module(record["module"]), record["kernel"])
        configs = [None] if record["tuner"] is None else _common.TUNED_KERNELS[record["tuner"]][1]
        for config in configs:
            constants = dict(record["constants"], **(config.kwargs if config else {}))
            options = {"num_warps": config.num_warps} if config else {}
            attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in record["aligned"]}
            source = ASTSource(kernel, signature=record["signature"], constexprs=constants, attrs=attrs)
            try:
                yield record, constants, triton.compile(source, target=target, options=options)
            except Exception as e:
                raise RuntimeError(f"{record['kernel']} with {constants}, {options}: {e}") from e


def compile_for_sm90(records: list[dict]) -> int:
    """Compile every record (autotuned ones once per GPU configuration); the number compiled."""
    compiled = 0
    for record, constants, binary in sm90_binaries(records):
        shared, threads = binary.metadata.shared, binary.metadata.num_warps * 32
        assert shared <= SM90_SHARED_BYTES, f"{record['kernel']} with {constants}: {shared} B of shared memory"
        assert threads <= MAX_THREADS, f"{record['kernel']} with {constants}: {threads} threads"
        compiled += 1
    return compiled


def run_every_operator(c: int = 24, h: int = 6, w: int = 7) -> None:
    """Every Triton operator once, forward and backward (the adding ones and channel_gate too) and
    the inference operator, in both memory formats, in float32 and bfloat16, on x [2, c, h, w]."""
    import fused_cbam.nn
    import fused_cbam.triton  # (registers the operators)

    ops = torch.ops.fused_cbam_triton
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, c, h, w, dtype=dtype).contiguous(memory_format=memory_format)
            g, s = torch.rand(2, c, dtype=dtype), torch.rand(2, 1, h, w, dtype=dtype)
            avg, mx, c_arg = ops.channel_pool(x)
            ops.channel_pool_backward(avg, mx, c_arg, x)
            ops.channel_pool_backward_add(torch.zeros_like(x), avg, mx, c_arg)
            maps, s_arg = ops.spatial_pool(x, g)
            mean, smx = maps[:, :1], maps[:, 1:]
            ops.spatial_pool_backward(mean, smx, s_arg, x, g)
            ops.spatial_pool_backward_add(torch.zeros_like(x), mean, smx, s_arg, x, g)
            # the modules' backward pair: the spatial max's share, then the channel pass with the mean's
            ops.spatial_pool_backward_add(torch.zeros_like(x), mean, smx, s_arg, x, g, add_mean=False)
            ops.channel_pool_backward_add(torch.zeros_like(x), avg, mx, c_arg, mean, g)
            out = ops.gate_apply(x, g, s)
            ops.gate_apply_backward(out, x, g, s)
            ops.gate_apply_backward(out, x, None, None)
            gate = ops.channel_gate(torch.randn(2, 2, c, dtype=dtype))
            ops.channel_gate_backward(g, g, gate, 2)
            ops.channel_gate_backward(g, None, gate, 2)
            # The MLP's variants: two layers over both pools, over their mix, one layer over the mean.
            blocks = (fused_cbam.nn.CBAM(c, reduction_ratio=4, backend="triton"),
                      fused_cbam.nn.LightCbamModule(c, rd_ratio=1 / 4, backend="triton"),
                      fused_cbam.nn.UltralyticsCBAM(c, backend="triton"))  # fmt: skip
            for block in blocks:
                with torch.no_grad():
                    block.eval().to(dtype)(x)


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records the launches in Triton's interpreter, without a GPU")
    records = record_launches(run_every_operator)
    kernels = {(r["module"], r["kernel"]) for r in records}
    assert len(kernels) >= 9 and any(r["tuner"] is not None for r in records), kernels
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(records))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__, str(path)], check=False, capture_output=True, text=True, timeout=900, env=env,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled" in result.stdout, result.stdout


if __name__ == "__main__":
    count = compile_for_sm90(json.loads(Path(sys.argv[1]).read_text()))
    print(f"compiled {count} kernels for sm_90")
