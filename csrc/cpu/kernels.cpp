// CPU kernels of the fused_cbam operators. This file is compiled once per CPU capability with
// CPU_CAPABILITY set (setup.py), so at::vec::Vectorized maps to AVX2/AVX512 code where built.
//
// Layout: NCHW kernels walk (n, c) rows of P = H * W contiguous elements; channels_last (NHWC)
// kernels walk (n, p) rows of C contiguous elements. Arithmetic is in opmath (float for 16-bit
// floats), rounded once into the output. Every reduction has a fixed order that does not
// depend on the number of threads, so results are bitwise reproducible.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fused_cbam::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
template <typename T>
using opmath_t = at::opmath_type<T>;
template <typename T>
using OpVec = Vectorized<opmath_t<T>>;

// Channels handled by one NHWC task, and pixels by one NCHW spatial-pool or NHWC backward task.
constexpr int64_t kBlockC = 256;
constexpr int64_t kBlockP = 1024;
// Long sums: each float accumulator takes at most kSumBlock terms, then its sum is added into a
// double. One float accumulator over a long reduction stops growing once its terms fall below
// half an ulp of the sum (2^25 ones averaged to 0.5; 2.5e-5 relative error at 1024 x 1024), and
// its error grows with its length (27 ulps after 4000 terms). NHWC pooling also tracks
// positions in float lanes per block of pixels (exact below 2^24).
constexpr int64_t kSumBlock = 256;
// Contiguous rows are summed in blocks of this many values (at most 256 per vector lane).
constexpr int64_t kRowBlock = 4096;

// Adds n float partial sums into their double totals and restarts them (every kSumBlock terms).
template <typename S>
inline void fold(double* total, S* partial, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    total[i] += partial[i];
    partial[i] = 0;
  }
}
// Rows of at most this many vectors are searched for their arg-max without an early exit.
constexpr int64_t kShortScan = 8;

inline int64_t grain_for_row(int64_t row_length) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_length, 1));
}

template <typename T>
inline OpVec<T> load_opmath(const T* p) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  } else {
    return Vectorized<T>::loadu(p);
  }
}

template <typename T>
inline void store_opmath(const OpVec<T>& v, T* p) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, OpVec<T>::size());
  } else {
    v.store(p);
  }
}

// Does v replace the running maximum m? Larger wins, the first NaN wins, ties keep m.
template <typename S>
inline bool takes_over(S v, S m) {
  return v > m || (v != v && m == m);
}
template <typename S>
inline Vectorized<S> takes_over(const Vectorized<S>& v, const Vectorized<S>& m) {
  return (v > m) | (v.isnan() & (m == m));
}

// v rounded to T, as a value the modules hold in x's dtype (the identity for float and double).
template <typename T>
inline opmath_t<T> rounded(opmath_t<T> v) {
  return static_cast<opmath_t<T>>(static_cast<T>(v));
}

template <typename S>
inline Vectorized<S> sigmoid(const Vectorized<S>& v) {
  return (Vectorized<S>(S(1)) + v.neg().exp()).reciprocal();
}

template <typename S>
inline S reduce_sum(const Vectorized<S>& v) {
  return at::vec::vec_reduce_all<S>([](auto a, auto b) { return a + b; }, v);
}

template <typename S>
inline S reduce_max(const Vectorized<S>& v) {
  return at::vec::vec_reduce_all<S>([](auto a, auto b) { return at::vec::maximum(a, b); }, v);
}

// Lowest index i < length whose value equals m (the first NaN when m is NaN); the values come
// from vec_at(i) (a vector of OpVec size) and scalar_at(i).
template <typename Vec, typename S, typename VecAt, typename ScalarAt>
int64_t first_index_of(int64_t length, S m, const VecAt& vec_at, const ScalarAt& scalar_at) {
  constexpr int64_t V = Vec::size();
  const bool find_nan = m != m;
  const Vec target(m);
  int64_t i = 0;
  if (length <= kShortScan * V) {
    // A short row is scanned whole, without a data-dependent exit: where the maximum lies is
    // random, and such an exit costs a branch miss per row, more than the few extra vectors.
    // Lane indices are exact in S (length < 2^24).
    const Vec none(static_cast<S>(length));
    Vec lanes = Vec::arange(0, 1);
    Vec first = none;
    for (; i + V <= length; i += V, lanes = lanes + Vec(static_cast<S>(V))) {
      const Vec v = vec_at(i);
      const Vec hits = find_nan ? v.isnan() : (v == target);
      first = at::vec::minimum(first, Vec::blendv(none, lanes, hits));
    }
    const S found =
        at::vec::vec_reduce_all<S>([](auto a, auto b) { return at::vec::minimum(a, b); }, first);
    if (found < static_cast<S>(length)) return static_cast<int64_t>(found);
  } else {
    for (; i + V <= length; i += V) {
      const Vec v = vec_at(i);
      const int misses = (find_nan ? v.isnan() : (v == target)).zero_mask();
      if (misses != (1 << V) - 1) return i + __builtin_ctz(~misses);
    }
  }
  for (; i < length; ++i) {
    const S v = scalar_at(i);
    if (find_nan ? v != v : v == m) return i;
  }
  return 0;
}

template <typename S>
struct RowStats {
  S sum;
  S max;
  int64_t argmax;
};

// Sum and maximum (NaN wins) of the values [i0, i1) of a row, as row_stats reads them.
template <typename Vec, typename S, typename VecAt, typename ScalarAt>
std::pair<S, S> block_stats(int64_t i0, int64_t i1, const VecAt& vec_at, const ScalarAt& scalar_at) {
  constexpr int64_t V = Vec::size();
  S sum = 0;
  S m = scalar_at(i0);
  int64_t i = i0;
  if (i1 - i0 >= V) {
    Vec vsum = vec_at(i0);
    Vec vmax = vsum;
    i = i0 + V;
    if (i1 - i0 >= 2 * V) {
      Vec vsum1 = vec_at(i0 + V);
      Vec vmax1 = vsum1;
      for (i = i0 + 2 * V; i + 2 * V <= i1; i += 2 * V) {
        const Vec v0 = vec_at(i);
        const Vec v1 = vec_at(i + V);
        vsum = vsum + v0;
        vsum1 = vsum1 + v1;
        vmax = at::vec::maximum(vmax, v0);
        vmax1 = at::vec::maximum(vmax1, v1);
      }
      vsum = vsum + vsum1;
      vmax = at::vec::maximum(vmax, vmax1);
    }
    for (; i + V <= i1; i += V) {
      const Vec v = vec_at(i);
      vsum = vsum + v;
      vmax = at::vec::maximum(vmax, v);
    }
    sum = reduce_sum(vsum);
    m = reduce_max(vmax);
  }
  for (; i < i1; ++i) {
    const S v = scalar_at(i);
    sum += v;
    if (takes_over(v, m)) m = v;
  }
  return {sum, m};
}

