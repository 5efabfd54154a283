// cbam_inference on the GPU: the whole block without autograd, from one dispatcher call.
//
// x is walked in chunks of samples small enough to stay in the L2 cache between the three
// passes over it (channel pooling, spatial pooling, gate), so that x comes from HBM about once
// instead of three times. Per chunk: channel_pool's kernels; the MLP with cuBLAS in x's dtype
// (as the modules compute it); spatial_pool's kernels over x * gate; one kernel for the K x K
// conv over the two maps, the eval-mode BatchNorm and the sigmoid; gate_apply's
// kernel writing the chunk's rows of the output. Nothing is read back to the host, so the
// call never synchronises with the device.
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "../inference_args.h"
#include "common.cuh"
#include "kernels.h"

namespace fused_cbam {
namespace gpu {
namespace {

// The spatial conv's parameters in the accumulation dtype: weight [maps, K, K] and scalars
// (nullptr where absent).
template <typename acc_t>
struct SpatialGateParams {
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* bn_mean;
  const acc_t* bn_var;
  const acc_t* bn_weight;
  const acc_t* bn_bias;
  acc_t bn_eps;
  int maps, K;
  bool max_first;
};

// gate[n, 0, y, x] = sigmoid(bn(conv_KxK(maps)[n, y, x])) over the zero-padded [mean, max]
// maps (each [rows, H, W]), one output pixel per thread. The eval-mode BatchNorm is applied as
// the affine map it is, after the conv's sum (scale * sum + bias); a one-map kernel acts on
// 0.5 * mean + 0.5 * max, i.e. half of it on each map.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    spatial_gate_kernel(const scalar_t* __restrict__ mean, const scalar_t* __restrict__ mx,
                        SpatialGateParams<acc_t> p, int H, int W, int64_t total,
                        scalar_t* __restrict__ gate) {
  acc_t scale = 1, shift = 0;
  if (p.bn_var != nullptr) {
    scale = acc_t(1) / sqrt(p.bn_var[0] + p.bn_eps);
    shift = -p.bn_mean[0] * scale;
    if (p.bn_weight != nullptr) {
      scale *= p.bn_weight[0];
      shift *= p.bn_weight[0];
    }
    if (p.bn_bias != nullptr) shift += p.bn_bias[0];
  }
  const acc_t bias = (p.bias != nullptr ? p.bias[0] : acc_t(0)) * scale + shift;
  if (p.maps == 1) scale *= acc_t(0.5);
  const int KK = p.K * p.K, r = p.K / 2;
  const acc_t* w_mean = p.weight + (p.maps == 2 && p.max_first ? KK : 0);
  const acc_t* w_max = p.weight + (p.maps == 2 && !p.max_first ? KK : 0);
  const int64_t plane = static_cast<int64_t>(H) * W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / plane;
    const int y = static_cast<int>(i % plane / W), x = static_cast<int>(i % W);
    const scalar_t* mean_n = mean + n * plane;
    const scalar_t* max_n = mx + n * plane;
    acc_t sum = 0;
    for (int ky = 0; ky < p.K; ++ky) {
      const int yy = y + ky - r;
      if (yy < 0 || yy >= H) continue;
      for (int kx = 0; kx < p.K; ++kx) {
        const int xx = x + kx - r;
        if (xx < 0 || xx >= W) continue;
        const int64_t q = static_cast<int64_t>(yy) * W + xx;
        const int t = ky * p.K + kx;
        sum += w_mean[t] * static_cast<acc_t>(mean_n[q]) + w_max[t] * static_cast<acc_t>(max_n[q]);
      }
    }
    const acc_t logit = sum * scale + bias;
    gate[i] = static_cast<scalar_t>(acc_t(1) / (acc_t(1) + exp(-logit)));
  }
}

void launch_spatial_gate(const at::Tensor& mean, const at::Tensor& mx,
                         const inference::SpatialConv& conv, double bn_eps, bool max_first,
                         at::Tensor& gate) {
  const int64_t total = gate.numel();
  const int H = static_cast<int>(gate.size(2)), W = static_cast<int>(gate.size(3));
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 65536);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "spatial_gate",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    };
    const SpatialGateParams<acc_t> p{ptr(conv.weight),    ptr(conv.bias),     ptr(conv.bn_mean),
                                     ptr(conv.bn_var),    ptr(conv.bn_weight), ptr(conv.bn_bias),
                                     static_cast<acc_t>(bn_eps), static_cast<int>(conv.maps),
                                     static_cast<int>(conv.K), max_first};
    spatial_gate_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
            mean.const_data_ptr<scalar_t>(), mx.const_data_ptr<scalar_t>(), p, H, W, total,
            gate.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor linear(const at::Tensor& v, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, v, w.t()) : at::mm(v, w.t());
}

