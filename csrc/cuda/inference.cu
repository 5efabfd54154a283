// cbam_inference on the GPU: the whole block without autograd, from one dispatcher call.
//
// x is walked in chunks of samples small enough to stay in the L2 cache between the three
// passes over it (channel pooling, spatial pooling, gate), so that x comes from HBM about once
// instead of three times. Per chunk: channel_pool's kernels; the MLP and its sigmoid, one
// mlp_layer_kernel a layer (rounded as the modules' layers in x's dtype round); spatial_pool's
// kernels over x * gate; one kernel for the K x K conv over the two maps, the eval-mode
// BatchNorm and the sigmoid; gate_apply's kernel writing the chunk's rows of the output. The
// parameters are read in their own dtype where it is x's (inference::read_dtype), so that a call
// launches nothing to convert them. Nothing is read back to the host, so the call never
// synchronises with the device.
#include <ATen/ops/empty_like.h>

#include <cstdlib>
#include <type_traits>

#include "inference.cuh"
#include "kernels.h"

namespace fused_cbam {
namespace gpu {
namespace {

// gate[n, 0, y, x] of the [mean, max] maps ([rows, 2, H, W]), one output pixel per thread.
template <typename scalar_t, typename param_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    spatial_gate_kernel(const scalar_t* __restrict__ maps, SpatialGateParams<param_t, acc_t> p,
                        int H, int W, int64_t total,
                        scalar_t* __restrict__ gate) {
  const SpatialGate<param_t, acc_t> at_pixel(p);
  const int64_t plane = static_cast<int64_t>(H) * W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / plane;
    const int y = static_cast<int>(i % plane / W), x = static_cast<int>(i % W);
    const scalar_t* mean_n = maps + 2 * n * plane;
    gate[i] = at_pixel(mean_n, mean_n + plane, H, W, y, x);
  }
}

void launch_spatial_gate(const at::Tensor& maps, const inference::SpatialConv& conv,
                         double bn_eps, bool max_first, at::Tensor& gate) {
  const int64_t total = gate.numel();
  const int H = static_cast<int>(gate.size(2)), W = static_cast<int>(gate.size(3));
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 65536);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "spatial_gate",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto param_type) {
      using param_t = decltype(param_type);
      const auto p = spatial_gate_params<param_t, acc_t>(conv, bn_eps, max_first);
      spatial_gate_kernel<scalar_t, param_t, acc_t>
          <<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
              maps.const_data_ptr<scalar_t>(), p, H, W, total, gate.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_read_type<scalar_t>(conv.weight, launch);
  });
}

// One layer for the S samples of a chunk into out ([pools, S, R] hidden, or the gate [S, R]).
// A block takes kMlpRows rows; blocks stride over the samples (gridDim.y is at most 65535). Two
// blocks an SM leave ptxas registers enough (60-80) to issue all of a step's loads before its
// first multiply-add; at 64, half of them waited.
constexpr int kMlpRows = kThreads / 32 * kMlpWarpRows;  // rows a block takes

template <typename scalar_t, typename param_t, int POOLS, bool MIX>
__global__ void __launch_bounds__(kThreads, 2)
    mlp_layer_kernel(MlpLayer<scalar_t, param_t> a, scalar_t* __restrict__ out) {
  const int r0 = static_cast<int>(blockIdx.x) * kMlpRows +
                 static_cast<int>(threadIdx.x / 32) * kMlpWarpRows;
  if (r0 >= a.R) return;  // warp-uniform, and the kernel has no block-wide barrier
  const auto write = [&](int pool, int64_t s, int r, scalar_t v) {
    out[pool * a.S * a.R + s * a.R + r] = v;
  };
  for (int64_t s0 = static_cast<int64_t>(blockIdx.y) * kMlpSamples; s0 < a.S;
       s0 += static_cast<int64_t>(gridDim.y) * kMlpSamples) {
    mlp_warp_rows<scalar_t, param_t, POOLS, MIX>(a, r0, a.R, s0, write);
  }
}