// Sum, maximum (NaN wins) and first position of the maximum (when kArgmax) of one contiguous
// row of `length` values, read through vec_at / scalar_at as in first_index_of. The vector loop
// keeps two independent chains each for the sum and the max: one chain waits on the latency of
// its adds instead of keeping the load ports busy. Blocks of kRowBlock values are summed apart
// and added in double. The arg-max search reads the row again, from L1.
template <typename Vec, typename S, bool kArgmax = true, typename VecAt, typename ScalarAt>
RowStats<S> row_stats(int64_t length, const VecAt& vec_at, const ScalarAt& scalar_at) {
  double sum = 0;
  S m = 0;
  for (int64_t i0 = 0; i0 < length; i0 += kRowBlock) {
    const auto [block_sum, block_max] =
        block_stats<Vec, S>(i0, std::min(length, i0 + kRowBlock), vec_at, scalar_at);
    sum += block_sum;
    if (i0 == 0 || takes_over(block_max, m)) m = block_max;
  }
  if constexpr (kArgmax) {
    // The maximum read back at its index: among tied zeros the vector maximum may hold either
    // sign, and torch.max returns the first one's.
    const int64_t at = first_index_of<Vec>(length, m, vec_at, scalar_at);
    return {static_cast<S>(sum), scalar_at(at), at};
  } else {
    return {static_cast<S>(sum), m, 0};
  }
}

// ---------------------------------------------------------------------------------------------
// channel_pool: mean, max and arg-max of every (n, c) over the P pixels.

template <typename T>
void channel_pool_nchw(const T* x, T* avg, T* max, int32_t* argmax, int64_t rows, int64_t P) {
  using acc_t = opmath_t<T>;
  at::parallel_for(0, rows, grain_for_row(P), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * P;
      const auto stats = row_stats<OpVec<T>, acc_t>(
          P, [&](int64_t p) { return load_opmath(row + p); },
          [&](int64_t p) { return static_cast<acc_t>(row[p]); });
      avg[r] = static_cast<T>(stats.sum / P);
      max[r] = static_cast<T>(stats.max);
      argmax[r] = static_cast<int32_t>(stats.argmax);
    }
  });
}

template <typename T>
void channel_pool_nhwc(
    const T* x, T* avg, T* max, int32_t* argmax, int64_t N, int64_t C, int64_t P) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  const int64_t blocks = (C + kBlockC - 1) / kBlockC;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(kBlockC), span_max(kBlockC), span_pos(kBlockC), best(kBlockC);
    std::vector<double> total(kBlockC);
    std::vector<int64_t> best_pos(kBlockC);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = (task % blocks) * kBlockC;
      const int64_t cn = std::min(kBlockC, C - c0);
      const T* base = x + n * P * C + c0;
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t p0 = 0; p0 < P; p0 += kSumBlock) {
        const int64_t p1 = std::min(P, p0 + kSumBlock);
        for (int64_t c = 0; c < cn; ++c) {
          sum[c] = 0;
          span_max[c] = base[p0 * C + c];
          span_pos[c] = 0;
        }
        for (int64_t p = p0; p < p1; ++p) {
          const T* row = base + p * C;
          const Vec pos(static_cast<acc_t>(p - p0));
          int64_t c = 0;
          for (; c + V <= cn; c += V) {
            const Vec v = load_opmath(row + c);
            (Vec::loadu(&sum[c]) + v).store(&sum[c]);
            const Vec m = Vec::loadu(&span_max[c]);
            const Vec take = takes_over(v, m);
            Vec::blendv(m, v, take).store(&span_max[c]);
            Vec::blendv(Vec::loadu(&span_pos[c]), pos, take).store(&span_pos[c]);
          }
          for (; c < cn; ++c) {
            const acc_t v = row[c];
            sum[c] += v;
            if (takes_over(v, span_max[c])) {
              span_max[c] = v;
              span_pos[c] = static_cast<acc_t>(p - p0);
            }
          }
        }
        for (int64_t c = 0; c < cn; ++c) {
          total[c] += sum[c];
          if (p0 == 0 || takes_over(span_max[c], best[c])) {
            best[c] = span_max[c];
            best_pos[c] = p0 + static_cast<int64_t>(span_pos[c]);
          }
        }
      }
      const int64_t out = n * C + c0;
      for (int64_t c = 0; c < cn; ++c) {
        avg[out + c] = static_cast<T>(total[c] / P);
        max[out + c] = static_cast<T>(best[c]);
        argmax[out + c] = static_cast<int32_t>(best_pos[c]);
      }
    }
  });
}

void channel_pool(const at::Tensor& x, at::Tensor& avg, at::Tensor& max, at::Tensor& argmax) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool", [&] {
    if (is_channels_last(x)) {
      channel_pool_nhwc(
          x.const_data_ptr<scalar_t>(), avg.data_ptr<scalar_t>(), max.data_ptr<scalar_t>(),
          argmax.data_ptr<int32_t>(), N, C, P);
    } else {
      channel_pool_nchw(
          x.const_data_ptr<scalar_t>(), avg.data_ptr<scalar_t>(), max.data_ptr<scalar_t>(),
          argmax.data_ptr<int32_t>(), N * C, P);
    }
  });
}

// dx[n, c, p] = grad_avg[n, c] / P + (p == argmax[n, c]) * grad_max[n, c]: every element gets
// the share of the mean, the arg-max positions both terms. kAccumulate adds them to dx instead
// of writing them; an arg-max element's earlier value is read before the share is added, so that
// it takes both terms in one rounding (adding the max term to a rounded sum could overflow
// float16 where the reference's sum of the two gradients does not). With `spatial` (adding
// only), every element also gets the mean's share of a spatial pooling,
// spatial.scale[n, c] * spatial.grad_mean[n, p] / C, in the same rounding.
template <typename T>
struct SpatialShare {
  const T* grad_mean;  // [N, P], nullptr for none
  const T* scale;      // [N, C]
};

