"""The fused CBAM core that every layout shares, the halves' and the blocks' base classes."""

import torch
from torch import Tensor, nn

from fused_cbam import _autocast, backends
from fused_cbam.nn.inference_args import batch_norm_step, is_sigmoid
from fused_cbam.ops import check_input


def fused_cbam_forward(x: Tensor, ops, channel, spatial) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fused CBAM core that every layout shares: ``x * channel gate * spatial gate``.

    ``ops`` are the backend's calls (``operators``); ``channel`` is the layout's channel half
    (a ``ChannelHalf``), or None for a spatial half called alone; ``spatial`` its spatial half
    (a ``SpatialHalf``), or None for a channel-only block. x is read three times and written
    once (twice and once with one half); nothing full-size but x is kept for backward. Returns
    the output and the two gates (None for a missing half).

    The spatial pooling writes its maps stacked as the spatial conv takes them (no ``cat``). On
    the compiled backends a sigmoid channel gate is made by the spatial pooling's call
    (``ops.gated_spatial_maps``) from the MLP's logits of each pooled vector: their sum and the
    sigmoid in one kernel (``channel_gate``), and in the backward one kernel for the sigmoid's
    gradient, the sum's and the addition of the gate's two shares (the spatial pooling's and
    the gate's), where eager PyTorch launches five (sum, sigmoid; add, sigmoid_backward, a copy
    of the sum's expanded gradient). Not under FX tracing, whose graph keeps the layout's own
    calls (one MLP call per pooled vector).
    """
    channel_gate = maps = None
    if channel is not None:
        avg, mx = ops.channel_pool(x)
        if _gate_may_be_fused(ops, x, channel, spatial):
            rows = channel.pooled(avg, mx, x)
            channel_gate, maps = _sigmoid_channel_gate(ops, x, channel, rows, _max_first(spatial))
        else:
            channel_gate = channel.to_gate(channel.logits(avg, mx, x))
        channel_gate = channel_gate.to(x.dtype)
    spatial_gate = None
    if spatial is not None:
        maps = ops.spatial_maps(x, channel_gate, _max_first(spatial)) if maps is None else maps
        spatial_gate = spatial_gate_of_maps(spatial, maps).to(x.dtype)
    return ops.gate_apply(x, channel_gate, spatial_gate), channel_gate, spatial_gate


def _gate_may_be_fused(ops, x: Tensor, channel, spatial) -> bool:
    return (
        spatial is not None and not isinstance(x, torch.fx.Proxy)
        and getattr(ops, "gated_spatial_maps", None) is not None and channel.gate_is_sigmoid()
    )  # fmt: skip


def _sigmoid_channel_gate(ops, x: Tensor, channel, rows: list[Tensor], max_first: bool) -> tuple[Tensor, Tensor | None]:
    """The sigmoid channel gate over the MLP of the pooled ``rows``, and the spatial maps when
    ``gated_spatial_maps`` made them with it. One pooled vector has no sum to fuse: its gate
    stays the layout's (the operator would only save the gate's gradient addition, for more
    Python than that). Under autocast the MLP's logits have another dtype than x: the sigmoid
    in theirs, as the reference computes it (a gate rounded otherwise can move a spatial max to
    another channel, and with it the max's whole gradient)."""
    if len(rows) == 1:
        return channel.to_gate(channel.shared_mlp(rows[0])), None
    logits = stacked(channel.shared_mlp, rows)
    if logits.dtype != x.dtype:
        return channel.to_gate(_sum_of_logits(logits)), None
    return ops.gated_spatial_maps(x, logits, max_first)


def _max_first(spatial) -> bool:
    """Whether the spatial half's conv takes the max map first (the official layout's order)."""
    return tuple(spatial.pool_order) == ("max", "mean")


def operators(module: nn.Module, x: Tensor, one_grad: bool = False):
    """The calls of ``module.backend`` for x; with ``one_grad``, one gradient of x threaded from
    the channel pooling on when a gradient flows (not in an exported or ``torch.jit.trace``d
    graph, which keeps the registered operators alone: no carriers, no Python autograd nodes).

    Under FX symbolic tracing (x a Proxy: ``torch.fx.symbolic_trace``, timm's and torchvision's
    feature extractors), the registered operators of the backend that the device of the module's
    parameters gets: the graph records them as calls, and their own autograd adds their gradients
    of x when it runs.
    """
    if isinstance(x, torch.fx.Proxy):
        device = next(module.parameters(), torch.empty(0)).device
        return backends.resolve_for_device(module.backend, device)
    ops = backends.resolve(module.backend, x)
    if one_grad and x.requires_grad and torch.is_grad_enabled() and not (_exporting() or torch.jit.is_tracing()):
        return ops.one_grad()
    return ops


def _exporting() -> bool:
    """Whether torch.export is tracing. Not ``torch.compiler.is_exporting()``: before torch 2.14
    Dynamo folds that call to True in every trace (pytorch/pytorch#176347), so torch.compile took
    the export path, and trained with three gradients of x. The flag it reads is traced as is."""
    return torch.compiler._is_exporting_flag


def fused_channel_gate(ops, x: Tensor, channel) -> Tensor:
    """[N, C] gate of the channel half from the fused average and max pools of x, in the dtype
    its MLP and gate give."""
    avg, mx = ops.channel_pool(x)
    return channel.to_gate(channel.logits(avg, mx, x))


def fused_spatial_gate(ops, x: Tensor, channel_gate: Tensor | None, spatial) -> Tensor:
    """[N, 1, H, W] gate of the spatial half from the fused mean and max over the channels of
    ``x * channel_gate``, in the dtype its conv and gate give."""
    return spatial_gate_of_maps(spatial, ops.spatial_maps(x, channel_gate, _max_first(spatial)))


def spatial_gate_of_maps(spatial, maps: Tensor) -> Tensor:
    """The spatial half's gate from the mean and max maps [N, 2, H, W], stacked in
    ``spatial.pool_order`` (``_max_first``); "mix" takes 0.5·mean + 0.5·max instead, as the sum of
    the halved maps: bit for bit the original's (in every dtype), and one kernel in the backward,
    where slices of the maps would each have their gradient zero-filled to the maps' size."""
    if tuple(spatial.pool_order) == ("mix",):
        maps = (maps * 0.5).sum(dim=1, keepdim=True)
    return spatial.to_gate(spatial.logits(_spatial_conv_layout(maps)))


@torch.fx.wrap  # FX tracing records the call; the layout is decided when the graph runs
def _spatial_conv_layout(maps: Tensor) -> Tensor:
    """The spatial conv's 1- or 2-channel input, in channels_last strides on the CPU when a
    gradient will flow back through the conv.

    oneDNN runs a conv over NCHW input in a layout blocked by 16 channels, padding these maps'
    channels to 16: its backward took 3.1 ms at 8x2x56x56 (2.1 ms for one map) on a 2-core Xeon,
    against 0.47 ms (0.35 ms) channels_last (benchmarks/NOTES.md, "The spatial conv on the CPU");
    the forward takes the same time in both. A one-channel tensor with NCHW strides counts as
    channels_last-contiguous, so ``contiguous`` would keep it; ``clone`` sets the strides. Not
    in a ``torch.jit.trace``, whose check traces again without gradients and must see the same
    graph; nor under vmap, which has no channels_last.
    """
    if maps.device.type != "cpu" or not maps.requires_grad or backends.in_func_transform() or torch.jit.is_tracing():
        return maps
    return maps.clone(memory_format=torch.channels_last)


class GateInspection:
    """Lets a module hand back its last gates: set ``keep_gates = True`` and, after a forward,
    read ``last_channel_gate`` ([N, C]) and ``last_spatial_gate`` ([N, 1, H, W], the gate map;
    None for a channel-only block). Nothing is kept, and nothing costs, when it is False; turning
    it off drops the gates kept so far."""

    _keep_gates: bool = False
    last_channel_gate: Tensor | None = None
    last_spatial_gate: Tensor | None = None

    @property
    def keep_gates(self) -> bool:
        return self._keep_gates

    @keep_gates.setter
    def keep_gates(self, keep: bool) -> None:
        self._keep_gates = bool(keep)
        if not keep:
            self.last_channel_gate = self.last_spatial_gate = None

    def _keep(self, channel_gate: Tensor, spatial_gate: Tensor | None) -> None:
        if self._keep_gates:
            self.last_channel_gate = channel_gate.detach()
            self.last_spatial_gate = None if spatial_gate is None else spatial_gate.detach()


def odd_kernel(kernel_size: int) -> int:
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd size (the conv keeps H x W), got {kernel_size}")
    return kernel_size


def check_block_input(x: Tensor, channels: int | None = None) -> None:
    """``check_input``, and x's channel count against the module's (when given). Nothing to check
    on an FX Proxy: the graph runs the operators, which check."""
    if isinstance(x, torch.fx.Proxy):
        return
    check_input(x)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"x: expected {channels} channels (the module's channel count), got {x.shape[1]}")


