"""What gets timed: the CBAM block as each provider runs it, and each operator alone."""

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch
from torch import Tensor, nn

import fused_cbam
from fused_cbam import reference


# The dtypes and memory formats the benchmark and its scripts take by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
RESNET50_SHAPES = ["256x56x56", "512x28x28", "1024x14x14", "2048x7x7"]  # CxHxW of its CBAM blocks
YOLO_NECK_SHAPES = ["128x80x80"]


@dataclass
class Provider:
    name: str
    kind: str  # "baseline" or "fused"
    make: Callable[[nn.Module], nn.Module]  # from the reference module (same weights where possible)
    forward_only: bool = False  # its training step is another provider's: timed there


def _fused(backend: str, three_operators: bool = False) -> Callable[[nn.Module], nn.Module]:
    def make(ref: nn.Module) -> nn.Module:
        module = fused_cbam.nn.CBAM(ref.ChannelGate.gate_channels, backend=backend)
        module.load_state_dict(ref.state_dict())
        # Keeping the gates (references, no copies) takes the three-operator path in inference.
        module.keep_gates = three_operators
        return module.to(next(ref.parameters()))

    return make


class WithEnvironment(nn.Module):
    """A module whose calls run with environment variables set: the CUDA operators read their
    choices (FUSED_CBAM_CUDA_INFERENCE) at each call, so one process times both choices."""

    def __init__(self, module: nn.Module, **env: str):
        super().__init__()
        self.module, self.env = module, env

    def forward(self, x: Tensor) -> Tensor:
        with mock.patch.dict(os.environ, self.env):
            return self.module(x)


def _cluster(ref: nn.Module) -> nn.Module:
    return WithEnvironment(_fused("cuda")(ref), FUSED_CBAM_CUDA_INFERENCE="cluster")


def _timm(ref: nn.Module) -> nn.Module:
    from timm.layers.cbam import CbamModule

    return CbamModule(ref.ChannelGate.gate_channels).to(next(ref.parameters()))


def _compiled(mode: str, make_module: Callable[[nn.Module], nn.Module] = lambda ref: ref) -> Callable[[nn.Module], nn.Module]:
    def make(ref: nn.Module) -> nn.Module:
        # Every shape and mode recompiles the same forward; starting afresh for each shape keeps
        # Dynamo under its recompilation limit (past it, it silently runs eager).
        torch._dynamo.reset()
        return torch.compile(make_module(ref), mode=mode)

    return make


def providers(device: torch.device, names: list[str] | None, quick: bool = False) -> list[Provider]:
    """Every provider usable here, the baselines first; ``names`` keeps only those listed.
    Quick runs leave out max-autotune unless named (it autotunes each shape's GEMMs and convs
    for minutes: on an H200 the first shape, with the other providers, was not done after 2 minutes)."""
    found = [Provider("reference", "baseline", lambda ref: ref)]
    if importlib.util.find_spec("timm") is not None:
        found.append(Provider("timm", "baseline", _timm))
    found.append(Provider("compile", "baseline", _compiled("default")))
    if device.type == "cuda" and (not quick or (names and "compile-max-autotune" in names)):
        found.append(Provider("compile-max-autotune", "baseline", _compiled("max-autotune-no-cudagraphs")))
    for backend in fused_cbam.available_backends():
        runs_here = {"cpu": device.type == "cpu", "cuda": device.type == "cuda", "triton": device.type == "cuda"}
        if runs_here.get(backend, False):
            found.append(Provider(backend, "fused", _fused(backend)))
            # The forward as three operators, beside the one-operator inference path above.
            found.append(Provider(f"{backend}-3ops", "fused", _fused(backend, three_operators=True), forward_only=True))
            if backend == "cuda":  # the inference forward in one kernel of clusters (sm_90 on; else chunked)
                found.append(Provider("cuda-cluster", "fused", _cluster, forward_only=True))
    if device.type in fused_cbam.available_backends():
        # What users get from torch.compile of a model holding the fused block.
        found.append(Provider(f"compile+{device.type}", "fused", _compiled("default", _fused(device.type))))
    if names:
        unknown = set(names) - {p.name for p in found}
        if unknown:
            raise SystemExit(f"--backends: {sorted(unknown)} not available here; choose from {[p.name for p in found]}")
        found = [p for p in found if p.name in names]
    return found


def reference_module(channels: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The official layout on the reference backend, with non-trivial weights."""
    module = fused_cbam.nn.CBAM(channels, backend="reference")
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module.to(device=device, dtype=dtype)


def operator_calls(backend: str) -> dict[str, Callable[[Tensor, Tensor, Tensor], object]]:
    """Each operator alone, called as ``fn(x, channel_gate, spatial_gate)``."""
    if backend == "reference":
        pool_c, pool_s, gate = reference.channel_pool, reference.spatial_pool, reference.gate_apply
        return {
            "channel_pool": lambda x, g, h: pool_c(x),
            "spatial_pool": lambda x, g, h: pool_s(x, g),
            "gate_apply": lambda x, g, h: gate(x, g, h),
        }
    return {
        "channel_pool": lambda x, g, h: fused_cbam.channel_pool(x, backend=backend),
        "spatial_pool": lambda x, g, h: fused_cbam.spatial_pool(x, g, backend=backend),
        "gate_apply": lambda x, g, h: fused_cbam.gate_apply(x, g, h, backend=backend),
    }


def operator_bytes(op: str, x: Tensor) -> int:
    """The bytes an operator must move: each input read once, each output written once."""
    n, c, h, w = x.shape
    e, big = x.element_size(), x.numel() * x.element_size()
    per_channel, per_pixel = n * c * e, n * h * w * e
    return {
        "channel_pool": big + 2 * per_channel,
        "spatial_pool": big + per_channel + 2 * per_pixel,
        "gate_apply": 2 * big + per_channel + per_pixel,
    }[op]
