"""The whole block without autograd (``cbam_inference``, schema and formulas in csrc/ops.cpp), as
the C++ CUDA operator computes it (csrc/cuda/inference.cu), with the Triton kernels.

x is walked in chunks of samples that take at most half of the GPU's L2 cache, so that the
spatial pooling and the gate, the second and third passes over a chunk, find it there: x comes
from HBM about once instead of three times. Per chunk: the channel pooling kernel; the MLP and
its sigmoid in one ``_mlp_layer_kernel`` launch per layer (rounded as the modules' layers in x's
dtype round); the spatial pooling kernel over x * gate; ``_spatial_gate_kernel`` (the K x K conv
over the two maps, the eval-mode BatchNorm and the sigmoid); the gate kernel writing the chunk's
rows of the output. A group of parameters (the MLP's; the conv's and its BatchNorm's) all in x's
dtype is read as it is, so that a call launches nothing to convert them (another group is
converted to float32 once a call). Under the interpreter (no L2 to size chunks by) a chunk is
two samples, so that CI runs the loop over chunks.
"""

import functools
import os
import re

import torch
import triton
import triton.language as tl

from .._layout import empty_like_x
from ._common import INTERPRET, autotune, cast_to, check_x, config, device_guard, layout
from .channel_pool import channel_pool
from .gate_apply import gate_apply_into
from .spatial_pool import spatial_pool

_INTERPRETER_CHUNK = 2
CHUNK_BYTES_VARIABLE = "FUSED_CBAM_TRITON_CHUNK_BYTES"


@triton.jit
def _spatial_gate_kernel(
    maps_ptr, w_ptr, conv_bias_ptr, bn_mean_ptr, bn_var_ptr, bn_weight_ptr, bn_bias_ptr, gate_ptr,
    H, W, w_mean_offset, w_max_offset, w_stride_y, w_stride_x, half, bn_eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr,
    HAS_BN_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """gate[n, 0, y, x] = sigmoid(bn(conv_KxK([mean, max])[n, y, x])) over the zero-padded maps
    [N, 2, H, W]; the BatchNorm as the affine map it is, after the conv's sum; ``half`` = 0.5 for a
    one-map kernel over 0.5 * mean + 0.5 * max (its weights then serve both maps), else 1."""
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
            q = 2 * n * P + tl.where(valid, yy * W + xx, 0)
            m = tl.load(maps_ptr + q, mask=valid, other=0.0).to(tl.float32)
            mx = tl.load(maps_ptr + P + q, mask=valid, other=0.0).to(tl.float32)
            w_offset = ky * w_stride_y + kx * w_stride_x
            w_mean = tl.load(w_ptr + w_mean_offset + w_offset).to(tl.float32)
            acc += w_mean * m + tl.load(w_ptr + w_max_offset + w_offset).to(tl.float32) * mx
    scale = 1.0
    shift = 0.0
    if HAS_BN:
        scale = 1.0 / tl.sqrt(tl.load(bn_var_ptr).to(tl.float32) + bn_eps)
        shift = -tl.load(bn_mean_ptr).to(tl.float32) * scale
        if HAS_BN_WEIGHT:
            bn_weight = tl.load(bn_weight_ptr).to(tl.float32)
            scale = scale * bn_weight
            shift = shift * bn_weight
        if HAS_BN_BIAS:
            shift = shift + tl.load(bn_bias_ptr).to(tl.float32)
    bias = shift
    if HAS_BIAS:
        bias = tl.load(conv_bias_ptr).to(tl.float32) * scale + shift
    logit = acc * (scale * half) + bias
    gate = 1.0 / (1.0 + tl.exp(-logit))
    tl.store(gate_ptr + n * P + offs, cast_to(gate, gate_ptr), mask=mask)


def _strided_parameter(t, x, shape, name, dtype):
    """A parameter: floating, on x's device, of the expected shape; in ``dtype``, its own strides."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (x's), got {t.device}")
    return t if t.dtype == dtype else t.to(dtype)  # (.to costs a dispatch even when it has nothing to do)


def _parameter(t, x, shape, name, dtype):
    return _strided_parameter(t, x, shape, name, dtype).contiguous()


def _optional(t, x, shape, name, dtype):
    return None if t is None else _parameter(t, x, shape, name, dtype)


def _matrix(t, x, rows, cols, name, dtype):
    """An MLP weight [rows, cols], or a 1x1 conv's [rows, cols, 1, 1], as [rows, cols] in ``dtype``."""
    if t.dim() == 4 and tuple(t.shape[2:]) == (1, 1):
        t = t.flatten(1)
    if tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name}: expected shape [{rows}, {cols}] (or [{rows}, {cols}, 1, 1]), got {list(t.shape)}")
    return _parameter(t, x, (rows, cols), name, dtype)