def _refuse_scripting(module: nn.Module):
    """``torch.jit.script`` asks every module of a model for its scriptable form first: say why
    there is none, instead of TorchScript's error about the Python it cannot compile."""
    raise RuntimeError(
        f"{type(module).__name__}: torch.jit.script cannot compile fused_cbam's modules (their forward "
        "chooses a backend in Python); use torch.export, torch.compile or torch.jit.trace"
    )


class BackendAttribute:
    """The ``backend`` of a block or a half: checked when set, and passed on from a block to the
    halves it holds."""

    def __get__(self, module, owner=None):
        return self if module is None else module._backend

    def __set__(self, module: nn.Module, backend: str) -> None:
        module._backend = backends.checked(backend)
        for half in module.modules():
            if isinstance(half, Half):
                half._backend = backend


class Half(nn.Module):
    """One half of a fused layout (its channel or its spatial attention), with the constructor
    and the parts, under the same names, of the half it replaces, and its small computations for
    the fused core. Called alone, it computes what that half computes (x times its gate, in most
    layouts) with the fused operators of ``backend``, which the block holding it keeps equal to
    its own."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    backend = BackendAttribute()
    __prepare_scriptable__ = _refuse_scripting

    def to_gate(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


class ChannelHalf(Half):
    """A channel half: ``channels``, ``pooled(avg, max, x)`` (the [N, C] vectors its MLP takes,
    from the fused pools; x only for pools computed in plain PyTorch), ``shared_mlp`` (the MLP,
    over vectors stacked along the batch) and ``gate_part`` (the name of the part that makes the
    gate from the logits; None for torch.sigmoid)."""

    gate_part: str | None = None

    def shared_mlp(self, pooled: Tensor) -> Tensor:
        raise NotImplementedError

    def pooled(self, avg: Tensor, mx: Tensor, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def logits(self, avg: Tensor, mx: Tensor, x: Tensor) -> Tensor:
        """[N, C]: the MLP summed over the pooled vectors."""
        return summed(self.shared_mlp, self.pooled(avg, mx, x))

    def to_gate(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.gate_part is None else getattr(self, self.gate_part)(logits)

    def gate_is_sigmoid(self) -> bool:
        """Whether the gate is the sigmoid of the MLP's logits summed over the pooled vectors and
        nothing more, so that the ``channel_gate`` operator may compute it: a subclass's own ``logits`` or
        ``to_gate``, or a gate part with hooks (forward or backward), must run as it is."""
        cls = type(self)
        if not (cls.to_gate is ChannelHalf.to_gate and cls.logits is ChannelHalf.logits):
            return False
        if self.gate_part is None:
            return True
        part = getattr(self, self.gate_part)
        hooked = isinstance(part, nn.Module) and _runs_more_than_its_forward(part)
        return is_sigmoid(part) and not hooked

    def forward(self, x: Tensor) -> Tensor:
        check_block_input(x, self.channels)
        return fused_cbam_forward(x, operators(self, x, one_grad=True), self, None)[0]


class SpatialHalf(Half):
    """A spatial half: ``pool_order`` (the maps its conv takes: ("mean", "max"), ("max", "mean"),
    or ("mix",) for 0.5·mean + 0.5·max), ``logits(maps) -> [N, 1, H, W]`` (the conv) and
    ``to_gate``."""

    pool_order = ("mean", "max")

    def forward(self, x: Tensor) -> Tensor:
        check_block_input(x)
        return fused_cbam_forward(x, operators(self, x), None, self)[0]


class Parts(nn.Module):
    """The class of the halves in blocks that fused_cbam pickled before each layout's halves had
    their own (c396736 and before): unpickling the block gives them their class back."""


class FusedBlock(GateInspection, nn.Module):
    """What every fused layout shares: the backend, the input checks and the call of the core
    with the layout's two halves (``_halves()``)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    backend = BackendAttribute()
    half_classes: tuple[type, ...] = ()  # the layout's (channel half, spatial half)
    __prepare_scriptable__ = _refuse_scripting

    def _halves(self) -> tuple[ChannelHalf, SpatialHalf | None]:
        raise NotImplementedError

    def __setstate__(self, state: dict) -> None:
        """Also loads a block pickled by fused_cbam before its halves had a class per layout
        (c396736 and before), where ``backend`` was a plain attribute and the halves ``Parts``."""
        if "backend" in state:
            state["_backend"] = state.pop("backend")
        if "keep_gates" in state:  # set on the instance before keep_gates was a property
            state["_keep_gates"] = state.pop("keep_gates")
        super().__setstate__(state)
        for half, half_class in zip(self._halves(), self.half_classes):
            if type(half) is Parts:
                half.__class__ = half_class
        self.backend = self._backend

    def forward(self, x: Tensor) -> Tensor:
        channel, spatial = self._halves()
        check_block_input(x, channel.channels)
        traced = isinstance(x, torch.fx.Proxy)  # FX tracing: the training path, nothing kept
        out = None if traced else self._inference(x)
        if out is None and not traced:
            out = self._training(x)
        if out is not None:
            return out
        out, channel_gate, spatial_gate = fused_cbam_forward(x, operators(self, x, one_grad=True), channel, spatial)
        if not traced:
            self._keep(channel_gate, spatial_gate)
        return out

    def _plain(self, training: bool = False) -> list | None:
        """The arguments of ``cbam_inference`` after x (with ``training``, of ``cbam_training``,
        the BatchNorm module last: ``plain_conv``) when the module is, as configured now, a block
        that operator computes; None otherwise (the default)."""
        return None

    def _operator_args(self, x: Tensor, training: bool = False) -> list | None:
        """``_plain(training)``, where a whole-block operator may stand for the parts: it reads
        their weights directly, so not where a part runs more than its forward (pruning's or
        weight_norm's pre-hooks recompute .weight; hooks), nor for a subclass of a half (which may
        compute its gate otherwise), nor for parameters in another dtype than x (the parts' own
        forward raises, or mixes dtypes, as the original's does; the operator would cast them
        silently). Backward hooks count where a gradient may flow, with ``training``.

        Under autocast (mixed precision), where the parts' linear and conv run in the autocast
        dtype: with x in that dtype (a conv's output under autocast) and the parameters in it or
        in float32 (which autocast converts), the operators compute the block in x's dtype as the
        parts do, to within x's rounding (``cbam_training`` converts the MLP's and the conv's
        parameters as autocast does, ``cbam_inference`` reads them in x's math type). Not with x
        in float32: the operators would run the MLP and the conv in float32 where the parts run
        them in the autocast dtype, a 16-bit rounding apart in a float32 output."""
        if _parts_run_more_than_their_forward(self, backward=training) or any(
            half is not None and type(half) not in self.half_classes for half in self._halves()
        ):
            return None
        args = self._plain(training)
        if args is None:
            return None
        allowed = {x.dtype}
        if torch.is_autocast_enabled(x.device.type):  # (only cpu, cuda get here)
            if x.dtype != torch.get_autocast_dtype(x.device.type):
                return None
            allowed.add(torch.float32)
        return None if any(isinstance(a, Tensor) and a.dtype not in allowed for a in args) else args

    def _training(self, x: Tensor) -> Tensor | None:
        """The whole block in one operator with one autograd node (``cbam_training``, the C++
        backends'), in eager mode: a step records one operator and one node instead of some
        fourteen, with their Python (the module calls, autograd.Function's), and its backward
        fills one gradient of x as ``OneGradBackend`` does. Not with the kept gates; not under
        torch.compile, export or torch.jit.trace, whose graphs keep the three operators and the
        parts; under autocast as ``_operator_args`` says; not in a torch.func transform or with a
        forward-mode tangent (the backend is then the reference). Nothing here needs a gradient:
        with BatchNorm in training mode and none needed, it runs the forward alone."""
        if self.keep_gates or x.numel() == 0 or torch.compiler.is_compiling() or _exporting() or torch.jit.is_tracing():
            return None
        operator = backends.resolve(self.backend, x).cbam_training
        if operator is None:
            return None
        args = self._operator_args(x, training=True)
        if args is None:
            return None
        *args, bn = args
        return operator(x, *args, *batch_norm_step(bn))

    def _inference(self, x: Tensor) -> Tensor | None:
        """The whole block in one operator, when neither a gradient nor the kept gates are needed,
        the parts run nothing but their forward (``_operator_args``, which also says when under
        autocast), and the backend has that operator: x is read from memory once instead of
        three times (its backward recomputes the block in plain PyTorch, for traced graphs)."""
        if self.keep_gates:
            return None
        # In a torch.jit.trace, the module's configuration alone decides, eval mode (the trace's
        # check traces again under no_grad, where x may not require a gradient any more); a
        # traced graph that is differentiated later runs the operator's own backward.
        if torch.jit.is_tracing():
            if self.training:
                return None
        elif torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        operator = backends.resolve(self.backend, x).cbam_inference
        if operator is None:
            return None
        args = self._operator_args(x)
        return None if args is None else operator(x, *args)


