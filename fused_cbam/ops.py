"""The public functional API: argument checks, then the chosen backend's operator."""

from torch import Tensor

from fused_cbam import backends
from fused_cbam._layout import mean_and_max


def check_input(x, name: str = "x") -> None:
    """Raise a TypeError/ValueError naming ``name`` unless x is a 4-D floating tensor with H*W > 0."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one channel, got shape {tuple(x.shape)}")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"{name}: expected a non-empty spatial size H x W, got {x.shape[2]} x {x.shape[3]}")


def checked_small_as_x(t: Tensor | None, x: Tensor, shape: tuple[int, ...], name: str) -> Tensor | None:
    """Check a per-sample tensor (gate or scale) against x; return it in x's dtype, contiguous."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (x's device), got one on {t.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return t.to(x.dtype).contiguous()


def channel_pool(x: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Mean and max of every (n, c) plane over H x W, from one read of x: two [N, C] tensors."""
    check_input(x)
    return backends.resolve(backend, x).channel_pool(x)


def spatial_pool(
    x: Tensor, channel_scale: Tensor | None = None, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Mean and max over C of ``x * channel_scale[:, :, None, None]`` (x when no scale), from
    one read of x and without storing the product: two [N, 1, H, W] tensors (the two channels of
    one [N, 2, H, W] tensor)."""
    check_input(x)
    channel_scale = checked_small_as_x(channel_scale, x, tuple(x.shape[:2]), "channel_scale")
    return mean_and_max(backends.resolve(backend, x).spatial_maps(x, channel_scale))


def gate_apply(
    x: Tensor,
    channel_gate: Tensor | None = None,
    spatial_gate: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``x * channel_gate[n, c] * spatial_gate[n, 0, h, w]`` in one read and one write of x."""
    check_input(x)
    n, c, h, w = x.shape
    channel_gate = checked_small_as_x(channel_gate, x, (n, c), "channel_gate")
    spatial_gate = checked_small_as_x(spatial_gate, x, (n, 1, h, w), "spatial_gate")
    return backends.resolve(backend, x).gate_apply(x, channel_gate, spatial_gate)
