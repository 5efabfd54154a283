"""Fused CBAM attention (channel + spatial gates) and class activation maps for PyTorch."""

from fused_cbam import _library, _registrations
from fused_cbam.backends import available_backends
from fused_cbam.ops import channel_pool, gate_apply, spatial_pool

if _library.LOAD_ERROR is None:
    _registrations.register("fused_cbam", library_autograd=True)

from fused_cbam import nn  # noqa: E402  (nn uses the operators registered above)
from fused_cbam.convert import convert  # noqa: E402  (the function; its module stays in sys.modules)

__all__ = ["available_backends", "channel_pool", "convert", "gate_apply", "nn", "spatial_pool"]