template <bool kAccumulate, typename T>
void channel_pool_backward_impl(
    const T* grad_avg, const T* grad_max, const int32_t* argmax, SpatialShare<T> spatial, T* dx,
    int64_t N, int64_t C, int64_t P, bool channels_last) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  const int64_t rows = N * C;
  const bool with_spatial = spatial.grad_mean != nullptr;
  TORCH_INTERNAL_ASSERT(kAccumulate || !with_spatial);
  auto mean_share = [&](int64_t r) { return static_cast<acc_t>(grad_avg[r]) / P; };
  // The spatial pooling's share at (n, c, p) is scale[n, c] / C times grad_mean[n, p].
  auto spatial_scale = [&](int64_t r) {
    return with_spatial ? static_cast<acc_t>(spatial.scale[r]) / C : acc_t(0);
  };
  auto spatial_share = [&](int64_t r, int64_t p) {
    return with_spatial ? spatial_scale(r) * static_cast<acc_t>(spatial.grad_mean[(r / C) * P + p])
                        : acc_t(0);
  };
  auto both_terms = [&](int64_t r, int64_t p, acc_t held) {
    return static_cast<T>(
        held + mean_share(r) + static_cast<acc_t>(grad_max[r]) + spatial_share(r, p));
  };
  if (!channels_last) {  // each (n, c) row, its arg-max element with it
    at::parallel_for(0, rows, grain_for_row(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row = dx + r * P;
        const int64_t p = argmax[r];
        const acc_t held = kAccumulate ? static_cast<acc_t>(row[p]) : acc_t(0);
        if (with_spatial) {
          const T* gm = spatial.grad_mean + (r / C) * P;
          const acc_t share = mean_share(r), ss = spatial_scale(r);
          const Vec vshare(share), vss(ss);
          int64_t q = 0;
          for (; q + V <= P; q += V) {
            store_opmath(load_opmath(row + q) + vshare + vss * load_opmath(gm + q), row + q);
          }
          for (; q < P; ++q) {
            row[q] = static_cast<T>(
                static_cast<acc_t>(row[q]) + share + ss * static_cast<acc_t>(gm[q]));
          }
        } else if constexpr (kAccumulate) {
          const Vec share(mean_share(r));
          at::vec::map<T>([&](Vec d) { return d + share; }, row, row, P);
        } else {
          std::fill(row, row + P, static_cast<T>(mean_share(r)));
        }
        row[p] = both_terms(r, p, held);
      }
    });
    return;
  }
  // channels_last: pixel by pixel, then the arg-max elements, whose earlier values are gathered
  // first when adding.
  auto argmax_offset = [&](int64_t r) { return ((r / C) * P + argmax[r]) * C + r % C; };
  std::vector<acc_t> held(kAccumulate ? rows : 0);
  if constexpr (kAccumulate) {
    at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) held[r] = static_cast<acc_t>(dx[argmax_offset(r)]);
    });
  }
  std::vector<T> shares(rows);
  for (int64_t r = 0; r < rows; ++r) shares[r] = static_cast<T>(mean_share(r));
  at::parallel_for(0, N * P, grain_for_row(C), [&](int64_t begin, int64_t end) {
    for (int64_t np = begin; np < end; ++np) {
      const T* src = shares.data() + (np / P) * C;
      T* d = dx + np * C;
      if (with_spatial) {
        const T* s = spatial.scale + (np / P) * C;
        const acc_t w = static_cast<acc_t>(spatial.grad_mean[np]) / C;
        const Vec vw(w);
        int64_t c = 0;
        for (; c + V <= C; c += V) {
          store_opmath(load_opmath(d + c) + load_opmath(src + c) + vw * load_opmath(s + c), d + c);
        }
        for (; c < C; ++c) {
          d[c] = static_cast<T>(static_cast<acc_t>(d[c]) + static_cast<acc_t>(src[c]) +
                                w * static_cast<acc_t>(s[c]));
        }
      } else if constexpr (kAccumulate) {
        at::vec::map2<T>([](Vec a, Vec share) { return a + share; }, d, d, src, C);
      } else {
        std::copy(src, src + C, d);
      }
    }
  });
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      dx[argmax_offset(r)] = both_terms(r, argmax[r], kAccumulate ? held[r] : acc_t(0));
    }
  });
}

template <bool kAccumulate>
void channel_pool_backward_into(
    const at::Tensor& grad_avg, const at::Tensor& grad_max, const at::Tensor& argmax,
    const at::Tensor& spatial_grad_mean, const at::Tensor& spatial_scale, at::Tensor& grad_x) {
  const int64_t N = grad_x.size(0), C = grad_x.size(1), P = grad_x.size(2) * grad_x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_x.scalar_type(), "channel_pool_backward", [&] {
        const SpatialShare<scalar_t> spatial{
            spatial_grad_mean.defined() ? spatial_grad_mean.const_data_ptr<scalar_t>() : nullptr,
            spatial_scale.defined() ? spatial_scale.const_data_ptr<scalar_t>() : nullptr};
        channel_pool_backward_impl<kAccumulate>(
            grad_avg.const_data_ptr<scalar_t>(), grad_max.const_data_ptr<scalar_t>(),
            argmax.const_data_ptr<int32_t>(), spatial, grad_x.data_ptr<scalar_t>(), N, C, P,
            is_channels_last(grad_x));
      });
}

void channel_pool_backward(
    const at::Tensor& grad_avg, const at::Tensor& grad_max, const at::Tensor& argmax,
    at::Tensor& grad_x) {
  channel_pool_backward_into<false>(grad_avg, grad_max, argmax, {}, {}, grad_x);
}

// ---------------------------------------------------------------------------------------------
// spatial_pool: mean, max and arg-max over c of y = x * scale[n, c], for every (n, p).

// mean and max hold each sample's P values contiguously, samples out_stride apart (two channels
// of the maps); argmax is [N, P].
template <typename T>
void spatial_pool_nhwc(
    const T* x, const T* scale, T* mean, T* max, int64_t out_stride, int32_t* argmax, int64_t N,
    int64_t C, int64_t P) {
  using acc_t = opmath_t<T>;
  at::parallel_for(0, N * P, grain_for_row(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * C;
      const T* s = scale + (r / P) * C;
      auto y_vec = [&](int64_t c) { return load_opmath(row + c) * load_opmath(s + c); };
      auto y_scalar = [&](int64_t c) {
        return static_cast<acc_t>(row[c]) * static_cast<acc_t>(s[c]);
      };
      const auto stats = row_stats<OpVec<T>, acc_t>(C, y_vec, y_scalar);
      const int64_t out = (r / P) * out_stride + r % P;
      mean[out] = static_cast<T>(stats.sum / C);
      max[out] = static_cast<T>(stats.max);
      argmax[r] = static_cast<int32_t>(stats.argmax);
    }
  });
}

template <typename T>
void spatial_pool_nchw(
    const T* x, const T* scale, T* mean, T* max, int64_t out_stride, int32_t* argmax, int64_t N,
    int64_t C, int64_t P) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  const int64_t blocks = (P + kBlockP - 1) / kBlockP;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(kBlockP), best(kBlockP), best_c(kBlockP);
    std::vector<double> total(kBlockP);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t p0 = (task % blocks) * kBlockP;
      const int64_t pn = std::min(kBlockP, P - p0);
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) {
        const T* row = x + (n * C + c) * P + p0;
        const acc_t s = scale[n * C + c];
        const Vec vs(s);
        const Vec channel(static_cast<acc_t>(c));
        int64_t p = 0;
        if (c == 0) {
          for (; p < pn; ++p) {
            sum[p] = best[p] = static_cast<acc_t>(row[p]) * s;
            best_c[p] = 0;
          }
          continue;
        }
        if (c % kSumBlock == 0) fold(total.data(), sum.data(), pn);
        for (; p + V <= pn; p += V) {
          const Vec y = load_opmath(row + p) * vs;
          (Vec::loadu(&sum[p]) + y).store(&sum[p]);
          const Vec m = Vec::loadu(&best[p]);
          const Vec take = takes_over(y, m);
          Vec::blendv(m, y, take).store(&best[p]);
          Vec::blendv(Vec::loadu(&best_c[p]), channel, take).store(&best_c[p]);
        }
        for (; p < pn; ++p) {
          const acc_t y = static_cast<acc_t>(row[p]) * s;
          sum[p] += y;
          if (takes_over(y, best[p])) {
            best[p] = y;
            best_c[p] = static_cast<acc_t>(c);
          }
        }
      }
      const int64_t out = n * out_stride + p0, arg = n * P + p0;
      for (int64_t p = 0; p < pn; ++p) {
        mean[out + p] = static_cast<T>((total[p] + sum[p]) / C);
        max[out + p] = static_cast<T>(best[p]);
        argmax[arg + p] = static_cast<int32_t>(best_c[p]);
      }
    }
  });
}

