"""What the fused modules need from autocast's rules."""

import torch
from torch import Tensor


def cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat`` of tensors of one dtype, without autocast's type promotion. Autocast promotes
    cat's inputs to their widest type and refuses a 16-bit dtype other than its own (float16
    tensors under a bfloat16 autocast: "Unexpected floating ScalarType"). Tensors of one dtype
    need no promotion."""
    if isinstance(tensors[0], torch.fx.Proxy):  # FX tracing records the cat as it is
        return torch.cat(tensors, dim)
    device = tensors[0].device.type
    if device == "meta" or not torch.is_autocast_enabled(device):  # (meta has no autocast)
        return torch.cat(tensors, dim)
    with torch.autocast(device, enabled=False):
        return torch.cat(tensors, dim)
