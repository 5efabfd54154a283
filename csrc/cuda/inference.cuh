// Pieces of cbam_inference's GPU kernels shared by its chunked form (inference.cu) and its
// cluster form (inference_cluster.cu): the spatial gate at one pixel, one warp's rows of an MLP
// layer, and the C++ type a group of parameters is read in. Both forms round where the modules'
// layers in x's dtype round, so they differ only in the order of their float sums.
#pragma once

#include "../inference_args.h"
#include "common.cuh"

namespace fused_cbam {
namespace gpu {

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

template <typename param_t, typename acc_t>
SpatialGateParams<param_t, acc_t> spatial_gate_params(const inference::SpatialConv& conv,
                                                      double bn_eps, bool max_first) {
  const auto ptr = [](const at::Tensor& t) {
    return t.defined() ? t.const_data_ptr<param_t>() : nullptr;
  };
  return {ptr(conv.weight),       conv.weight.stride(1), conv.weight.stride(2),
          conv.weight.stride(3),  ptr(conv.bias),        ptr(conv.bn_mean),
          ptr(conv.bn_var),       ptr(conv.bn_weight),   ptr(conv.bn_bias),
          static_cast<acc_t>(bn_eps), static_cast<int>(conv.maps), static_cast<int>(conv.K),
          max_first};
}

// gate = sigmoid(bn(conv_KxK(maps))) at one pixel of the zero-padded [mean, max] maps. The
// eval-mode BatchNorm is applied as the affine map it is, after the conv's sum (scale * sum +
// bias); a one-map kernel acts on 0.5 * mean + 0.5 * max, i.e. half of it on each map.
template <typename param_t, typename acc_t>
struct SpatialGate {
  const param_t* w_mean;
  const param_t* w_max;
  int64_t w_y, w_x;
  acc_t scale, bias;
  int K;

  __device__ explicit SpatialGate(const SpatialGateParams<param_t, acc_t>& p)
      : w_y(p.w_y), w_x(p.w_x), scale(1), K(p.K) {
    acc_t shift = 0;
    if (p.bn_var != nullptr) {
      scale = acc_t(1) / sqrt(read(p.bn_var) + p.bn_eps);
      shift = -read(p.bn_mean) * scale;
      if (p.bn_weight != nullptr) {
        scale *= read(p.bn_weight);
        shift *= read(p.bn_weight);
      }
      if (p.bn_bias != nullptr) shift += read(p.bn_bias);
    }
    bias = (p.bias != nullptr ? read(p.bias) : acc_t(0)) * scale + shift;
    if (p.maps == 1) scale *= acc_t(0.5);
    w_mean = p.weight + (p.maps == 2 && p.max_first ? p.w_map : 0);
    w_max = p.weight + (p.maps == 2 && !p.max_first ? p.w_map : 0);
  }

  __device__ static acc_t read(const param_t* v) { return static_cast<acc_t>(*v); }