void spatial_pool(
    const at::Tensor& x, const at::Tensor& scale, at::Tensor& mean, at::Tensor& max,
    at::Tensor& argmax) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  TORCH_INTERNAL_ASSERT(mean.stride(0) == max.stride(0) && mean.stride(0) >= P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_pool", [&] {
    auto impl = is_channels_last(x) ? spatial_pool_nhwc<scalar_t> : spatial_pool_nchw<scalar_t>;
    impl(
        x.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
        max.data_ptr<scalar_t>(), mean.stride(0), argmax.data_ptr<int32_t>(), N, C, P);
  });
}

// w[n, c, p] = grad_mean[n, p] / C + (c == argmax[n, p]) * grad_max[n, p];
// dx = w * scale[n, c]; grad_scale[n, c] = sum_p w * x. The arg-max element's w is formed before
// it multiplies, as in the reference: (a + b) * s, not a * s + b * s, which can overflow float16
// where the reference does not, or give inf - inf = NaN for an infinite x or scale. Without
// kAddMean (adding only) dx gets the max's share alone, grad_max * scale at each pixel's arg-max
// element, and the mean's is left to channel_pool_backward_add: that element then takes the two
// in two roundings (benchmarks/NOTES.md, "Fifteenth session").
template <bool kAccumulate, bool kAddMean, typename T>
void spatial_pool_backward_nhwc(
    const T* grad_mean, const T* grad_max, const int32_t* argmax, const T* x, const T* scale,
    T* dx, T* grad_scale, int64_t N, int64_t C, int64_t P) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  const acc_t inv_c = acc_t(1) / C;
  const int64_t blocks = (C + kBlockC - 1) / kBlockC;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ds(kBlockC);
    std::vector<double> total(kBlockC);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = (task % blocks) * kBlockC;
      const int64_t cn = std::min(kBlockC, C - c0);
      const T* s = scale + n * C + c0;
      std::fill(ds.begin(), ds.end(), acc_t(0));
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t p = 0; p < P; ++p) {
        if (p % kSumBlock == 0) fold(total.data(), ds.data(), cn);
        const int64_t np = n * P + p;
        const acc_t w = static_cast<acc_t>(grad_mean[np]) * inv_c;
        const Vec vw(w);
        const T* xr = x + np * C + c0;
        T* dxr = dx + np * C + c0;
        const int64_t j = argmax[np] - c0;
        const bool has_max = j >= 0 && j < cn;
        // The arg-max element's value and partial sum before the loop below adds w's terms.
        const acc_t held_j = kAccumulate && has_max ? static_cast<acc_t>(dxr[j]) : acc_t(0);
        const acc_t ds_j = has_max ? ds[j] : acc_t(0);
        int64_t c = 0;
        for (; c + V <= cn; c += V) {
          if constexpr (kAddMean) {
            const Vec d = vw * load_opmath(s + c);
            store_opmath(kAccumulate ? load_opmath(dxr + c) + d : d, dxr + c);
          }
          (Vec::loadu(&ds[c]) + vw * load_opmath(xr + c)).store(&ds[c]);
        }
        for (; c < cn; ++c) {
          if constexpr (kAddMean) {
            const acc_t d = w * static_cast<acc_t>(s[c]);
            dxr[c] = static_cast<T>(kAccumulate ? static_cast<acc_t>(dxr[c]) + d : d);
          }
          ds[c] += w * static_cast<acc_t>(xr[c]);
        }
        if (has_max) {
          const acc_t g = static_cast<acc_t>(grad_max[np]);
          const acc_t wg = w + g;
          dxr[j] = static_cast<T>(held_j + (kAddMean ? wg : g) * static_cast<acc_t>(s[j]));
          ds[j] = ds_j + wg * static_cast<acc_t>(xr[j]);
        }
      }
      for (int64_t c = 0; c < cn; ++c) {
        grad_scale[n * C + c0 + c] = static_cast<T>(total[c] + ds[c]);
      }
    }
  });
}

// sum_p w[p] * x[p] for one (n, c) row, w = grad_mean / C plus grad_max at the row's arg-max
// pixels: the slow, exact form of spatial_pool_backward_nchw's sum, for rows with infinities.
template <typename T, typename acc_t>
double arg_max_row_sum(
    const T* x, const T* grad_mean, const T* grad_max, const int64_t* arg_max_pixels,
    int64_t count, acc_t inv_c, int64_t P) {
  std::vector<acc_t> w(P);
  for (int64_t p = 0; p < P; ++p) w[p] = static_cast<acc_t>(grad_mean[p]) * inv_c;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t q = arg_max_pixels[k];
    w[q] += static_cast<acc_t>(grad_max[q]);
  }
  double sum = 0;
  for (int64_t p = 0; p < P; ++p) sum += w[p] * static_cast<acc_t>(x[p]);
  return sum;
}

