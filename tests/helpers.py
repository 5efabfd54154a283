"""Shared test helpers: backends under test, input makers, and comparisons that explain failures."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_cbam
from fused_cbam._layout import mean_and_max

needs_cuda = pytest.mark.needs_cuda

# (backend, device): every compiled backend with the device it runs on; cuda cases skip cleanly.
COMPILED_BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda),
]

# Where the Triton kernels run: the GPU, or without one Triton's interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (backend, device) of every backend with all the operators of csrc/ops.cpp (the reference
# backend is plain PyTorch).
OPERATOR_BACKENDS = COMPILED_BACKENDS + [pytest.param("triton", TRITON_DEVICE, id="triton")]

# Absolute tolerance per dtype, relative to the magnitude of the expected values.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Shapes, each with why it is there.
SHAPES = [
    pytest.param((2, 3, 5, 7), id="small-odd"),
    pytest.param((1, 1, 4, 4), id="C=1"),
    pytest.param((3, 5, 1, 1), id="HW=1"),
    pytest.param((2, 33, 7, 9), id="not-multiple-of-vector"),
    pytest.param((2, 300, 3, 3), id="large-C-small-HW"),  # more channels than one CPU block (256)
    pytest.param((1, 4, 45, 47), id="small-C-large-HW"),  # more pixels than one CPU block (1024)
]

FORMATS = ["nchw", "channels_last", "strided"]


def fused_and_reference(make, backend, device, channels=16):
    """``make(channels, backend=...)`` on ``backend`` with non-trivial weights, and the same module
    on the reference backend loaded from it."""
    fused = make(channels, backend=backend).to(device)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    reference = make(channels, backend="reference").to(device)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def make_input(shape, dtype, device, memory_format="nchw", requires_grad=False):
    """Fresh random values in the given layout; "strided" is a non-contiguous slice view."""
    if memory_format == "strided":
        n, c, h, w = shape
        x = torch.randn(n, c, h, 2 * w + 1, dtype=dtype, device=device)[..., 1::2]
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
        if memory_format == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


# Per-element bound of 16-bit results that both sides round from float32 once (one operator
# against the reference), on top of the scaled absolute one: they differ by a few units in the
# last place of the element itself (float32 sums in another order add a little, relative to the
# largest value). Without it a small element is not checked at all: bfloat16's scaled bound is
# 6% of the largest value.
ELEMENT_RTOL = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
ELEMENT_ATOL = 1e-5  # relative to the largest value


def assert_close(actual, expected, atol, name="tensor", rounded_once=True):
    """Compare with an absolute tolerance scaled by the magnitude, and for 16-bit results rounded
    once on each side also within a few units in the last place of each element; print the worst
    elements. ``rounded_once=False`` where a side rounds intermediate 16-bit values (a block's
    MLP and conv, gradients added in x's dtype): an element that is small by cancellation then
    carries the rounding errors of its large terms."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = ELEMENT_RTOL.get(actual.dtype) if rounded_once else None
    actual, expected = actual.double(), expected.double()
    scale = max(1.0, expected.abs().nan_to_num().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs()
    both_nan = actual.isnan() & expected.isnan()
    err = torch.where(both_nan, torch.zeros_like(err), err.nan_to_num(nan=float("inf")))
    bound = torch.full_like(err, atol * scale)
    if rtol is not None:
        bound = torch.minimum(bound, rtol * expected.abs().nan_to_num(posinf=0, neginf=0) + ELEMENT_ATOL * scale)
    if err.numel() == 0 or (err <= bound).all():
        return
    err = err - bound  # the worst elements are those furthest past their bound
    worst = err.flatten().topk(min(5, err.numel())).indices
    rows = [
        f"  at {tuple(torch.unravel_index(i, err.shape))}: got {actual.flatten()[i].item():.6g}, "
        f"expected {expected.flatten()[i].item():.6g}"
        for i in worst
    ]
    raise AssertionError(f"{name}: errors past their bound by up to {err.max().item():.3g} (scaled atol {atol * scale:.3g})\n" + "\n".join(rows))


def backend_available(backend):
    return backend in fused_cbam.available_backends()


def skip_unless_available(backend):
    if not backend_available(backend):
        pytest.skip(f"the {backend} backend is unavailable here")


def operator_namespace(backend):
    """The operators of a backend: ``torch.ops.fused_cbam`` or ``torch.ops.fused_cbam_triton``."""
    if backend == "triton":
        import fused_cbam.triton  # noqa: F401  (registers its namespace)

        return torch.ops.fused_cbam_triton
    return torch.ops.fused_cbam


def mean_max_argmax(pooled):
    """A ``spatial_pool`` operator's output, (maps [N, 2, H, W] = [mean, max], argmax), as the
    three tensors (mean, max, argmax), the maps' channels as views."""
    maps, argmax = pooled
    return (*mean_and_max(maps), argmax)


class OperatorLog(TorchDispatchMode):
    """Names of the operators dispatched while it is active (``fused_cbam.channel_pool``, ...),
    and their arguments (``arguments``)."""

    def __init__(self):
        super().__init__()
        self.names = []
        self._calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        self._calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))

    def arguments(self, name: str) -> list[dict]:
        """Each call of operator ``name``'s arguments by name, defaults filled in."""
        found = []
        for func, args, kwargs in self._calls:
            if str(func.overloadpacket) == name:
                schema = func._schema.arguments
                named = {a.name: a.default_value for a in schema if a.has_default_value()}
                named.update(zip((a.name for a in schema), args))
                found.append({**named, **kwargs})
        return found


@contextlib.contextmanager
def runs_fused(backend, *ops):
    """Asserts that the code in the block dispatched each of ``ops`` (names in the backend's
    namespace, e.g. ``"channel_pool"``) when ``backend`` is a fused one, so that a comparison
    with the reference cannot pass on a silent fallback to the reference. Yields the log."""
    if backend == "reference":
        yield None
        return
    namespace = operator_namespace(backend).name
    with OperatorLog() as log:
        yield log
    missing = [op for op in ops if f"{namespace}.{op}" not in log.names]
    assert not missing, f"backend {backend!r} did not run {missing}; it ran {sorted(set(log.names))}"