// Launches one layer over in0 (and in1), [S, L] each in x's dtype, into out: the hidden layer
// [pools, S, R] or, for the last layer, the gate [S, R].
void launch_mlp_layer(const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& w,
                      const at::Tensor& b, int pools, bool mix, bool last, at::Tensor& out) {
  const int64_t S = in0.size(0);
  const int R = static_cast<int>(w.size(0)), L = static_cast<int>(w.size(1));
  const dim3 grid(static_cast<unsigned>(ceil_div(R, kMlpRows)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(S, kMlpSamples), 65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in0.scalar_type(), "mlp_layer", [&] {
    const auto launch = [&](auto param_type, auto pools_c, auto mix_c) {
      using param_t = decltype(param_type);
      const MlpLayer<scalar_t, param_t> a{in0.const_data_ptr<scalar_t>(),
                                          in1.const_data_ptr<scalar_t>(),
                                          w.const_data_ptr<param_t>(),
                                          b.defined() ? b.const_data_ptr<param_t>() : nullptr,
                                          S, L, R, last};
      mlp_layer_kernel<scalar_t, param_t, decltype(pools_c)::value, decltype(mix_c)::value>
          <<<grid, kThreads, 0, current_stream()>>>(a, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const auto variant = [&](auto param_type) {
      with_mlp_variant(pools, mix,
                       [&](auto pools_c, auto mix_c) { launch(param_type, pools_c, mix_c); });
    };
    with_read_type<scalar_t>(w, variant);
  });
}

// The channel gate of a chunk, [k, C] in x's dtype, from its pooled [k, C] avg and max: sigmoid
// of fc2(relu(fc1(v))) summed over the pooled vectors v (or of fc1(v) without fc2).
at::Tensor channel_gate(const at::Tensor& avg, const at::Tensor& mx, const inference::Mlp& mlp,
                        c10::string_view pooling) {
  const int pools = pooling == "sum" ? 2 : 1;
  const bool mix = pooling == "mix";
  at::Tensor gate = at::empty_like(avg);
  if (!mlp.w2.defined()) {
    launch_mlp_layer(avg, mx, mlp.w1, mlp.b1, pools, mix, /*last=*/true, gate);
    return gate;
  }
  at::Tensor hidden = at::empty({pools, avg.size(0), mlp.w1.size(0)}, avg.options());
  launch_mlp_layer(avg, mx, mlp.w1, mlp.b1, pools, mix, /*last=*/false, hidden);
  launch_mlp_layer(hidden[0], hidden[pools - 1], mlp.w2, mlp.b2, pools, /*mix=*/false,
                   /*last=*/true, gate);
  return gate;
}

// Samples per chunk: x's chunk takes at most half of the L2 cache, whose other half holds the
// output rows the gate writes and the small tensors. When one sample is already larger, no chunk
// stays in L2 between the passes: then the batch is one chunk, rather than about ten launches
// per sample for nothing. FUSED_CBAM_CUDA_CHUNK_BYTES sets the chunk's bytes instead (0: the
// whole batch), to measure what the chunking gains (benchmarks/NOTES.md, nineteenth session).
int64_t samples_per_chunk(const at::Tensor& x) {
  int64_t budget = 0;
  if (const char* bytes = std::getenv("FUSED_CBAM_CUDA_CHUNK_BYTES")) {
    budget = std::atoll(bytes);
    if (budget <= 0) return x.size(0);
  } else {
    int l2 = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, x.device().index()));
    budget = static_cast<int64_t>(l2) / 2;
  }
  const int64_t sample_bytes = std::max<int64_t>(1, x.numel() / x.size(0) * x.element_size());
  const int64_t samples = budget / sample_bytes;
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
  const at::Tensor x = dense_x(x_in);
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x: expected at least one channel, got shape ",
                    x.sizes());
  const inference::Mlp mlp =
      inference::mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling,
                     inference::read_dtype(x, {fc1_weight, fc1_bias, fc2_weight, fc2_bias}));
  // Parameters in another dtype than x's are read in float (double for double x), like the CPU
  // operator: BatchNorm statistics rounded to bfloat16 would shift the logits where the
  // variance is small.
  const inference::SpatialConv conv = inference::spatial_conv(
      x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
      inference::read_dtype(x, {conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias}));
  at::Tensor out = empty_like_x(x);
  const int64_t N = x.size(0);
  if (out.numel() == 0) return out;
  if (cbam_inference_cluster(x, mlp, pooling, conv, bn_eps, max_first, out)) return out;
  const int64_t chunk = samples_per_chunk(x);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t k = std::min(chunk, N - n0);
    const at::Tensor xs = x.narrow(0, n0, k);  // dense in x's memory format
    const auto [avg, mx, c_argmax] = channel_pool(xs);
    const at::Tensor g = channel_gate(avg, mx, mlp, pooling);
    const auto [maps, s_argmax] = spatial_pool(xs, g, /*max_first=*/false);
    at::Tensor h = at::empty({k, 1, x.size(2), x.size(3)}, x.options());
    launch_spatial_gate(maps, conv, bn_eps, max_first, h);
    at::Tensor out_rows = out.narrow(0, n0, k);
    gate_apply_into(xs, g, h, out_rows);
  }
  return out;
}

}  // namespace gpu
}  // namespace fused_cbam