// The channel gate of a chunk, [k, C] in x's dtype, from its pooled [k, C] avg and max.
at::Tensor channel_gate(const at::Tensor& avg, const at::Tensor& mx, const inference::Mlp& mlp,
                        c10::string_view pooling) {
  const bool sum = pooling == "sum";
  const at::Tensor v = sum ? at::cat({avg, mx}) : pooling == "mix" ? avg.mul(0.5).add_(mx, 0.5)
                                                                   : avg;
  at::Tensor logits;
  if (mlp.w2.defined()) {
    logits = linear(linear(v, mlp.w1, mlp.b1).relu_(), mlp.w2, mlp.b2);
  } else {
    logits = linear(v, mlp.w1, mlp.b1);
  }
  if (sum) {  // mlp(avg) + mlp(max)
    const int64_t k = avg.size(0);
    logits = logits.narrow(0, 0, k).add(logits.narrow(0, k, k));
  }
  return logits.sigmoid_();
}

// Samples per chunk: x's chunk takes at most half of the L2 cache, whose other half holds the
// output rows the gate writes and the small tensors. When one sample is already larger, no chunk
// stays in L2 between the passes: then the batch is one chunk, rather than about ten launches
// per sample for nothing.
int64_t samples_per_chunk(const at::Tensor& x) {
  int l2 = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, x.device().index()));
  const int64_t sample_bytes = std::max<int64_t>(1, x.numel() / x.size(0) * x.element_size());
  const int64_t samples = static_cast<int64_t>(l2) / 2 / sample_bytes;
  return samples >= 1 ? samples : x.size(0);
}

}  // namespace

at::Tensor cbam_inference(
    const at::Tensor& x_in, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const std::optional<at::Tensor>& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pooling, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const std::optional<at::Tensor>& bn_mean,
    const std::optional<at::Tensor>& bn_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double bn_eps, bool max_first) {
  constexpr const char* op = "fused_cbam::cbam_inference";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Autocast has no kernel for this operator and falls through with its keys still set: the
  // MLP's addmm would then run in the autocast dtype and spatial_pool get a gate in another.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x = dense_x(x_in);
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x: expected at least one channel, got shape ",
                    x.sizes());
  const auto dtype = x.scalar_type();
  const inference::Mlp mlp =
      inference::mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, dtype);
  // The conv's parameters in float (double for double x), like the CPU operator: BatchNorm
  // statistics rounded to bfloat16 would shift the logits where the variance is small.
  const inference::SpatialConv conv =
      inference::spatial_conv(x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
                              at::toOpMathType(dtype));
  at::Tensor out = empty_like_x(x);
  const int64_t N = x.size(0);
  if (out.numel() == 0) return out;
  const int64_t chunk = samples_per_chunk(x);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t k = std::min(chunk, N - n0);
    const at::Tensor xs = x.narrow(0, n0, k);  // dense in x's memory format
    const auto [avg, mx, c_argmax] = channel_pool(xs);
    const at::Tensor g = channel_gate(avg, mx, mlp, pooling);
    const auto [s_mean, s_max, s_argmax] = spatial_pool(xs, g);
    at::Tensor h = at::empty_like(s_mean);
    launch_spatial_gate(s_mean, s_max, conv, bn_eps, max_first, h);
    at::Tensor out_rows = out.narrow(0, n0, k);
    gate_apply_into(xs, g, h, out_rows);
  }
  return out;
}

}  // namespace gpu
}  // namespace fused_cbam
