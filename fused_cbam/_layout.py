"""The memory format rule every backend follows: outputs and gradients of x in x's format."""

import torch
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """channels_last-contiguous and not also contiguous (a tensor that is both, e.g. C = 1 or
    H = W = 1, counts as NCHW), as the C++ and CUDA kernels decide."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def mean_and_max(maps: Tensor, max_first: bool = False) -> tuple[Tensor, Tensor]:
    """The mean and the max map [N, 1, H, W], views of the two channels of the spatial pooling's
    stacked maps [N, 2, H, W] (or of their gradient), the max first with ``max_first``."""
    first, second = maps[:, :1], maps[:, 1:]
    return (second, first) if max_first else (first, second)


def empty_like_x(x: Tensor) -> Tensor:
    """An uninitialised tensor of x's shape and dtype, dense in x's memory format."""
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=memory_format)