template <bool kAccumulate, bool kAddMean, typename T>
void spatial_pool_backward_nchw(
    const T* grad_mean, const T* grad_max, const int32_t* argmax, const T* x, const T* scale,
    T* dx, T* grad_scale, int64_t N, int64_t C, int64_t P) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  const acc_t inv_c = acc_t(1) / C;
  // Pixels of each sample bucketed by their arg-max channel (a counting sort), so that each
  // (n, c) row visits only its own arg-max pixels.
  std::vector<int64_t> bucket_start(N * (C + 1)), pixels(N * P);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t* start = bucket_start.data() + n * (C + 1);
      const int32_t* j = argmax + n * P;
      for (int64_t p = 0; p < P; ++p) ++start[j[p] + 1];
      for (int64_t c = 0; c < C; ++c) start[c + 1] += start[c];
      std::vector<int64_t> fill(start, start + C);
      for (int64_t p = 0; p < P; ++p) pixels[n * P + fill[j[p]]++] = p;
    }
  });
  at::parallel_for(0, N * C, grain_for_row(P), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> held;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / C, c = r % C;
      const T* gm = grad_mean + n * P;
      const T* xr = x + r * P;
      T* dxr = dx + r * P;
      const acc_t s = scale[r];
      const Vec vs(s), vinv(inv_c);
      const int64_t* start = bucket_start.data() + n * (C + 1);
      const int64_t* bucket = pixels.data() + n * P;
      if constexpr (kAccumulate) {  // the arg-max pixels' values before the mean's term is added
        held.resize(start[c + 1] - start[c]);
        for (int64_t k = start[c]; k < start[c + 1]; ++k) held[k - start[c]] = dxr[bucket[k]];
      }
      double ds = 0;
      int64_t p = 0;
      for (int64_t p1 = std::min(P, kRowBlock); p + V <= P; p1 = std::min(P, p1 + kRowBlock)) {
        Vec vds(0);
        for (; p + V <= p1; p += V) {
          const Vec w = load_opmath(gm + p) * vinv;
          if constexpr (kAddMean) {
            store_opmath(kAccumulate ? load_opmath(dxr + p) + w * vs : w * vs, dxr + p);
          }
          vds = vds + w * load_opmath(xr + p);
        }
        ds += reduce_sum(vds);
      }
      for (; p < P; ++p) {
        const acc_t w = static_cast<acc_t>(gm[p]) * inv_c;
        if constexpr (kAddMean) {
          dxr[p] = static_cast<T>(kAccumulate ? static_cast<acc_t>(dxr[p]) + w * s : w * s);
        }
        ds += w * static_cast<acc_t>(xr[p]);
      }
      for (int64_t k = start[c]; k < start[c + 1]; ++k) {
        const int64_t q = bucket[k];
        const acc_t g = grad_max[n * P + q];
        const acc_t wg = static_cast<acc_t>(gm[q]) * inv_c + g;
        dxr[q] = static_cast<T>((kAccumulate ? held[k - start[c]] : acc_t(0)) + (kAddMean ? wg : g) * s);
        ds += g * static_cast<acc_t>(xr[q]);
      }
      // An infinite term: ds took w·x and g·x apart at the arg-max pixels (inf - inf = NaN where
      // the reference's (w + g)·x is ±inf); the row again, with each pixel's w formed first.
      if (!std::isfinite(ds)) {
        ds = arg_max_row_sum(
            xr, gm, grad_max + n * P, bucket + start[c], start[c + 1] - start[c], inv_c, P);
      }
      grad_scale[r] = static_cast<T>(ds);
    }
  });
}

template <bool kAccumulate, bool kAddMean = true>
void spatial_pool_backward_into(
    const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& argmax,
    const at::Tensor& x, const at::Tensor& scale, at::Tensor& grad_x, at::Tensor& grad_scale) {
  static_assert(kAccumulate || kAddMean, "a gradient written, not added, takes both shares");
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_pool_backward", [&] {
        auto impl = is_channels_last(x)
                        ? spatial_pool_backward_nhwc<kAccumulate, kAddMean, scalar_t>
                        : spatial_pool_backward_nchw<kAccumulate, kAddMean, scalar_t>;
        impl(
            grad_mean.const_data_ptr<scalar_t>(), grad_max.const_data_ptr<scalar_t>(),
            argmax.const_data_ptr<int32_t>(), x.const_data_ptr<scalar_t>(),
            scale.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
            grad_scale.data_ptr<scalar_t>(), N, C, P);
      });
}

// ---------------------------------------------------------------------------------------------
// gate_apply: out = x * g[n, c] * h[n, p].

// One NHWC pixel row: C values of x and of g, one h.
template <typename T>
inline void gate_pixel_row(T* out, const T* x, const T* g, T h, int64_t C) {
  using Vec = OpVec<T>;
  const Vec hp(static_cast<opmath_t<T>>(h));
  at::vec::map2<T>([&](Vec xv, Vec gv) { return xv * gv * hp; }, out, x, g, C);
}

// A run of `length` NCHW pixels of one channel: one g, a value of h per pixel.
template <typename T>
inline void gate_channel_run(T* out, const T* x, T g, const T* h, int64_t length) {
  using Vec = OpVec<T>;
  const Vec gc(static_cast<opmath_t<T>>(g));
  at::vec::map2<T>([&](Vec xv, Vec hv) { return xv * gc * hv; }, out, x, h, length);
}

template <typename T>
void gate_apply_impl(
    const T* x, const T* g, const T* h, T* out, int64_t N, int64_t C, int64_t P,
    bool channels_last) {
  if (channels_last) {
    at::parallel_for(0, N * P, grain_for_row(C), [&](int64_t begin, int64_t end) {
      for (int64_t np = begin; np < end; ++np) {
        gate_pixel_row(out + np * C, x + np * C, g + (np / P) * C, h[np], C);
      }
    });
  } else {
    at::parallel_for(0, N * C, grain_for_row(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        gate_channel_run(out + r * P, x + r * P, g[r], h + (r / C) * P, P);
      }
    });
  }
}

void gate_apply(
    const at::Tensor& x, const at::Tensor& channel_gate, const at::Tensor& spatial_gate,
    at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gate_apply", [&] {
    gate_apply_impl(
        x.const_data_ptr<scalar_t>(), channel_gate.const_data_ptr<scalar_t>(),
        spatial_gate.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, C, P,
        is_channels_last(x));
  });
}

// dx = dout * g * h; dg[n, c] = sum_p dout * x * h; dh[n, p] = sum_c dout * x * g, all from one
// read of dout and x. In either layout, x is rows of `length` contiguous values, `rows` rows per
// sample; each row has one gate value (row_gate[r]: g in NCHW, h in NHWC) and each position in
// the row one value of the other gate (line_gate[n, i]: h in NCHW, g in NHWC). The gradient of
// row_gate is a sum along the row; the gradient of line_gate is a sum across rows, taken through
// per-block partial sums that are added in block order.
template <typename T>
void gate_backward_rows(
    const T* dout, const T* x, const T* row_gate, const T* line_gate, T* dx, T* grad_row_gate,
    T* grad_line_gate, int64_t N, int64_t rows, int64_t length, int64_t rows_per_block) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  std::vector<acc_t> line_partial(N * blocks * length, acc_t(0));
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t r0 = (task % blocks) * rows_per_block;
      const int64_t r1 = std::min(rows, r0 + rows_per_block);
      const T* line = line_gate + n * length;
      acc_t* part = line_partial.data() + task * length;
      for (int64_t r = n * rows + r0; r < n * rows + r1; ++r) {
        const T *dr = dout + r * length, *xr = x + r * length;
        T* dxr = dx + r * length;
        const acc_t a = row_gate[r];
        const Vec va(a);
        double sum = 0;
        int64_t i = 0;
        for (int64_t i1 = std::min(length, kRowBlock); i + V <= length;
             i1 = std::min(length, i1 + kRowBlock)) {
          Vec vsum(0);
          for (; i + V <= i1; i += V) {
            const Vec d = load_opmath(dr + i), xv = load_opmath(xr + i), b = load_opmath(line + i);
            store_opmath(d * b * va, dxr + i);
            const Vec dxv = d * xv;
            vsum = vsum + dxv * b;
            (Vec::loadu(part + i) + dxv * va).store(part + i);
          }
          sum += reduce_sum(vsum);
        }
        for (; i < length; ++i) {
          const acc_t d = dr[i], xv = xr[i], b = line[i];
          dxr[i] = static_cast<T>(d * b * a);
          sum += d * xv * b;
          part[i] += d * xv * a;
        }
        grad_row_gate[r] = static_cast<T>(sum);
      }
    }
  });
  at::parallel_for(0, N * length, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t ni = begin; ni < end; ++ni) {
      const int64_t n = ni / length, i = ni % length;
      double sum = 0;
      for (int64_t b = 0; b < blocks; ++b) sum += line_partial[(n * blocks + b) * length + i];
      grad_line_gate[ni] = static_cast<T>(sum);
    }
  });
}

