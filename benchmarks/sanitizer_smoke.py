"""Run every CUDA kernel of fused_cbam at least once on small inputs, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitizer_smoke.py
    compute-sanitizer --tool racecheck python benchmarks/sanitizer_smoke.py

Covers both memory formats, float32 and bfloat16, every operator (forward and backward
operators, the two that add into a gradient, channel_gate with one and two gradients, and
cbam_inference with and without BatchNorm, 3x3 and 7x7, one and two maps, each MLP variant, a
channels_last conv weight, float32 parameters, chunked and in one kernel of clusters), with and without the optional gates/scale, odd
sizes (scalar paths), a misaligned view (scalar head of the row kernel), the maps' gradients as
channels of one stacked gradient, and one N = 1 input large in H x W, which takes the split-H x
W paths (partials + deterministic second kernel).
Exits non-zero when a result is not finite or has the wrong shape; the sanitizer judges memory.
``--device cpu`` runs the same calls on the CPU operators (CI does, so that a GPU run does not
find this script's own mistakes).
"""

import argparse
import os
import sys

import torch


def _ops():
    from fused_cbam import _library  # loads the compiled library, or says why it could not

    assert _library.LOAD_ERROR is None, _library.LOAD_ERROR
    return torch.ops.fused_cbam


def _make(shape, dtype, fmt, device, misaligned=False):
    n = 1
    for s in shape:
        n *= s
    if misaligned:  # contiguous, but one element past a 16-byte boundary
        x = torch.empty(n + 1, device=device, dtype=dtype)[1:].view(shape)
        x.copy_(torch.randn(shape, device=device))
    else:
        x = torch.randn(shape, device=device).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _finite(name, *tensors):
    for t in tensors:
        if t.numel() and t.is_floating_point() and not torch.isfinite(t).all():
            raise SystemExit(f"sanitizer_smoke: non-finite result from {name}")


def run_case(ops, shape, dtype, fmt, device, misaligned=False):
    x = _make(shape, dtype, fmt, device, misaligned)
    n, c, h, w = shape
    small = dict(device=device, dtype=dtype)
    g = torch.rand(n, c, **small)
    hmap = torch.rand(n, 1, h, w, **small)

    avg, mx, am = ops.channel_pool(x)
    assert avg.shape == (n, c) and am.dtype == torch.int32
    dx = ops.channel_pool_backward(torch.randn(n, c, **small), torch.randn(n, c, **small), am, x)
    _finite("channel_pool", avg, mx, dx)

    # The maps' gradients as the modules pass them: channels of one [N, 2, H, W] gradient, NCHW
    # and channels_last (read in place, with a sample stride and a step).
    maps_grad = torch.randn(n, 2, h, w, **small)
    maps_grads = (maps_grad, maps_grad.contiguous(memory_format=torch.channels_last))
    cases = ((None, maps_grads[0], False), (g, maps_grads[0], True), (g, maps_grads[1], False))
    for scale, grads, max_first in cases:
        pooled, sam = ops.spatial_pool(x, scale, max_first)
        smax, mean = (pooled[:, :1], pooled[:, 1:]) if max_first else (pooled[:, 1:], pooled[:, :1])
        assert pooled.shape == (n, 2, h, w)
        dx, gs = ops.spatial_pool_backward(grads[:, :1], grads[:, 1:], sam, x, scale)
        _finite("spatial_pool", mean, smax, dx, gs)

    for cg, sg in ((g, hmap), (g, None), (None, hmap), (None, None)):
        out = ops.gate_apply(x, cg, sg)
        dx, gg, gh = ops.gate_apply_backward(torch.randn_like(x), x, cg, sg)
        _finite("gate_apply", out, dx, gg, gh)

    grad_x = torch.randn_like(x)
    ops.channel_pool_backward_add(grad_x, torch.randn(n, c, **small), torch.randn(n, c, **small), am)
    for scale in (None, g):
        pooled, sam = ops.spatial_pool(x, scale)
        mean = pooled[:, :1]
        gs = ops.spatial_pool_backward_add(grad_x, torch.randn_like(mean), torch.randn_like(mean), sam, x, scale)
        _finite("*_backward_add", grad_x, gs)
    # The modules' backward: the spatial pooling leaves its mean's share (a channel of the maps'
    # gradient, read in place) to the channel pooling's pass.
    for grads in maps_grads:
        pooled, sam = ops.spatial_pool(x, g)
        gs = ops.spatial_pool_backward_add(grad_x, grads[:, :1], grads[:, 1:], sam, x, g, add_mean=False)
        ops.channel_pool_backward_add(grad_x, torch.randn(n, c, **small), torch.randn(n, c, **small), am, grads[:, :1], g)
        _finite("*_backward_add, the mean's share moved", grad_x, gs)

    for pools, grad_2 in ((2, torch.randn(n, c, **small)), (1, None)):
        gate = ops.channel_gate(torch.randn(pools, n, c, **small))
        grad_logits = ops.channel_gate_backward(torch.randn(n, c, **small), grad_2, gate, pools)
        assert grad_logits.shape == (pools, n, c)
        _finite("channel_gate", gate, grad_logits)

    # cbam_inference in both of its CUDA forms: chunked, and one kernel of clusters (sm_90 on).
    for form in ("chunks", "cluster"):
        os.environ["FUSED_CBAM_CUDA_INFERENCE"] = form
        hidden = max(1, c // 4)
        for k, maps, bn in ((7, 2, True), (3, 1, False)):
            norm = [torch.randn(1, **small), torch.rand(1, **small) + 0.5, torch.randn(1, **small), None] if bn else [None] * 4
            out = ops.cbam_inference(
                x, torch.randn(hidden, c, **small), torch.randn(hidden, **small), torch.randn(c, hidden, **small), None,
                "sum" if maps == 2 else "mix", torch.randn(1, maps, k, k, **small), None, *norm, 1e-5, maps == 2,
            )  # fmt: skip
            _finite("cbam_inference", out)
        # One layer over the mean (ultralytics'), a channels_last conv weight read through its strides,
        # in x's dtype and in float32 (with a bfloat16 x: the kernels' float32 reads)
        for param_dtype in (dtype, torch.float32):
            conv_weight = torch.randn(1, 2, 7, 7, device=device, dtype=param_dtype)
            out = ops.cbam_inference(
                x, torch.randn(c, c, device=device, dtype=param_dtype), torch.randn(c, device=device, dtype=param_dtype),
                None, None, "avg", conv_weight.contiguous(memory_format=torch.channels_last), None, None, None, None,
                None, 0.0, False,
            )  # fmt: skip
            _finite("cbam_inference", out)
    del os.environ["FUSED_CBAM_CUDA_INFERENCE"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = parser.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitizer_smoke: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    ops = _ops()
    cases = 0
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in ("contiguous", "channels_last"):
            run_case(ops, (2, 16, 7, 7), dtype, fmt, device)  # odd H x W: scalar tile paths, row head/tail
            run_case(ops, (2, 32, 8, 8), dtype, fmt, device)  # 16-byte vector paths
            run_case(ops, (2, 3, 5, 6), dtype, fmt, device)  # C not a multiple of the vector width
            run_case(ops, (1, 4, 256, 256), dtype, fmt, device)  # N = 1, large H x W: split paths
            cases += 4
        run_case(ops, (2, 16, 8, 8), dtype, "contiguous", device, misaligned=True)
        cases += 1
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer_smoke: OK ({cases} cases on {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
