"""The arguments of ``cbam_inference`` and ``cbam_training`` after x (their schemas, in
csrc/ops.cpp, have the formulas): each layout's ``_plain()`` gathers them from its parts with
these, or says None when its block, as configured, is not one those operators compute."""

import torch
from torch import nn


def is_sigmoid(fn) -> bool:
    return fn is torch.sigmoid or type(fn) is nn.Sigmoid or is_timm_class(fn, "Sigmoid")


def is_pointwise(fc: nn.Module) -> bool:
    """A Linear layer, or a 1x1 convolution that acts as one on a 1x1 input (exactly those
    classes: the operator reads their weights and never calls a subclass's own forward)."""
    conv = type(fc) is nn.Conv2d and fc.kernel_size == (1, 1) and fc.groups == 1 and fc.padding == (0, 0)
    return conv or type(fc) is nn.Linear


def plain_mlp(fc1: nn.Module, act: nn.Module, fc2: nn.Module, pooling: str = "sum") -> list | None:
    """[fc1 weight, fc1 bias, fc2 weight, fc2 bias, pooling] of a Linear/1x1-conv MLP with a
    ReLU (biases may be None; pooling as cbam_inference takes it); None for any other MLP."""
    if type(act) is not nn.ReLU or not (is_pointwise(fc1) and is_pointwise(fc2)):
        return None
    return [fc1.weight, fc1.bias, fc2.weight, fc2.bias, pooling]


def plain_conv(conv: nn.Module, bn: nn.Module | None, pool_order, training: bool = False) -> list | None:
    """[weight, bias, BN running mean, running var, weight, bias, eps, max_first] of the spatial
    conv (2 -> 1 channels, or 1 -> 1 over 0.5·mean + 0.5·max; odd square kernel, 'same' zero
    padding) and its eval-mode BatchNorm (the operator folds it in); None for any other conv, or
    a BatchNorm using batch statistics. With ``training`` (``cbam_training``'s), a BatchNorm in
    either mode (tracking its running statistics in training), and the BatchNorm module (or None)
    last: its forward's step before the normalisation is the caller's (``batch_norm_step``). A
    BatchNorm without running statistics gives None in both."""
    k = conv.kernel_size if type(conv) is nn.Conv2d else (0, 0)
    if (
        k[0] != k[1] or k[0] % 2 == 0 or conv.in_channels not in (1, 2) or conv.out_channels != 1
        or conv.stride != (1, 1) or conv.padding != (k[0] // 2,) * 2 or conv.dilation != (1, 1) or conv.padding_mode != "zeros"
    ):
        return None
    if bn is None:
        norm = [None, None, None, None, 0.0]
    elif is_plain_batch_norm(bn) and bn.running_mean is not None and (not bn.training or training and bn.track_running_stats):
        norm = [bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps]
    else:
        return None
    return [conv.weight, conv.bias, *norm, tuple(pool_order) == ("max", "mean"), *([bn] if training else [])]


def batch_norm_step(bn: nn.Module | None) -> tuple[bool, float]:
    """(training, momentum) for ``cbam_training``, after what nn.BatchNorm2d's forward (and timm's
    BatchNormAct2d's) does before it normalises: count the batch in training, and take the
    cumulative average's factor when its momentum is None."""
    if bn is None:
        return False, 0.0
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return bn.training, momentum


def is_plain_batch_norm(bn: nn.Module) -> bool:
    """A BatchNorm2d, or timm's BatchNormAct2d without activation or dropout (Identity children)."""
    if type(bn) is nn.BatchNorm2d:
        return True
    act_free = all(type(child) is nn.Identity for child in bn.children())
    return isinstance(bn, nn.BatchNorm2d) and is_timm_class(bn, "BatchNormAct2d") and act_free


def plain_conv_bn(module: nn.Module, pool_order, training: bool = False) -> list | None:
    """``plain_conv`` of a conv-then-BatchNorm module (ours, or the one ``convert`` adopted from
    the user's model, e.g. timm's ConvNormAct): None unless its children are exactly ``conv`` and
    ``bn``, so that a module with an activation (or anything else) after them keeps its forward."""
    # The children that are set (a part set to None stays in _modules); not named_children(),
    # whose generator and memo cost more: this runs at every eval-mode call.
    children = {name: child for name, child in module._modules.items() if child is not None}
    if children.keys() != {"conv", "bn"} or not is_plain_batch_norm(children["bn"]):
        return None
    return plain_conv(children["conv"], children["bn"], pool_order, training)


def forward_is(module: nn.Module, known) -> bool:
    """Whether ``module``'s forward is the function ``known`` (a class's forward), or a copy of it
    (the same bytecode, names and numbers), as the CBAM code copied into users' projects has, and
    every attribute it reads of the module is a child module or None (a plain function in
    ``self.relu`` would run too). The operator reads a container's parts and never calls the
    container's own forward, which must therefore be the one it assumes."""
    mine, theirs = getattr(type(module).forward, "__code__", None), known.__code__
    if mine is None:  # (a forward that is not a Python function)
        return False

    def numbers(code):
        return tuple(c for c in code.co_consts if not isinstance(c, str))

    same = mine is theirs or (
        mine.co_code == theirs.co_code and mine.co_names == theirs.co_names and numbers(mine) == numbers(theirs)
    )
    return same and all(_is_part_or_none(attribute(module, name)) for name in theirs.co_names)


def attribute(module: nn.Module, name: str):
    """``getattr(module, name, None)`` without nn.Module's slow path for missing names (a class
    attribute comes back as it is in the class: a property as the property object)."""
    for table in (module._modules, module._parameters, module._buffers, module.__dict__):
        if name in table:
            return table[name]
    return getattr(type(module), name, None)


def _is_part_or_none(value) -> bool:
    return value is None or isinstance(value, nn.Module)


def is_timm_class(obj, name: str) -> bool:
    """Whether obj's class is timm's class ``name`` (by name and module: timm is optional)."""
    return type(obj).__name__ == name and type(obj).__module__.startswith("timm.")


def plain_block(mlp: list | None, conv: list | None, *gates) -> list | None:
    return mlp + conv if mlp is not None and conv is not None and all(map(is_sigmoid, gates)) else None
