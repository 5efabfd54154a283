"""The whole block without autograd (``cbam_inference``, schema and formulas in csrc/ops.cpp), as
the C++ CUDA operator computes it (csrc/cuda/inference.cu), with the Triton kernels.

x is walked in chunks of samples that take at most half of the GPU's L2 cache, so that the
spatial pooling and the gate, the second and third passes over a chunk, find it there: x comes
from HBM about once instead of three times. Per chunk: the channel pooling kernel; the MLP with
torch in x's dtype (as the modules compute it); the spatial pooling kernel over x * gate;
``_spatial_gate_kernel`` (the K x K conv over the two maps, the eval-mode BatchNorm and the
sigmoid); the gate kernel writing the chunk's rows of the output. Under the interpreter (no L2
to size chunks by) a chunk is two samples, so that CI runs the loop over chunks.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._layout import empty_like_x
from ._common import INTERPRET, cast_to, check_x, device_guard, layout
from .channel_pool import channel_pool
from .gate_apply import gate_apply_into
from .spatial_pool import spatial_pool

_INTERPRETER_CHUNK = 2


@triton.jit
def _spatial_gate_kernel(
    mean_ptr, max_ptr, w_ptr, conv_bias_ptr, bn_mean_ptr, bn_var_ptr, bn_weight_ptr, bn_bias_ptr, gate_ptr,
    H, W, w_mean_offset, w_max_offset, half, bn_eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr,
    HAS_BN_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """gate[n, 0, y, x] = sigmoid(bn(conv_KxK([mean, max])[n, y, x])) over zero-padded maps; the
    BatchNorm as the affine map it is, after the conv's sum; ``half`` = 0.5 for a one-map kernel
    over 0.5 * mean + 0.5 * max (its weights then serve both maps), else 1."""
    P = H * W
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    y = offs // W
    x = offs % W
    acc = tl.zeros([BLOCK], tl.float32)
    for ky in tl.static_range(K):
        for kx in tl.static_range(K):
            yy = y + (ky - K // 2)
            xx = x + (kx - K // 2)
            valid = mask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            q = n * P + tl.where(valid, yy * W + xx, 0)
            m = tl.load(mean_ptr + q, mask=valid, other=0.0).to(tl.float32)
            mx = tl.load(max_ptr + q, mask=valid, other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + w_mean_offset + ky * K + kx) * m + tl.load(w_ptr + w_max_offset + ky * K + kx) * mx
    scale = 1.0
    shift = 0.0
    if HAS_BN:
        scale = 1.0 / tl.sqrt(tl.load(bn_var_ptr) + bn_eps)
        shift = -tl.load(bn_mean_ptr) * scale
        if HAS_BN_WEIGHT:
            scale = scale * tl.load(bn_weight_ptr)
            shift = shift * tl.load(bn_weight_ptr)
        if HAS_BN_BIAS:
            shift = shift + tl.load(bn_bias_ptr)
    bias = shift
    if HAS_BIAS:
        bias = tl.load(conv_bias_ptr) * scale + shift
    logit = acc * (scale * half) + bias
    gate = 1.0 / (1.0 + tl.exp(-logit))
    tl.store(gate_ptr + n * P + offs, cast_to(gate, gate_ptr), mask=mask)


def _parameter(t, x, shape, name, dtype):
    """A parameter: floating, on x's device, of the expected shape; contiguous in ``dtype``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (x's), got {t.device}")
    return t.to(dtype).contiguous()


def _optional(t, x, shape, name, dtype):
    return None if t is None else _parameter(t, x, shape, name, dtype)


def _matrix(t, x, rows, cols, name):
    """An MLP weight [rows, cols], or a 1x1 conv's [rows, cols, 1, 1], as [rows, cols] in x's dtype."""
    if t.dim() == 4 and tuple(t.shape[2:]) == (1, 1):
        t = t.flatten(1)
    if tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name}: expected shape [{rows}, {cols}] (or [{rows}, {cols}, 1, 1]), got {list(t.shape)}")
    return _parameter(t, x, (rows, cols), name, x.dtype)


def _channel_gate(avg, mx, w1, b1, w2, b2, pooling):
    """The chunk's channel gate [k, C] in x's dtype from its pooled avg and max (autocast off:
    in its dtype the gate would not be one spatial_pool takes)."""
    v = torch.cat([avg, mx]) if pooling == "sum" else avg * 0.5 + mx * 0.5 if pooling == "mix" else avg
    with torch.autocast(v.device.type, enabled=False):
        logits = F.linear(torch.relu(F.linear(v, w1, b1)), w2, b2) if w2 is not None else F.linear(v, w1, b1)
    if pooling == "sum":  # mlp(avg) + mlp(max)
        logits = logits[: avg.shape[0]] + logits[avg.shape[0] :]
    return torch.sigmoid(logits).contiguous()