def _parts_run_more_than_their_forward(module: nn.Module, backward: bool = False) -> bool:
    """Whether calling a submodule of ``module``, at any depth, runs more than its class's
    forward (``_runs_more_than_its_forward``; backward hooks count with ``backward``, where a
    gradient may flow). A walk without the names that ``modules()`` builds: this runs at every
    call that a whole-block operator may serve."""
    if _global_hooks(backward):
        return True
    parts = list(module._modules.values())
    while parts:
        part = parts.pop()
        if part is None:
            continue
        if _has_own_call(part, backward):
            return True
        parts.extend(part._modules.values())
    return False


def _runs_more_than_its_forward(part: nn.Module) -> bool:
    """Whether calling ``part`` runs more than its class's forward: hooks, forward or backward
    (global ones too), a forward set on the instance (accelerate's offloading wraps it so), a class
    with its own ``__call__``."""
    return _global_hooks(backward=True) or _has_own_call(part, backward=True)


def _global_hooks(backward: bool = False) -> bool:
    hooks = torch.nn.modules.module
    forward = hooks._global_forward_hooks or hooks._global_forward_pre_hooks
    return bool(forward or backward and (hooks._global_backward_hooks or hooks._global_backward_pre_hooks))


_MODULE_CALL, _MODULE_CALL_IMPL = nn.Module.__call__, nn.Module._call_impl


