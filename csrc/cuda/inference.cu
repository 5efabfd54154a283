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

#include "../inference_args.h"
#include "common.cuh"
#include "kernels.h"

namespace fused_cbam {
namespace gpu {
namespace {

// The spatial conv's parameters in their read dtype: weight [maps, K, K] in its strides
// (elements) and scalars (nullptr where absent).
template <typename param_t, typename acc_t>
struct SpatialGateParams {
  const param_t* weight;
  int64_t w_map, w_y, w_x;
  const param_t* bias;
  const param_t* bn_mean;
  const param_t* bn_var;
  const param_t* bn_weight;
  const param_t* bn_bias;
  acc_t bn_eps;
  int maps, K;
  bool max_first;
};

// Calls f with a value of the C++ type a group of parameters is read in (the group converted by
// inference::read_dtype, `parameter` one of it): x's scalar_t, or its math type.
template <typename scalar_t, typename F>
void with_read_type(const at::Tensor& parameter, const F& f) {
  if (parameter.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else {
    f(at::opmath_type<scalar_t>{});
  }
}

// gate[n, 0, y, x] = sigmoid(bn(conv_KxK(maps)[n, y, x])) over the zero-padded [mean, max]
// maps ([rows, 2, H, W]), one output pixel per thread. The eval-mode BatchNorm is applied as
// the affine map it is, after the conv's sum (scale * sum + bias); a one-map kernel acts on
// 0.5 * mean + 0.5 * max, i.e. half of it on each map.
template <typename scalar_t, typename param_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    spatial_gate_kernel(const scalar_t* __restrict__ maps, SpatialGateParams<param_t, acc_t> p,
                        int H, int W, int64_t total,
                        scalar_t* __restrict__ gate) {
  const auto read = [](const param_t* v) { return static_cast<acc_t>(*v); };
  acc_t scale = 1, shift = 0;
  if (p.bn_var != nullptr) {
    scale = acc_t(1) / sqrt(read(p.bn_var) + p.bn_eps);
    shift = -read(p.bn_mean) * scale;
    if (p.bn_weight != nullptr) {
      scale *= read(p.bn_weight);
      shift *= read(p.bn_weight);
    }
    if (p.bn_bias != nullptr) shift += read(p.bn_bias);
  }
  const acc_t bias = (p.bias != nullptr ? read(p.bias) : acc_t(0)) * scale + shift;
  if (p.maps == 1) scale *= acc_t(0.5);
  const int r = p.K / 2;
  const param_t* w_mean = p.weight + (p.maps == 2 && p.max_first ? p.w_map : 0);
  const param_t* w_max = p.weight + (p.maps == 2 && !p.max_first ? p.w_map : 0);
  const int64_t plane = static_cast<int64_t>(H) * W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / plane;
    const int y = static_cast<int>(i % plane / W), x = static_cast<int>(i % W);
    const scalar_t* mean_n = maps + 2 * n * plane;
    const scalar_t* max_n = mean_n + plane;
    acc_t sum = 0;
    for (int ky = 0; ky < p.K; ++ky) {
      const int yy = y + ky - r;
      if (yy < 0 || yy >= H) continue;
      for (int kx = 0; kx < p.K; ++kx) {
        const int xx = x + kx - r;
        if (xx < 0 || xx >= W) continue;
        const int64_t q = static_cast<int64_t>(yy) * W + xx;
        const int64_t t = ky * p.w_y + kx * p.w_x;
        sum += read(w_mean + t) * static_cast<acc_t>(mean_n[q]) +
               read(w_max + t) * static_cast<acc_t>(max_n[q]);
      }
    }
    const acc_t logit = sum * scale + bias;
    gate[i] = static_cast<scalar_t>(acc_t(1) / (acc_t(1) + exp(-logit)));
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
      const auto ptr = [](const at::Tensor& t) {
        return t.defined() ? t.const_data_ptr<param_t>() : nullptr;
      };
      const SpatialGateParams<param_t, acc_t> p{
          ptr(conv.weight),    conv.weight.stride(1),      conv.weight.stride(2),
          conv.weight.stride(3), ptr(conv.bias),           ptr(conv.bn_mean),
          ptr(conv.bn_var),    ptr(conv.bn_weight),        ptr(conv.bn_bias),
          static_cast<acc_t>(bn_eps), static_cast<int>(conv.maps), static_cast<int>(conv.K),
          max_first};
      spatial_gate_kernel<scalar_t, param_t, acc_t>
          <<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
              maps.const_data_ptr<scalar_t>(), p, H, W, total, gate.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_read_type<scalar_t>(conv.weight, launch);
  });
}

// One layer of the channel MLP, z = W v + b with W [R, L] (and b [R]), for the S samples of a
// chunk, rounded once to x's dtype as a Linear in x's dtype rounds it. Its input vectors, in x's
// dtype, [S, L] each: in0 and, for POOLS == 2, in1 (the pooled avg and max, or the first layer's
// two halves), or with MIX one vector 0.5 * in0 + 0.5 * in1 rounded to x's dtype. out: with
// `last`, the gate sigmoid(z summed over the pools) [S, R]; else relu(z) [POOLS, S, R], the next
// layer's input (x's dtype loses nothing: z is rounded to it already).
template <typename scalar_t, typename param_t>
struct MlpLayer {
  const scalar_t* in0;
  const scalar_t* in1;
  const param_t* w;
  const param_t* b;  // nullptr where absent
  scalar_t* out;
  int64_t S;
  int L, R;
  bool last;
};

constexpr int kMlpWarpRows = 2;  // rows a warp takes at once: each input load serves both
constexpr int kMlpSamples = 4;   // samples a block takes: each row load serves all of them
constexpr int kMlpRows = kThreads / 32 * kMlpWarpRows;  // rows a block takes
static_assert(kMlpWarpRows * kMlpSamples <= 32, "a lane writes each (row, sample) result");

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rounded(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// Lanes stride along L, so that rows and inputs are read coalesced. A warp's rows past R and a
// block's samples past S read the last ones' data and are never written, so that a step's loads
// issue together, with no branch between them. A butterfly then gives every lane the sums, and
// lane j * kMlpSamples + i writes row j's result of sample i. Blocks stride over the samples
// (gridDim.y is at most 65535). Two blocks an SM leave ptxas registers enough (60-80) to issue
// all of a step's loads before its first multiply-add; at 64, half of them waited.
template <typename scalar_t, typename param_t, int POOLS, bool MIX>
__global__ void __launch_bounds__(kThreads, 2) mlp_layer_kernel(MlpLayer<scalar_t, param_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int r0 = static_cast<int>(blockIdx.x) * kMlpRows +
                 static_cast<int>(threadIdx.x / 32) * kMlpWarpRows;
  if (r0 >= a.R) return;  // warp-uniform, and the kernel has no block-wide barrier
  int64_t w_row[kMlpWarpRows];
#pragma unroll
  for (int j = 0; j < kMlpWarpRows; ++j) w_row[j] = static_cast<int64_t>(min(r0 + j, a.R - 1)) * a.L;
  for (int64_t s0 = static_cast<int64_t>(blockIdx.y) * kMlpSamples; s0 < a.S;
       s0 += static_cast<int64_t>(gridDim.y) * kMlpSamples) {
    int64_t v_row[kMlpSamples];
#pragma unroll
    for (int i = 0; i < kMlpSamples; ++i) v_row[i] = (s0 + i < a.S ? s0 + i : a.S - 1) * a.L;
    acc_t acc[kMlpWarpRows][POOLS][kMlpSamples] = {};
#pragma unroll 2
    for (int l = lane; l < a.L; l += 32) {
      acc_t w[kMlpWarpRows];
#pragma unroll
      for (int j = 0; j < kMlpWarpRows; ++j) w[j] = static_cast<acc_t>(a.w[w_row[j] + l]);
#pragma unroll
      for (int i = 0; i < kMlpSamples; ++i) {
        acc_t v[POOLS];
        v[0] = static_cast<acc_t>(a.in0[v_row[i] + l]);
        if constexpr (MIX) {
          v[0] = rounded<scalar_t>(acc_t(0.5) * v[0] +
                                   acc_t(0.5) * static_cast<acc_t>(a.in1[v_row[i] + l]));
        } else if constexpr (POOLS == 2) {
          v[1] = static_cast<acc_t>(a.in1[v_row[i] + l]);
        }
#pragma unroll
        for (int j = 0; j < kMlpWarpRows; ++j) {
#pragma unroll
          for (int p = 0; p < POOLS; ++p) acc[j][p][i] += w[j] * v[p];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kMlpWarpRows; ++j) {
      const int r = r0 + j;
      const acc_t bias = a.b != nullptr ? static_cast<acc_t>(a.b[min(r, a.R - 1)]) : acc_t(0);
#pragma unroll
      for (int i = 0; i < kMlpSamples; ++i) {
        acc_t z[POOLS];
#pragma unroll
        for (int p = 0; p < POOLS; ++p) {  // every lane takes part in the butterflies
          z[p] = rounded<scalar_t>(group_sum(acc[j][p][i], 32) + bias);
        }
        if (lane != j * kMlpSamples + i || r >= a.R || s0 + i >= a.S) continue;
        const int64_t o = (s0 + i) * a.R + r;
        if (a.last) {
          acc_t logit = z[0];
          if constexpr (POOLS == 2) logit = rounded<scalar_t>(z[0] + z[1]);
          a.out[o] = static_cast<scalar_t>(acc_t(1) / (acc_t(1) + exp(-logit)));
        } else {
#pragma unroll
          for (int p = 0; p < POOLS; ++p) {  // a ReLU that keeps NaN, as torch.relu does
            a.out[p * a.S * a.R + o] = static_cast<scalar_t>(z[p] < 0 ? acc_t(0) : z[p]);
          }
        }
      }
    }
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
                                          out.mutable_data_ptr<scalar_t>(),
                                          S, L, R, last};
      mlp_layer_kernel<scalar_t, param_t, decltype(pools_c)::value, decltype(mix_c)::value>
          <<<grid, kThreads, 0, current_stream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const auto variant = [&](auto param_type) {
      using One = std::integral_constant<int, 1>;
      using Two = std::integral_constant<int, 2>;
      if (mix) {
        launch(param_type, One{}, std::true_type{});
      } else if (pools == 2) {
        launch(param_type, Two{}, std::false_type{});
      } else {
        launch(param_type, One{}, std::false_type{});
      }
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