def _read_dtype(x, *parameters):
    """The dtype the kernels read a group of parameters in: x's when all of them have it (the
    modules' case: nothing to convert, no launch), else float32 (csrc/inference_args.h's rule)."""
    return x.dtype if all(t is None or t.dtype == x.dtype for t in parameters) else torch.float32


@triton.jit
def _mlp_layer_kernel(
    in0_ptr, in1_ptr, w_ptr, b_ptr, out_ptr, S, L, R, POOLS: tl.constexpr, MIX: tl.constexpr,
    HAS_BIAS: tl.constexpr, LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """One layer of the channel MLP, z = W v + b with W [R, L] (and b [R]), for BLOCK_S samples
    and BLOCK_R rows, rounded once to x's dtype as a Linear in x's dtype rounds it. Its input
    vectors, in x's dtype, [S, L] each: in0 and, for POOLS = 2, in1 (the pooled avg and max, or
    the first layer's two halves), or with MIX one vector 0.5 * in0 + 0.5 * in1 rounded to x's
    dtype. out (x's dtype): with LAST, the gate sigmoid(z summed over the pools) [S, R]; else
    relu(z) [POOLS, S, R], the next layer's input (x's dtype loses nothing: z is rounded to it).

    Each product's lane keeps its own running sum over the steps along L, summed across the lanes
    once after the loop: a sum across lanes in every step is 320 shuffles a step that the next
    step waits for (at 4 x 32 x 32, two pools; the operator's own kernels took about 0.18 ms at
    C = 2048 on an H200, by subtraction: benchmarks/NOTES.md, twenty-second session)."""
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    s_mask = s < S
    r_mask = r < R
    v_rows = s.to(tl.int64)[:, None] * L
    lanes0 = tl.zeros([BLOCK_S, BLOCK_R, BLOCK_L], tl.float32)
    lanes1 = tl.zeros([BLOCK_S, BLOCK_R, BLOCK_L], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        l_mask = cols < L
        w = tl.load(w_ptr + r.to(tl.int64)[:, None] * L + cols[None, :], mask=r_mask[:, None] & l_mask[None, :],
                    other=0.0).to(tl.float32)[None, :, :]  # fmt: skip
        v_mask = s_mask[:, None] & l_mask[None, :]
        v0 = tl.load(in0_ptr + v_rows + cols[None, :], mask=v_mask, other=0.0).to(tl.float32)
        if MIX or POOLS == 2:
            v1 = tl.load(in1_ptr + v_rows + cols[None, :], mask=v_mask, other=0.0).to(tl.float32)
            if MIX:
                v0 = cast_to(0.5 * v0 + 0.5 * v1, out_ptr).to(tl.float32)
            else:
                lanes1 += v1[:, None, :] * w
        lanes0 += v0[:, None, :] * w
    acc0 = tl.sum(lanes0, axis=2)
    acc1 = tl.sum(lanes1, axis=2)
    if HAS_BIAS:
        b = tl.load(b_ptr + r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
        acc0 += b
        acc1 += b
    z0 = cast_to(acc0, out_ptr).to(tl.float32)
    z1 = cast_to(acc1, out_ptr).to(tl.float32)
    out_mask = s_mask[:, None] & r_mask[None, :]
    out_offs = s.to(tl.int64)[:, None] * R + r[None, :]
    if LAST:
        if POOLS == 2:
            z0 = cast_to(z0 + z1, out_ptr).to(tl.float32)
        tl.store(out_ptr + out_offs, cast_to(1.0 / (1.0 + tl.exp(-z0)), out_ptr), mask=out_mask)
    else:  # a ReLU that keeps NaN, as torch.relu does
        tl.store(out_ptr + out_offs, cast_to(tl.where(z0 < 0.0, 0.0, z0), out_ptr), mask=out_mask)
        if POOLS == 2:
            tl.store(out_ptr + S * R + out_offs, cast_to(tl.where(z1 < 0.0, 0.0, z1), out_ptr), mask=out_mask)


# The running sums, BLOCK_S * BLOCK_R * BLOCK_L, sit in registers: 4096 of them is 32 a thread
# (per pool) with 4 warps. The smaller blocks give the first layer more programs (at C = 2048 and
# 64 samples, [128, 2048] weights: 64 programs of 4 x 32, or 256 of 2 x 16).
_mlp_layer_tuned = autotune(
    [config(BLOCK_S=4, BLOCK_R=32, BLOCK_L=32, num_warps=4), config(BLOCK_S=8, BLOCK_R=16, BLOCK_L=32, num_warps=4),
     config(BLOCK_S=2, BLOCK_R=64, BLOCK_L=32, num_warps=4), config(BLOCK_S=2, BLOCK_R=16, BLOCK_L=64, num_warps=4),
     config(BLOCK_S=1, BLOCK_R=16, BLOCK_L=128, num_warps=4)],
    config(BLOCK_S=2, BLOCK_R=4, BLOCK_L=8, num_warps=1),
    key=["L", "R", "POOLS", "LAST"],  # not the samples: a new batch size would tune again
)(_mlp_layer_kernel)  # fmt: skip


def _mlp_layer(in0, in1, w, b, out, pools, mix, last):
    s, r, l = in0.shape[0], w.shape[0], w.shape[1]
    # An absent bias's pointer is never read: any tensor stands in for it.
    _mlp_layer_tuned[lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), triton.cdiv(s, meta["BLOCK_S"]))](
        in0, in1, w, w if b is None else b, out, s, l, r, POOLS=pools, MIX=mix, HAS_BIAS=b is not None, LAST=last,
    )  # fmt: skip


def _channel_gate(avg, mx, w1, b1, w2, b2, pooling):
    """The chunk's channel gate [k, C] in x's dtype from its pooled avg and max: sigmoid of
    fc2(relu(fc1(v))) summed over the pooled vectors v (or of fc1(v) without fc2), one launch a
    layer."""
    pools, mix = (2 if pooling == "sum" else 1), pooling == "mix"
    gate = torch.empty_like(avg)
    if w2 is None:
        _mlp_layer(avg, mx, w1, b1, gate, pools, mix, last=True)
        return gate
    hidden = torch.empty(pools, avg.shape[0], w1.shape[0], device=avg.device, dtype=avg.dtype)
    _mlp_layer(avg, mx, w1, b1, hidden, pools, mix, last=False)
    _mlp_layer(hidden[0], hidden[pools - 1], w2, b2, gate, pools, mix=False, last=True)
    return gate


@functools.lru_cache(maxsize=None)
def _l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def _samples_per_chunk(x) -> int:
    """At most half of the L2 cache per chunk of x, at least one sample, and at most the 65535
    programs a CUDA grid's second dimension takes (the spatial gate's grid has one per sample).
    When one sample is already larger than half the L2, no chunk stays there between the passes:
    then chunks are as large as the grid allows, instead of a few launches per sample for nothing.
    ``FUSED_CBAM_TRITON_CHUNK_BYTES`` sets the chunk's bytes instead (0: as large as the grid
    allows), as FUSED_CBAM_CUDA_CHUNK_BYTES does for the CUDA operator, to measure what the
    chunking gains (benchmarks/NOTES.md, nineteenth session); where CUDA's reads any text as a
    number (atoll), this one takes digits only. Under the interpreter, without it, a chunk is two
    samples."""
    chosen = os.environ.get(CHUNK_BYTES_VARIABLE)
    if chosen is None and (INTERPRET or not x.is_cuda):
        return _INTERPRETER_CHUNK
    if chosen is None:
        budget = _l2_bytes(x.device.index or 0) // 2
    elif re.fullmatch(r"\s*[0-9]+\s*", chosen):
        budget = int(chosen)
    else:
        raise ValueError(f"{CHUNK_BYTES_VARIABLE}: expected a whole number of bytes (0: no chunks), got {chosen!r}")
    samples = budget // max(1, x[0].numel() * x.element_size())
    return min(65535, samples if samples >= 1 else 65535)


def _mlp_parameters(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling):
    """The checked MLP in its read dtype: fc1 [hidden, C] and fc2 [C, hidden], or fc1 [C, C] alone
    (as csrc/inference_args.h checks it for the C++ operators)."""
    c = x.shape[1]
    if pooling not in ("avg", "sum", "mix"):
        raise ValueError(f'pooling: expected "avg", "sum" or "mix", got "{pooling}"')
    if fc1_weight.dim() < 2 or fc1_weight.shape[0] == 0:
        raise ValueError(f"fc1_weight: expected shape [hidden, {c}] (or [hidden, {c}, 1, 1]), got {list(fc1_weight.shape)}")
    if fc2_weight is None and fc2_bias is not None:
        raise ValueError("fc2_bias: expected None without fc2_weight")
    hidden = fc1_weight.shape[0] if fc2_weight is not None else c  # without fc2, fc1 maps C -> C
    dtype = _read_dtype(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    w1 = _matrix(fc1_weight, x, hidden, c, "fc1_weight", dtype)
    b1 = _optional(fc1_bias, x, (hidden,), "fc1_bias", dtype)
    if fc2_weight is None:
        return w1, b1, None, None
    return w1, b1, _matrix(fc2_weight, x, c, hidden, "fc2_weight", dtype), _optional(fc2_bias, x, (c,), "fc2_bias", dtype)


def _conv_parameters(x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias):
    """The checked spatial conv [1, maps, K, K] and its scalars in their read dtype; with its
    number of maps and K."""
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
    dtype = _read_dtype(x, conv_weight, *(t for t, _ in scalars))
    # In its own strides: a channels_last model's is not contiguous, and a copy is one more launch.
    weight = _strided_parameter(conv_weight, x, (1, maps, k, k), "conv_weight", dtype)
    return [weight] + [_optional(t, x, (1,), name, dtype) for t, name in scalars], maps, k


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
    with device_guard(x):
        for n0 in range(0, n, chunk):
            xs = x[n0 : n0 + chunk]
            avg, mx, _ = channel_pool(xs)
            g = _channel_gate(avg, mx, w1, b1, w2, b2, pooling)
            h = _spatial_gate(spatial_pool(xs, g)[0], conv, maps, k, bn_eps, max_first)
            gate_apply_into(xs, g, h, out[n0 : n0 + chunk])
    return out


def _spatial_gate(pooled, conv, maps, k, bn_eps, max_first):
    """The spatial gate [rows, 1, H, W] from the [mean, max] maps ``pooled``, over ``maps`` of them."""
    weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias = conv
    rows, _, h, w = pooled.shape
    gate = pooled.new_empty(rows, 1, h, w)
    w_mean_offset = weight.stride(1) if maps == 2 and max_first else 0
    w_max_offset = weight.stride(1) if maps == 2 and not max_first else 0
    block = 64 if INTERPRET else min(256, triton.next_power_of_2(h * w))
    # An absent optional's pointer is never read: any tensor stands in for it.
    _spatial_gate_kernel[(triton.cdiv(h * w, block), rows)](
        pooled, weight, *(weight if t is None else t for t in (conv_bias, bn_mean, bn_var, bn_weight, bn_bias)),
        gate, h, w, w_mean_offset, w_max_offset, weight.stride(2), weight.stride(3), 0.5 if maps == 1 else 1.0,
        float(bn_eps),
        K=k, HAS_BIAS=conv_bias is not None, HAS_BN=bn_var is not None, HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None, BLOCK=block,
    )  # fmt: skip
    return gate