@functools.lru_cache(maxsize=None)
def _l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def _samples_per_chunk(x) -> int:
    """At most half of the L2 cache per chunk of x, at least one sample, and at most the 65535
    programs a CUDA grid's second dimension takes (the spatial gate's grid has one per sample).
    When one sample is already larger than half the L2, no chunk stays there between the passes:
    then chunks are as large as the grid allows, instead of a few launches per sample for nothing."""
    if INTERPRET or not x.is_cuda:
        return _INTERPRETER_CHUNK
    samples = _l2_bytes(x.device.index or 0) // 2 // max(1, x[0].numel() * x.element_size())
    return min(65535, samples if samples >= 1 else 65535)


def _mlp_parameters(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling):
    """The checked MLP in x's dtype: fc1 [hidden, C] and fc2 [C, hidden], or fc1 [C, C] alone
    (as csrc/inference_args.h checks it for the C++ operators)."""
    c = x.shape[1]
    if pooling not in ("avg", "sum", "mix"):
        raise ValueError(f'pooling: expected "avg", "sum" or "mix", got "{pooling}"')
    if fc1_weight.dim() < 2 or fc1_weight.shape[0] == 0:
        raise ValueError(f"fc1_weight: expected shape [hidden, {c}] (or [hidden, {c}, 1, 1]), got {list(fc1_weight.shape)}")
    if fc2_weight is None and fc2_bias is not None:
        raise ValueError("fc2_bias: expected None without fc2_weight")
    hidden = fc1_weight.shape[0] if fc2_weight is not None else c  # without fc2, fc1 maps C -> C
    w1 = _matrix(fc1_weight, x, hidden, c, "fc1_weight")
    b1 = _optional(fc1_bias, x, (hidden,), "fc1_bias", x.dtype)
    if fc2_weight is None:
        return w1, b1, None, None
    return w1, b1, _matrix(fc2_weight, x, c, hidden, "fc2_weight"), _optional(fc2_bias, x, (c,), "fc2_bias", x.dtype)


def _conv_parameters(x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias):
    """The checked spatial conv [1, maps, K, K] and its scalars, in float32 like the C++
    operators; with its number of maps and K."""
    k = conv_weight.shape[3] if conv_weight.dim() == 4 else 0
    maps = conv_weight.shape[1] if conv_weight.dim() == 4 else 0
    if k % 2 != 1 or maps not in (1, 2):
        raise ValueError(f"conv_weight: expected shape [1, 2, K, K] (or [1, 1, K, K]) with K odd, got {list(conv_weight.shape)}")
    if (bn_mean is None) != (bn_var is None):
        raise ValueError("bn_mean, bn_var: expected both or neither")
    if bn_mean is None and (bn_weight is not None or bn_bias is not None):
        raise ValueError(
            "bn_weight, bn_bias: expected None without bn_mean and bn_var (the running statistics they go with)"
        )
    scalars = ((conv_bias, "conv_bias"), (bn_mean, "bn_mean"), (bn_var, "bn_var"), (bn_weight, "bn_weight"),
               (bn_bias, "bn_bias"))  # fmt: skip
    weight = _parameter(conv_weight, x, (1, maps, k, k), "conv_weight", torch.float32)
    return [weight] + [_optional(t, x, (1,), name, torch.float32) for t, name in scalars], maps, k


def cbam_inference(
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight, conv_bias,
    bn_mean, bn_var, bn_weight, bn_bias, bn_eps, max_first,
):  # fmt: skip
    check_x(x, "cbam_inference")
    n = x.shape[0]
    w1, b1, w2, b2 = _mlp_parameters(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling)
    conv, maps, k = _conv_parameters(x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias)
    x = layout(x)[0]
    out = empty_like_x(x)
    if out.numel() == 0:
        return out
    chunk = _samples_per_chunk(x)
    for n0 in range(0, n, chunk):
        xs = x[n0 : n0 + chunk]
        avg, mx, _ = channel_pool(xs)
        g = _channel_gate(avg, mx, w1, b1, w2, b2, pooling)
        s_mean, s_max, _ = spatial_pool(xs, g)
        gate_apply_into(xs, g, _spatial_gate(s_mean, s_max, conv, maps, k, bn_eps, max_first), out[n0 : n0 + chunk])
    return out


def _spatial_gate(mean, mx, conv, maps, k, bn_eps, max_first):
    weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias = conv
    gate = torch.empty_like(mean)
    rows, _, h, w = mean.shape
    kk = k * k
    w_mean_offset = kk if maps == 2 and max_first else 0
    w_max_offset = kk if maps == 2 and not max_first else 0
    block = 64 if INTERPRET else min(256, triton.next_power_of_2(h * w))
    # An absent optional's pointer is never read: any tensor stands in for it.
    with device_guard(mean):
        _spatial_gate_kernel[(triton.cdiv(h * w, block), rows)](
            mean, mx, weight, *(weight if t is None else t for t in (conv_bias, bn_mean, bn_var, bn_weight, bn_bias)),
            gate, h, w, w_mean_offset, w_max_offset, 0.5 if maps == 1 else 1.0, float(bn_eps),
            K=k, HAS_BIAS=conv_bias is not None, HAS_BN=bn_var is not None, HAS_BN_WEIGHT=bn_weight is not None,
            HAS_BN_BIAS=bn_bias is not None, BLOCK=block,
        )  # fmt: skip
    return gate