void gate_apply_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& channel_gate,
    const at::Tensor& spatial_gate, at::Tensor& grad_x, at::Tensor& grad_channel_gate,
    at::Tensor& grad_spatial_gate) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "gate_apply_backward", [&] {
        const scalar_t* g = channel_gate.const_data_ptr<scalar_t>();
        const scalar_t* h = spatial_gate.const_data_ptr<scalar_t>();
        scalar_t* dg = grad_channel_gate.data_ptr<scalar_t>();
        scalar_t* dh = grad_spatial_gate.data_ptr<scalar_t>();
        const scalar_t* dout = grad_out.const_data_ptr<scalar_t>();
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* dx = grad_x.data_ptr<scalar_t>();
        if (is_channels_last(x)) {
          gate_backward_rows(dout, xp, h, g, dx, dh, dg, N, P, C, kBlockP);
        } else {
          gate_backward_rows(dout, xp, g, h, dx, dg, dh, N, C, P, /*rows_per_block=*/64);
        }
      });
}

// ---------------------------------------------------------------------------------------------
// channel_gate: gate[m] = sigmoid(sum_k logits[k, m]) over the M = N * C gates, and its backward.
// The sum is rounded to the logits' dtype before the sigmoid, as the layouts' `logits.sum(0)`
// (or `a + b`) rounds it: a gate an ulp apart moves spatial maxima at near ties to other
// channels, with their whole gradient (benchmarks/NOTES.md, nineteenth session).

// The sigmoid is torch.sigmoid's vectorised formula (Sleef's exp), on every gate, the last
// partial vector too: a gate's bits depend neither on its position nor on the thread count, and
// equal torch.sigmoid's wherever that runs its vector loop (std::exp, its scalar tail's, is one
// float32 ulp off for about 4% of gates).
template <typename T>
void channel_gate_impl(const T* logits, T* gate, int64_t pools, int64_t M) {
  using acc_t = opmath_t<T>;
  at::parallel_for(0, M, kRowBlock, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(end - begin);
    for (int64_t m = begin; m < end; ++m) {
      acc_t sum = 0;
      for (int64_t k = 0; k < pools; ++k) sum += static_cast<acc_t>(logits[k * M + m]);
      sums[m - begin] = rounded<T>(sum);
    }
    at::vec::map<T>(
        [](Vectorized<acc_t> v) { return sigmoid(v); }, gate + begin, sums.data(), end - begin);
  });
}

void channel_gate(const at::Tensor& logits, at::Tensor& gate) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "channel_gate", [&] {
        channel_gate_impl(
            logits.const_data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), logits.size(0),
            gate.numel());
      });
}

// Each of the K rows of grad_logits gets the same value: the sum's gradient, as sigmoid_backward
// computes it (grad * (1 - gate) * gate) from the gate in its own dtype.
template <typename T>
void channel_gate_backward_impl(
    const T* grad, const T* grad_2, const T* gate, T* grad_logits, int64_t pools, int64_t M) {
  using acc_t = opmath_t<T>;
  at::parallel_for(0, M, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      acc_t g = static_cast<acc_t>(grad[m]);
      if (grad_2 != nullptr) g += static_cast<acc_t>(grad_2[m]);
      const acc_t s = static_cast<acc_t>(gate[m]);
      const T d = static_cast<T>(g * (acc_t(1) - s) * s);
      for (int64_t k = 0; k < pools; ++k) grad_logits[k * M + m] = d;
    }
  });
}

void channel_gate_backward(
    const at::Tensor& grad_gate, const at::Tensor& grad_gate_2, const at::Tensor& gate,
    at::Tensor& grad_logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gate.scalar_type(), "channel_gate_backward", [&] {
        channel_gate_backward_impl(
            grad_gate.const_data_ptr<scalar_t>(),
            grad_gate_2.defined() ? grad_gate_2.const_data_ptr<scalar_t>() : nullptr,
            gate.const_data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>(),
            grad_logits.size(0), gate.numel());
      });
}

// ---------------------------------------------------------------------------------------------
// Inference: the whole block, one sample per thread at a time, so that x comes from memory once
// (the channel pooling) and the spatial pooling and the gate find it in that core's L2. The
// caller (ops_cpu.cpp) runs inference_pool, inference_mlp and inference_gate per chunk of
// samples small enough to stay in the threads' L2 caches; the pooling and the gate split the
// chunk the same way over the threads, so each thread finds its own samples again.

// Bytes of x one channels_last spatial-pool band covers: the gate pass follows the pooling band
// by band (a few conv rows behind), so its reads of x hit the cache even when a whole sample
// does not fit in L2.
constexpr int64_t kBandBytes = 128 * 1024;

// pooled [2, n1 - n0, C] (opmath dtype): the mean of each (n, c) over H x W, then the max, each
// rounded to x's dtype as the modules' pooling outputs are.
template <typename T>
void inference_pool_impl(
    const T* x, opmath_t<T>* pooled, int64_t n0, int64_t n1, int64_t C, int64_t P,
    bool channels_last) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  acc_t* avg = pooled;
  acc_t* max = pooled + (n1 - n0) * C;
  at::parallel_for(n0, n1, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(channels_last ? C : 0), best(channels_last ? C : 0);
    std::vector<double> total(channels_last ? C : 0);
    for (int64_t n = begin; n < end; ++n) {
      const T* xs = x + n * C * P;
      acc_t* a = avg + (n - n0) * C;
      acc_t* m = max + (n - n0) * C;
      if (!channels_last) {
        for (int64_t c = 0; c < C; ++c) {
          const T* row = xs + c * P;
          const auto stats = row_stats<Vec, acc_t, false>(
              P, [&](int64_t p) { return load_opmath(row + p); },
              [&](int64_t p) { return static_cast<acc_t>(row[p]); });
          a[c] = rounded<T>(stats.sum / P);
          m[c] = rounded<T>(stats.max);
        }
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        sum[c] = best[c] = static_cast<acc_t>(xs[c]);
        total[c] = 0;
      }
      for (int64_t p = 1; p < P; ++p) {
        if (p % kSumBlock == 0) fold(total.data(), sum.data(), C);
        const T* row = xs + p * C;
        int64_t c = 0;
        for (; c + V <= C; c += V) {
          const Vec v = load_opmath(row + c);
          (Vec::loadu(&sum[c]) + v).store(&sum[c]);
          at::vec::maximum(Vec::loadu(&best[c]), v).store(&best[c]);
        }
        for (; c < C; ++c) {
          const acc_t v = row[c];
          sum[c] += v;
          if (takes_over(v, best[c])) best[c] = v;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        a[c] = rounded<T>(static_cast<acc_t>((total[c] + sum[c]) / P));
        m[c] = rounded<T>(best[c]);
      }
    }
  });
}