  // The gate at (y, x) of one sample's mean and max planes, [H, W] each.
  template <typename scalar_t>
  __device__ scalar_t operator()(const scalar_t* mean, const scalar_t* max, int H, int W, int y,
                                 int x) const {
    const int r = K / 2;
    acc_t sum = 0;
    for (int ky = 0; ky < K; ++ky) {
      const int yy = y + ky - r;
      if (yy < 0 || yy >= H) continue;
      for (int kx = 0; kx < K; ++kx) {
        const int xx = x + kx - r;
        if (xx < 0 || xx >= W) continue;
        const int q = yy * W + xx;
        const int64_t t = ky * w_y + kx * w_x;
        sum += read(w_mean + t) * static_cast<acc_t>(mean[q]) +
               read(w_max + t) * static_cast<acc_t>(max[q]);
      }
    }
    const acc_t logit = sum * scale + bias;
    return static_cast<scalar_t>(acc_t(1) / (acc_t(1) + exp(-logit)));
  }
};

// One layer of the channel MLP, z = W v + b with W [R, L] (and b [R]), for S samples, rounded
// once to x's dtype as a Linear in x's dtype rounds it. Its input vectors, in x's dtype, [S, L]
// each: in0 and, for POOLS == 2, in1 (the pooled avg and max, or the first layer's two halves),
// or with MIX one vector 0.5 * in0 + 0.5 * in1 rounded to x's dtype. Results: with `last`, the
// gate sigmoid(z summed over the pools) of (sample, row); else relu(z) of (pool, sample, row),
// the next layer's input (x's dtype loses nothing: z is rounded to it already).
template <typename scalar_t, typename param_t>
struct MlpLayer {
  const scalar_t* in0;
  const scalar_t* in1;
  const param_t* w;
  const param_t* b;  // nullptr where absent
  int64_t S;
  int L, R;
  bool last;
};

constexpr int kMlpWarpRows = 2;  // rows a warp takes at once: each input load serves both
constexpr int kMlpSamples = 4;   // samples a warp takes at once: each row load serves all
static_assert(kMlpWarpRows * kMlpSamples <= 32, "a lane writes each (row, sample) result");

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rounded(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// A warp's rows r0 .. r0 + kMlpWarpRows - 1 (those under r_end) of samples s0 .. s0 +
// kMlpSamples - 1 (those under S): each result goes to write(pool, sample, row, value), pool 0
// for the last layer's gate. Lanes stride along L, so that rows and inputs are read coalesced.
// Rows past r_end and samples past S read the last ones' data and are never written, so that a
// step's loads issue together, with no branch between them. A butterfly then gives every lane
// the sums, and lane j * kMlpSamples + i writes row j's result of sample i. Every lane of the
// warp must call it.
template <typename scalar_t, typename param_t, int POOLS, bool MIX, int UNROLL = 2,
          typename Write>
__device__ __forceinline__ void mlp_warp_rows(const MlpLayer<scalar_t, param_t>& a, int r0,
                                              int r_end, int64_t s0, const Write& write) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = static_cast<int>(threadIdx.x % 32);
  int64_t w_row[kMlpWarpRows];
#pragma unroll
  for (int j = 0; j < kMlpWarpRows; ++j) w_row[j] = static_cast<int64_t>(min(r0 + j, r_end - 1)) * a.L;
  int64_t v_row[kMlpSamples];
#pragma unroll
  for (int i = 0; i < kMlpSamples; ++i) v_row[i] = (s0 + i < a.S ? s0 + i : a.S - 1) * a.L;
  acc_t acc[kMlpWarpRows][POOLS][kMlpSamples] = {};
#pragma unroll UNROLL
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
    const acc_t bias = a.b != nullptr ? static_cast<acc_t>(a.b[min(r, r_end - 1)]) : acc_t(0);
#pragma unroll
    for (int i = 0; i < kMlpSamples; ++i) {
      acc_t z[POOLS];
#pragma unroll
      for (int p = 0; p < POOLS; ++p) {  // every lane takes part in the butterflies
        z[p] = rounded<scalar_t>(group_sum(acc[j][p][i], 32) + bias);
      }
      if (lane != j * kMlpSamples + i || r >= r_end || s0 + i >= a.S) continue;
      if (a.last) {
        acc_t logit = z[0];
        if constexpr (POOLS == 2) logit = rounded<scalar_t>(z[0] + z[1]);
        write(0, s0 + i, r, static_cast<scalar_t>(acc_t(1) / (acc_t(1) + exp(-logit))));
      } else {
#pragma unroll
        for (int p = 0; p < POOLS; ++p) {  // a ReLU that keeps NaN, as torch.relu does
          write(p, s0 + i, r, static_cast<scalar_t>(z[p] < 0 ? acc_t(0) : z[p]));
        }
      }
    }
  }
}

// Calls f with a layer's (POOLS, MIX) as constants: its pooled input vectors (2: avg and max,
// each through the layer; 1), and whether the one is the mix 0.5 * avg + 0.5 * max.
template <typename F>
void with_mlp_variant(int pools, bool mix, const F& f) {
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (mix) {
    f(One{}, std::true_type{});
  } else if (pools == 2) {
    f(Two{}, std::false_type{});
  } else {
    f(One{}, std::false_type{});
  }
}

// The whole block in one kernel of thread-block clusters (inference_cluster.cu), asked for with
// FUSED_CBAM_CUDA_INFERENCE=cluster ("chunks" or unset: the chunked form): returns false, having
// launched nothing, where it is not asked for or the device, the dtypes or the shape do not allow
// it. x dense, out like x.
bool cbam_inference_cluster(const at::Tensor& x, const inference::Mlp& mlp,
                            c10::string_view pooling, const inference::SpatialConv& conv,
                            double bn_eps, bool max_first, at::Tensor& out);

}  // namespace gpu
}  // namespace fused_cbam
