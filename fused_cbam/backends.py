"""Backend choice: which implementation of the three fused operators serves a tensor.

Every backend offers the same three calls, ``channel_pool(x) -> (avg, max)``,
``spatial_maps(x, scale, max_first) -> maps`` (the mean and max over C, stacked [N, 2, H, W] as
the spatial conv takes them, the max first with ``max_first``) and ``gate_apply(x, g, h) -> out``;
the compiled and Triton ones are registered PyTorch operators with autograd, the reference is
plain PyTorch. The compiled one also has ``gated_spatial_maps(x, logits, max_first) -> (gate,
maps)``, the spatial pooling with a sigmoid channel gate made from the MLP's logits (None on the
others).
"""

import importlib.util
import os

import torch
from torch import Tensor
from torch.autograd import forward_ad

from fused_cbam import _library, reference
from fused_cbam._one_grad import OneGradBackend

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


class OperatorBackend:
    """The operators of one namespace (``fused_cbam`` or ``fused_cbam_triton``). ``fused_gate``:
    whether the modules take its ``channel_gate`` operator for a sigmoid channel gate."""

    def __init__(self, namespace: str, fused_gate: bool):
        self._ops = getattr(torch.ops, namespace)
        self._fused_gate = fused_gate
        # The whole-block training operator: the C++ library's alone (None for Triton's).
        self.cbam_training = getattr(self._ops, "cbam_training", None)

    @property
    def cbam_inference(self):
        """The whole-block inference operator (the reference backend has None)."""
        return self._ops.cbam_inference

    def one_grad(self) -> OneGradBackend:
        """This backend's calls for one training block's forward, its backward filling one
        gradient of x (a new object for each forward)."""
        return OneGradBackend(self._ops, self._fused_gate)

    def channel_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        avg, mx, _ = self._ops.channel_pool(x)
        return avg, mx

    def spatial_maps(self, x: Tensor, scale: Tensor | None, max_first: bool = False) -> Tensor:
        return self._ops.spatial_pool(x, scale, max_first)[0]

    def gate_apply(self, x: Tensor, channel_gate: Tensor | None, spatial_gate: Tensor | None) -> Tensor:
        return self._ops.gate_apply(x, channel_gate, spatial_gate)

    @property
    def gated_spatial_maps(self):
        """``gated_spatial_maps(x, logits, max_first) -> (gate, maps)``: the sigmoid channel gate
        from the MLP's logits [K, N, C] (``channel_gate``) and the spatial maps of x times it; None
        where the modules compute the gate in PyTorch (see ``_INSTANCES``)."""
        return self._gated_spatial_maps if self._fused_gate else None

    def _gated_spatial_maps(self, x: Tensor, logits: Tensor, max_first: bool) -> tuple[Tensor, Tensor]:
        gate = self._ops.channel_gate(logits)
        return gate, self.spatial_maps(x, gate, max_first)


class ReferenceBackend:
    channel_pool = staticmethod(reference.channel_pool)
    spatial_maps = staticmethod(reference.spatial_maps)
    gate_apply = staticmethod(reference.gate_apply)
    cbam_inference = cbam_training = None

    def one_grad(self):
        return self  # plain PyTorch: autograd adds the gradients


_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _find_unavailable_reason(backend: str) -> str | None:
    """None when the backend can run on this machine, else why not."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda") and _library.LOAD_ERROR is not None:
        return f"{_library.LOAD_ERROR}; {_library.REBUILD_HINT}"
    if backend == "cpu" and not _library.has_kernels("CPU"):
        return f"the compiled library has no CPU kernels; {_library.REBUILD_HINT}"
    if backend == "cuda":
        if not _library.has_kernels("CUDA"):
            return (
                "fused_cbam was built without its CUDA kernels; rebuild on a machine with the CUDA "
                f"toolkit, with FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST set: {_library.REBUILD_HINT}"
            )
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if not (torch.cuda.is_available() or _TRITON_INTERPRETED):
            return "Triton needs a CUDA GPU (or TRITON_INTERPRET=1 for its CPU interpreter)"
    return None


# Decided once at import, so that resolving a backend inside torch.compile is plain Python.
_UNAVAILABLE = {b: _find_unavailable_reason(b) for b in BACKENDS if b != "auto"}


def _unavailable_reason(backend: str) -> str | None:
    return _UNAVAILABLE[backend]


def available_backends() -> list[str]:
    """The backends usable on this machine, best first."""
    return [b for b in ("cuda", "triton", "cpu", "reference") if _unavailable_reason(b) is None]


# The Triton backend's modules leave the channel gate to PyTorch: a call of a Triton operator
# costs more host time than the ATen calls it would replace (with the launches stubbed out, 11 µs
# for channel_gate, 16 µs when it was a torch.library.custom_op, against 3.5 µs for sum and
# sigmoid; benchmarks/NOTES.md), before Triton's own launcher; the C++ operators cost what an
# ATen call costs.
_INSTANCES = {
    "reference": ReferenceBackend(),
    "cpu": OperatorBackend("fused_cbam", fused_gate=True),
    "cuda": OperatorBackend("fused_cbam", fused_gate=True),
}


def _backend(name: str):
    if name not in _INSTANCES:  # triton: its operators are registered on first use
        import fused_cbam.triton  # noqa: F401

        _INSTANCES[name] = OperatorBackend("fused_cbam_triton", fused_gate=False)
    return _INSTANCES[name]


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        for candidate in ("cuda", "triton"):
            if _unavailable_reason(candidate) is None:
                return candidate
    elif device.type == "cpu" and _unavailable_reason("cpu") is None:
        return "cpu"
    return "reference"


def in_func_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running. A private PyTorch
    function (Dynamo traces it as a constant); tests/test_reliability.py checks it per release."""
    return torch._C._functorch.maybe_current_level() is not None


def resolve(backend: str, x: Tensor):
    """The backend object that serves x, after checking it can. Inside a torch.func transform,
    the reference: the fused operators have no batching rules for vmap, and their autograd is not
    written in the form (``setup_context``) that functorch's grad needs. The reference too for x
    with a forward-mode tangent (``torch.autograd.forward_ad``): they have no forward formulas."""
    resolved = resolve_for_device(backend, x.device)
    return _backend("reference") if _has_tangent(x) else resolved


def _has_tangent(x: Tensor) -> bool:
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent is not None


def checked(backend: str) -> str:
    """``backend``, after checking that it names one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_for_device(backend: str, device: torch.device):
    """``resolve`` for a tensor on ``device``."""
    if checked(backend) == "auto":
        backend = _auto(device)
    reason = _unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    expected_device = {"cpu": "cpu", "cuda": "cuda", "triton": "cpu" if _TRITON_INTERPRETED else "cuda"}
    if backend in expected_device and device.type != expected_device[backend]:
        raise ValueError(f"x: backend {backend!r} expects a {expected_device[backend]} tensor, got one on {device}")
    return _backend("reference" if in_func_transform() else backend)