// Sum and maximum over the C channels of y = x * gate[c] for B vectors of consecutive pixels of
// an NCHW sample (channel stride P), the accumulators in registers; emit(i, sum, max) per pixel.
template <int64_t B, typename T, typename Emit>
inline void pool_pixels(const T* x, const T* gate, int64_t C, int64_t P, const Emit& emit) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  Vec sum[B], max[B];
  double total[B * V] = {};
  acc_t sums[V], maxima[V];
  auto fold_vectors = [&] {  // fold, from the sums held in vectors
    for (int64_t b = 0; b < B; ++b) {
      sum[b].store(sums);
      for (int64_t i = 0; i < V; ++i) total[b * V + i] += sums[i];
      sum[b] = Vec(0);
    }
  };
  const Vec g0(static_cast<acc_t>(gate[0]));
  for (int64_t b = 0; b < B; ++b) sum[b] = max[b] = load_opmath(x + b * V) * g0;
  for (int64_t c = 1; c < C; ++c) {
    if (c % kSumBlock == 0) fold_vectors();
    const T* row = x + c * P;
    const Vec gc(static_cast<acc_t>(gate[c]));
    for (int64_t b = 0; b < B; ++b) {
      const Vec y = load_opmath(row + b * V) * gc;
      sum[b] = sum[b] + y;
      max[b] = at::vec::maximum(max[b], y);
    }
  }
  fold_vectors();
  for (int64_t b = 0; b < B; ++b) {
    max[b].store(maxima);
    for (int64_t i = 0; i < V; ++i) emit(b * V + i, static_cast<acc_t>(total[b * V + i]), maxima[i]);
  }
}

// For samples [n0, n1): maps = [mean, max] over c of y = x * gate[n, c] (rounded to x's dtype),
// h = sigmoid(conv_KxK(maps, weight, zero padding) + bias) (rounded), out = x * gate * h.
template <typename T>
void inference_gate_impl(
    const T* x, const T* gate, const opmath_t<T>* weight, int64_t K, opmath_t<T> bias, T* out,
    int64_t n0, int64_t n1, int64_t C, int64_t H, int64_t W, bool channels_last) {
  using Vec = OpVec<T>;
  using acc_t = opmath_t<T>;
  constexpr int64_t V = Vec::size();
  const int64_t P = H * W, pad = K / 2;
  // Padded maps; V spare columns keep the conv's vector loads inside the buffer.
  const int64_t Hp = H + 2 * pad, Wp = W + 2 * pad + V;
  // NCHW pools whole channel rows (bands would cut them short); its pooling keeps pixel blocks
  // in registers across all channels instead.
  const int64_t band =
      channels_last ? std::clamp<int64_t>(kBandBytes / (W * C * int64_t(sizeof(T))), 1, H) : H;
  at::parallel_for(n0, n1, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> maps(2 * Hp * Wp);
    std::vector<T> h(P);
    acc_t* mean_map = maps.data();
    acc_t* max_map = maps.data() + Hp * Wp;
    for (int64_t n = begin; n < end; ++n) {
      const T* xs = x + n * C * P;
      T* os = out + n * C * P;
      const T* g = gate + (n - n0) * C;
      std::fill(maps.begin(), maps.end(), acc_t(0));
      auto set_maps = [&](int64_t p, acc_t total, acc_t maximum) {
        const int64_t at = (pad + p / W) * Wp + pad + p % W;
        mean_map[at] = rounded<T>(total / C);
        max_map[at] = rounded<T>(maximum);
      };
      auto pool_rows = [&](int64_t r0, int64_t r1) {
        if (channels_last) {
          for (int64_t p = r0 * W; p < r1 * W; ++p) {
            const T* row = xs + p * C;
            const auto stats = row_stats<Vec, acc_t, false>(
                C, [&](int64_t c) { return load_opmath(row + c) * load_opmath(g + c); },
                [&](int64_t c) { return static_cast<acc_t>(row[c]) * static_cast<acc_t>(g[c]); });
            set_maps(p, stats.sum, stats.max);
          }
          return;
        }
        // NCHW: blocks of pixels whose sums and maxima stay in registers across all C channels.
        int64_t p = r0 * W;
        auto emit = [&](int64_t i, acc_t total, acc_t maximum) { set_maps(p + i, total, maximum); };
        for (; p + 4 * V <= r1 * W; p += 4 * V) pool_pixels<4>(xs + p, g, C, P, emit);
        for (; p + V <= r1 * W; p += V) pool_pixels<1>(xs + p, g, C, P, emit);
        for (; p < r1 * W; ++p) {
          acc_t maximum = static_cast<acc_t>(xs[p]) * static_cast<acc_t>(g[0]);
          double total = maximum;  // a few pixels: each term added in double
          for (int64_t c = 1; c < C; ++c) {
            const acc_t y = static_cast<acc_t>(xs[c * P + p]) * static_cast<acc_t>(g[c]);
            total += y;
            if (takes_over(y, maximum)) maximum = y;
          }
          set_maps(p, static_cast<acc_t>(total), maximum);
        }
      };
      auto spatial_gate_rows = [&](int64_t r0, int64_t r1) {
        acc_t u[V];
        for (int64_t i = r0; i < r1; ++i) {
          for (int64_t j0 = 0; j0 < W; j0 += V) {
            Vec acc(bias);
            for (int64_t map = 0; map < 2; ++map) {
              for (int64_t di = 0; di < K; ++di) {
                const acc_t* src = maps.data() + map * Hp * Wp + (i + di) * Wp + j0;
                const acc_t* w = weight + (map * K + di) * K;
                for (int64_t dj = 0; dj < K; ++dj) {
                  acc = at::vec::fmadd(Vec(w[dj]), Vec::loadu(src + dj), acc);
                }
              }
            }
            sigmoid(acc).store(u);
            for (int64_t j = j0; j < std::min(W, j0 + V); ++j) {
              h[i * W + j] = static_cast<T>(u[j - j0]);
            }
          }
        }
      };
      auto gate_rows = [&](int64_t r0, int64_t r1) {
        if (channels_last) {
          for (int64_t p = r0 * W; p < r1 * W; ++p) {
            gate_pixel_row(os + p * C, xs + p * C, g, h[p], C);
          }
          return;
        }
        for (int64_t c = 0; c < C; ++c) {
          const int64_t offset = c * P + r0 * W;
          gate_channel_run(os + offset, xs + offset, g[c], h.data() + r0 * W, (r1 - r0) * W);
        }
      };
      int64_t done = 0;  // rows whose output is written
      for (int64_t r0 = 0; r0 < H; r0 += band) {
        const int64_t r1 = std::min(H, r0 + band);
        pool_rows(r0, r1);
        // A conv row needs the maps `pad` rows below it.
        const int64_t ready = r1 == H ? H : std::max(done, r1 - pad);
        spatial_gate_rows(done, ready);
        gate_rows(done, ready);
        done = ready;
      }
    }
  });
}