def _has_own_call(part: nn.Module, backward: bool = False) -> bool:
    cls = type(part)
    return bool(
        part._forward_pre_hooks
        or part._forward_hooks
        or backward and (part._backward_hooks or part._backward_pre_hooks)
        or "forward" in part.__dict__
        or cls.__call__ is not _MODULE_CALL
        or cls._call_impl is not _MODULE_CALL_IMPL
    )


def summed(mlp, rows: list[Tensor]) -> Tensor:
    """``sum(mlp(r) for r in rows)`` as one batched call of the shared MLP over the stacked rows.
    Under FX tracing, one call per row, as the original layouts make them: graph-mode
    quantization then observes each pool's values apart (one observer over both stacked pools
    gave a converted timm block three times the original's int8 error)."""
    if len(rows) == 1:
        return mlp(rows[0])
    if isinstance(rows[0], torch.fx.Proxy):
        total = mlp(rows[0])
        for row in rows[1:]:
            total = total + mlp(row)
        return total
    return _sum_of_logits(stacked(mlp, rows))


def _sum_of_logits(logits: Tensor) -> Tensor:
    """The sum over the stacked logits [K, N, C] in their dtype, rounded once as the layouts' ``a +
    b`` rounds it (the dtype given: CUDA autocast would sum in float32, and the gate would then be
    rounded otherwise than the layouts', moving spatial maxima at near ties)."""
    return logits.sum(dim=0, dtype=logits.dtype)


def stacked(mlp, rows: list[Tensor]) -> Tensor:
    """[len(rows), N, C]: ``mlp`` of each row, from one batched call over the stacked rows."""
    return mlp(_autocast.cat(rows, dim=0)).unflatten(0, (len(rows), rows[0].shape[0]))


def pointwise(convs: nn.Module, pooled: Tensor) -> Tensor:
    """An MLP of 1x1 convs applied to [M, C] pooled vectors, as to [M, C, 1, 1] images.
    (``torch.flatten``, not the method: FX int8 quantization treats the function as a shape op
    and keeps the conv's quantized output as it is, where the method's output was quantized
    again before the gate.)"""
    return torch.flatten(convs(pooled[:, :, None, None]), 1)