// out[v] = row . vectors[v] for `count` contiguous vectors of `length` opmath values, in a fixed
// order. The row is loaded once for B vectors at a time, whose B accumulator chains run
// independently (one chain per dot product would wait on the FMA latency).
template <int64_t B, typename S>
inline void dots_block(const S* row, const S* vectors, int64_t length, S* out) {
  using Vec = Vectorized<S>;
  constexpr int64_t V = Vec::size();
  Vec acc[B];
  for (int64_t b = 0; b < B; ++b) acc[b] = Vec(0);
  int64_t i = 0;
  for (; i + V <= length; i += V) {
    const Vec r = Vec::loadu(row + i);
    for (int64_t b = 0; b < B; ++b) {
      acc[b] = at::vec::fmadd(r, Vec::loadu(vectors + b * length + i), acc[b]);
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    S sum = reduce_sum(acc[b]);
    for (int64_t t = i; t < length; ++t) sum += row[t] * vectors[b * length + t];
    out[b] = sum;
  }
}

template <typename S>
inline void dots(const S* row, const S* vectors, int64_t count, int64_t length, S* out) {
  int64_t v = 0;
  for (; v + 8 <= count; v += 8) dots_block<8>(row, vectors + v * length, length, out + v);
  for (; v + 2 <= count; v += 2) dots_block<2>(row, vectors + v * length, length, out + v);
  for (; v < count; ++v) dots_block<1>(row, vectors + v * length, length, out + v);
}

// The channel gates of a chunk of k samples: sigmoid of the sum, over the pooled vectors v it
// takes (the means, and the maxima when pools == 2), of fc2(relu(fc1(v))), or of fc1(v) for a
// one-layer MLP (w2 null). Each weight row is read once per chunk and used for all of the
// chunk's vectors; rows are split over the threads. These GEMMs have a handful of rows: as
// ATen calls they cost more in dispatch and threading than in arithmetic.
template <typename T>
void inference_mlp_impl(
    const opmath_t<T>* pooled, int64_t pools, const opmath_t<T>* w1, const opmath_t<T>* b1,
    const opmath_t<T>* w2, const opmath_t<T>* b2, opmath_t<T>* hidden, T* gate, int64_t k,
    int64_t C, int64_t hidden_size) {
  using acc_t = opmath_t<T>;
  const bool two_layers = w2 != nullptr;
  at::parallel_for(0, hidden_size, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> d(pools * k);  // the row's dot products with [means..., maxima...]
    for (int64_t j = begin; j < end; ++j) {
      dots(w1 + j * C, pooled, pools * k, C, d.data());
      for (int64_t i = 0; i < k; ++i) {
        acc_t sum = 0;
        for (int64_t p = 0; p < pools; ++p) {
          const acc_t v = d[p * k + i] + b1[j];
          sum += two_layers ? std::max(v, acc_t(0)) : v;
        }
        hidden[i * hidden_size + j] = sum;
      }
    }
  });
  at::parallel_for(0, C, grain_for_row(hidden_size * k), [&](int64_t begin, int64_t end) {
    const int64_t length = end - begin;
    std::vector<acc_t> z(k), logits(two_layers ? k * length : 0);
    if (two_layers) {
      for (int64_t c = begin; c < end; ++c) {
        dots(w2 + c * hidden_size, hidden, k, hidden_size, z.data());
        for (int64_t i = 0; i < k; ++i) logits[i * length + c - begin] = z[i] + pools * b2[c];
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      // One layer: the logits are the hidden rows themselves (hidden_size == C).
      const acc_t* row = two_layers ? logits.data() + i * length : hidden + i * C + begin;
      at::vec::map<T>(
          [](Vectorized<acc_t> v) { return sigmoid(v); }, gate + i * C + begin, row, length);
    }
  });
}

void inference_mlp(
    at::Tensor& pooled, int64_t pools, bool mixed, const at::Tensor& fc1_weight,
    const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
    at::Tensor& hidden, at::Tensor& gate) {
  const int64_t k = gate.size(0), C = gate.size(1), hidden_size = fc1_weight.size(0);
  const auto dtype = gate.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "inference_mlp", [&] {
    using acc_t = opmath_t<scalar_t>;
    if (mixed) {  // one vector per sample, 0.5 * mean + 0.5 * max, rounded as the modules do
      acc_t* means = pooled.data_ptr<acc_t>();
      const acc_t* maxima = means + k * C;
      for (int64_t i = 0; i < k * C; ++i) {
        means[i] = rounded<scalar_t>(
            rounded<scalar_t>(acc_t(0.5) * means[i]) + rounded<scalar_t>(acc_t(0.5) * maxima[i]));
      }
    }
    const bool two_layers = fc2_weight.defined();
    inference_mlp_impl(
        pooled.const_data_ptr<acc_t>(), pools, fc1_weight.const_data_ptr<acc_t>(),
        fc1_bias.const_data_ptr<acc_t>(), two_layers ? fc2_weight.const_data_ptr<acc_t>() : nullptr,
        two_layers ? fc2_bias.const_data_ptr<acc_t>() : nullptr, hidden.data_ptr<acc_t>(),
        gate.data_ptr<scalar_t>(), k, C, hidden_size);
  });
}

void inference_pool(const at::Tensor& x, int64_t n0, int64_t n1, at::Tensor& pooled) {
  const int64_t C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inference_pool", [&] {
    inference_pool_impl(
        x.const_data_ptr<scalar_t>(), pooled.data_ptr<opmath_t<scalar_t>>(), n0, n1, C, P,
        is_channels_last(x));
  });
}

void inference_gate(
    const at::Tensor& x, int64_t n0, int64_t n1, const at::Tensor& channel_gate,
    const at::Tensor& spatial_weight, double spatial_bias, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inference_gate", [&] {
    inference_gate_impl(
        x.const_data_ptr<scalar_t>(), channel_gate.const_data_ptr<scalar_t>(),
        spatial_weight.const_data_ptr<opmath_t<scalar_t>>(), spatial_weight.size(-1),
        static_cast<opmath_t<scalar_t>>(spatial_bias), out.data_ptr<scalar_t>(), n0, n1,
        x.size(1), x.size(2), x.size(3), is_channels_last(x));
  });
}

}  // namespace

extern const KernelTable kernels = {
    channel_pool,
    channel_pool_backward,
    channel_pool_backward_into<true>,
    spatial_pool,
    spatial_pool_backward_into<false>,
    spatial_pool_backward_into<true>,
    spatial_pool_backward_into<true, false>,
    gate_apply,
    gate_apply_backward,
    channel_gate,
    channel_gate_backward,
    inference_pool,
    inference_mlp,
    inference_gate,
};

}  // namespace CPU_CAPABILITY
}  // namespace fused_cbam::cpu
