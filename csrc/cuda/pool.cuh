// Pooling kernels shared by channel_pool.cu and spatial_pool.cu, and the backward of a pooled
// pair (mean, max) without a scale.
//
//   row_pool:   reduction along contiguous rows (channel pooling of NCHW x, spatial pooling of
//               channels_last x). A group of 4..256 threads per row segment, 16-byte loads
//               after a scalar head that reaches alignment, split rows when there are too few.
//   outer_pool: reduction over the strided outer dimension of [N, Lo, Li] (channel pooling of
//               channels_last x, spatial pooling of NCHW x). Lanes along Li, rows of the block
//               along Lo, a shared-memory tree across rows, split Lo when there are too few.
//   max_scatter_backward: d(mean, max) -> dx, written once (or added into dx), vectorised.
// Every pooled row holds at least one element (the host checks), so no empty arg-max escapes.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace fused_cbam {
namespace gpu {

// An arg-max read by a backward kernel, pooled over `extent` positions. One outside them comes
// from another input: stop with a device-side assert, as ATen's index checks do, instead of
// silently dropping the max's gradient (the CPU kernels raise an error).
__device__ __forceinline__ int64_t checked_argmax(int32_t id, int extent) {
  CUDA_KERNEL_ASSERT_MSG(id >= 0 && id < extent, "fused_cbam: argmax outside the pooled extent");
  return id;
}

// What a pooling's backward reads, per sample n and kept position k (k < kept): the gradients
// of the mean and of the max, each at n * sample + k * step (they may be views into one
// stacked tensor, the spatial conv's input gradient: read in place, not copied), and the
// arg-max its forward wrote, dense [N, kept].
template <typename scalar_t>
struct PoolGrads {
  const scalar_t* __restrict__ mean;
  int64_t mean_sample, mean_step;
  const scalar_t* __restrict__ max;
  int64_t max_sample, max_step;
  const int32_t* __restrict__ argmax;
  int64_t kept;
};

// The gradients of the mean and the max and the arg-max at (n, k), as loaded: a kernel that
// keeps several rows' loads in flight holds these, and widens them when it uses them.
template <typename scalar_t>
struct PoolGrad {
  scalar_t mean, max;
  int32_t argmax;

  // The share of the mean's gradient (grad_mean / count), the max's gradient and the arg-max
  // (pooled over `extent`).
  template <typename acc_t>
  __device__ __forceinline__ void widen(acc_t count, int extent, acc_t& a, acc_t& m,
                                        int64_t& id) const {
    a = static_cast<acc_t>(mean) / count;
    m = static_cast<acc_t>(max);
    id = checked_argmax(argmax, extent);
  }
};

template <typename scalar_t>
__device__ __forceinline__ PoolGrad<scalar_t> pool_grad_at(const PoolGrads<scalar_t>& g, int64_t n,
                                                           int64_t k) {
  return {g.mean[n * g.mean_sample + k * g.mean_step], g.max[n * g.max_sample + k * g.max_step],
          g.argmax[n * g.kept + k]};
}

// The share of the mean's gradient, the max's gradient and the arg-max at (n, k).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pool_grad(const PoolGrads<scalar_t>& g, int64_t n, int64_t k,
                                               acc_t count, int extent, acc_t& a, acc_t& m,
                                               int64_t& id) {
  pool_grad_at(g, n, k).widen(count, extent, a, m, id);
}

// The same for the VEC consecutive kept positions from k0.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pool_grads(const PoolGrads<scalar_t>& g, int64_t n,
                                                int64_t k0, acc_t count, int extent,
                                                acc_t (&a)[VEC], acc_t (&m)[VEC],
                                                int64_t (&id)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) load_pool_grad(g, n, k0 + j, count, extent, a[j], m[j], id[j]);
}

constexpr int64_t kMinChunk = 2048;  // smallest segment of a split row

// The sum and first arg-max of the values one thread visits in increasing index order. The
// order makes the first-index rule a strict comparison (an FSETP and two selects), where
// arg_update's NaN rule branches. NaN never compares greater and an all -inf run takes no index;
// either shows after the run (the sum is NaN, or no index was taken), and such a thread visits
// its values again with arg_update, so the result is arg_update's on any data.
template <typename A>
struct RunningPool {
  A sum, max;
  int idx;

  __device__ __forceinline__ void start() {
    sum = 0;
    restart_max();
  }
  __device__ __forceinline__ void restart_max() {
    max = neg_inf<A>();
    idx = kNoIndex;
  }
  __device__ __forceinline__ void add(A v, int i) {
    sum += v;
    const bool greater = v > max;
    max = greater ? v : max;
    idx = greater ? i : idx;
  }
  __device__ __forceinline__ bool needs_exact() const { return sum != sum || idx == kNoIndex; }
  __device__ __forceinline__ void add_exact(A v, int i) { arg_update(v, i, max, idx); }
};

// Row r is x[r * L, (r + 1) * L). Segment (r, s) covers [s * chunk, min(L, (s + 1) * chunk))
// and belongs to `group` consecutive threads (a power of two, 4..kThreads). With SCALE, element
// i of row r is multiplied by scale[(r / rows_per_sample) * L + i] (math type) before pooling.
// splits == 1: writes avg = sum / count, max, arg-max of each row to `out`; otherwise partials
// [splits, rows] for pool_finalize_kernel.
template <typename scalar_t, typename acc_t, bool SCALE>
__global__ void __launch_bounds__(kThreads)
    row_pool_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ scale,
                    int64_t rows, int64_t rows_per_sample, int L, int chunk, int splits,
                    int group, acc_t count, PoolOut<scalar_t> out, acc_t* __restrict__ psum,
                    acc_t* __restrict__ pmax, int* __restrict__ pidx) {
  constexpr int VEC = vec_width<scalar_t>();
  __shared__ acc_t s_sum[kThreads / 32];
  __shared__ acc_t s_max[kThreads / 32];
  __shared__ int s_idx[kThreads / 32];

  const int tid = threadIdx.x;
  const int t = tid & (group - 1);
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * (kThreads / group) + tid / group;
  const bool live = seg < rows * splits;

  RunningPool<acc_t> pool;
  pool.start();
  int64_t row = 0;
  int s = 0;
  if (live) {
    row = seg / splits;
    s = static_cast<int>(seg - row * splits);
    const int begin = s * chunk;
    const int end = min(L, begin + chunk);
    const scalar_t* __restrict__ xr = x + row * L;
    const scalar_t* __restrict__ sr = nullptr;
    if constexpr (SCALE) sr = scale + (row / rows_per_sample) * L;

    // Scalar head up to the first 16-byte boundary of x, vector body, scalar tail: each thread
    // visits increasing indices, as RunningPool needs.
    const uintptr_t addr = reinterpret_cast<uintptr_t>(xr + begin);
    const int head =
        min(end - begin, static_cast<int>(((16 - (addr & 15)) & 15) / sizeof(scalar_t)));
    const int body = begin + head;
    const int nvec = (end - body) / VEC;
    const int tail = body + nvec * VEC;
    bool scale_vec = false;
    if constexpr (SCALE) scale_vec = (reinterpret_cast<uintptr_t>(sr + body) & 15) == 0;
    const auto value = [&](int i) {
      acc_t v = static_cast<acc_t>(xr[i]);
      if constexpr (SCALE) v *= static_cast<acc_t>(sr[i]);
      return v;
    };
    // A batch holds x's loads only (registers bound the blocks an SM holds): the scale, one
    // row per sample, comes from L1 when visited.
    const auto load = [&](int k) { return load_vec<VEC>(xr + body + k * VEC); };
    // One walk over the thread's elements; visit(v, i) sees them in increasing order.
    const auto walk = [&](auto unroll_c, const auto& visit) {
      for (int i = begin + t; i < body; i += group) visit(value(i), i);
      for_each_batched<decltype(unroll_c)::value>(
          t, nvec, group, load, [&](int k, const RawVec<scalar_t, VEC>& raw) {
            const int i = body + k * VEC;
            acc_t v[VEC];
            widen<VEC>(raw, v);
            if constexpr (SCALE) {
              acc_t sc[VEC];
              if (scale_vec) {
                load_as<VEC>(sr + i, sc);
              } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) sc[j] = static_cast<acc_t>(sr[i + j]);
              }
#pragma unroll
              for (int j = 0; j < VEC; ++j) v[j] *= sc[j];
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j) visit(v[j], i + j);
          });
      for (int i = tail + t; i < end; i += group) visit(value(i), i);
    };
    walk(std::integral_constant<int, kLoadsInFlight>{}, [&](acc_t v, int i) { pool.add(v, i); });
    if (pool.needs_exact()) {
      pool.restart_max();
      walk(std::integral_constant<int, 1>{}, [&](acc_t v, int i) { pool.add_exact(v, i); });
    }
  }
  acc_t sum = pool.sum, bv = pool.max;
  int bi = pool.idx;

  // Every thread of the block reaches the reductions (no early return above).
  group_pool(sum, bv, bi, min(group, 32));
  if (group > 32) {  // uniform over the block
    const int warp = tid >> 5;
    if ((tid & 31) == 0) {
      s_sum[warp] = sum;
      s_max[warp] = bv;
      s_idx[warp] = bi;
    }
    __syncthreads();
    if (t == 0) {  // lane 0 of the group's first warp adds the group's other warps in order
      for (int w = 1; w < group / 32; ++w) {
        sum += s_sum[warp + w];
        arg_update(s_max[warp + w], s_idx[warp + w], bv, bi);
      }
    }
  }
  if (live && t == 0) {
    if (splits == 1) {
      out.write(row, static_cast<scalar_t>(sum / count), static_cast<scalar_t>(bv), bi);
    } else {
      const int64_t q = s * rows + row;
      psum[q] = sum;
      pmax[q] = bv;
      pidx[q] = bi;
    }
  }
}

// x viewed as [N, Lo, Li]; pools over o for every (n, i). With SCALE, x[n, o, i] is multiplied
// by scale[n * Lo + o] first. splits == 1: final outputs of row n * Li + i to `out`; otherwise
// partials [splits, N * Li].
template <typename scalar_t, typename acc_t, int VEC, bool SCALE>
__global__ void __launch_bounds__(kThreads)
    outer_pool_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ scale, int Li,
                      int Lo, int64_t itiles, int splits, int chunk, int64_t rows, acc_t count,
                      PoolOut<scalar_t> out, acc_t* __restrict__ psum,
                      acc_t* __restrict__ pmax, int* __restrict__ pidx) {
  __shared__ acc_t s_sum[VEC * kThreads];
  __shared__ acc_t s_max[VEC * kThreads];
  __shared__ int s_idx[VEC * kThreads];

  const TileCoord tc = tile_coord<VEC>(Lo, itiles, splits, chunk);
  const bool active = tc.i0 < Li;  // Li % VEC == 0 when VEC > 1, so the whole vector is in
  RunningPool<acc_t> pool[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) pool[j].start();
  if (active) {
    const scalar_t* __restrict__ xp = x + tc.n * Lo * Li + tc.i0;
    // A batch holds x's loads only; the scale of row o comes from L1 when visited.
    const auto load = [&](int o) { return load_vec<VEC>(xp + static_cast<int64_t>(o) * Li); };
    // One walk over the thread's rows; visit(j, v, o) sees them in increasing order.
    const auto walk = [&](auto unroll_c, const auto& visit) {
      for_each_batched<decltype(unroll_c)::value>(
          tc.o_begin + static_cast<int>(threadIdx.y), tc.o_end, static_cast<int>(blockDim.y),
          load, [&](int o, const RawVec<scalar_t, VEC>& raw) {
            acc_t v[VEC];
            widen<VEC>(raw, v);
            if constexpr (SCALE) {
              const acc_t sc = static_cast<acc_t>(scale[tc.n * Lo + o]);
#pragma unroll
              for (int j = 0; j < VEC; ++j) v[j] *= sc;
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j) visit(j, v[j], o);
          });
    };
    walk(std::integral_constant<int, kLoadsInFlight>{},
         [&](int j, acc_t v, int o) { pool[j].add(v, o); });
    bool exact = false;
#pragma unroll
    for (int j = 0; j < VEC; ++j) exact |= pool[j].needs_exact();
    if (exact) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) pool[j].restart_max();
      walk(std::integral_constant<int, 1>{},
           [&](int j, acc_t v, int o) { pool[j].add_exact(v, o); });
    }
  }

  // Fixed-shape tree over threadIdx.y; every thread takes part.
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_sum[j * kThreads + tid] = pool[j].sum;
    s_max[j * kThreads + tid] = pool[j].max;
    s_idx[j * kThreads + tid] = pool[j].idx;
  }
  __syncthreads();
  for (int stride = blockDim.y >> 1; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.y) < stride) {
      const int other = tid + stride * blockDim.x;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int a = j * kThreads + tid, b = j * kThreads + other;
        s_sum[a] += s_sum[b];
        if (arg_better(s_max[b], s_idx[b], s_max[a], s_idx[a])) {
          s_max[a] = s_max[b];
          s_idx[a] = s_idx[b];
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int a = j * kThreads + tid;
      const int64_t r = tc.n * Li + tc.i0 + j;
      if (splits == 1) {
        out.write(r, static_cast<scalar_t>(s_sum[a] / count), static_cast<scalar_t>(s_max[a]),
                  s_idx[a]);
      } else {
        const int64_t q = tc.split * rows + r;
        psum[q] = s_sum[a];
        pmax[q] = s_max[a];
        pidx[q] = s_idx[a];
      }
    }
  }
}

// The mean's share of a spatial pooling that the channel pooling's backward adds with its own
// (SPATIAL; channel_pool_backward_add): scale[n, c] * mean[n * mean_sample + p * mean_step] / C.
template <typename scalar_t>
struct SpatialShare {
  const scalar_t* __restrict__ scale;  // [N, C]
  const scalar_t* __restrict__ mean;
  int64_t mean_sample, mean_step;
};

// dx[n, o, i] = mean grad / count + (arg-max == q ? max grad : 0) at kept position k, with
// (k, q) = (i, o) when KEPT_INNER, else (o, i): the gradient of a (mean, first-max) pair pooled
// over q; with ACCUMULATE added to dx instead. With SPATIAL (a channel pooling's, adding: k is
// (n, c), q the pixel) each element also gets the spatial share `sp`, in the same rounding.
template <typename scalar_t, typename acc_t, int VEC, bool KEPT_INNER, bool ACCUMULATE,
          bool SPATIAL>
__global__ void __launch_bounds__(kThreads)
    max_scatter_backward_kernel(const PoolGrads<scalar_t> g, acc_t count, int Li, int Lo,
                                int64_t itiles, int splits, int chunk,
                                const SpatialShare<scalar_t> sp, scalar_t* __restrict__ dx) {
  static_assert(ACCUMULATE || !SPATIAL, "the spatial share is only added");
  const TileCoord tc = tile_coord<VEC>(Lo, itiles, splits, chunk);
  if (tc.i0 >= Li) return;  // no block-wide synchronisation in this kernel
  scalar_t* __restrict__ dp = dx + tc.n * Lo * Li + tc.i0;
  const auto spatial_mean = [&](int64_t p) {
    return static_cast<acc_t>(sp.mean[tc.n * sp.mean_sample + p * sp.mean_step]);
  };
  // What a batch holds of row o, as loaded (for_each_batched: four rows' loads in flight): the
  // values dx holds (ACCUMULATE), the spatial mean's gradient at pixel o (channels_last,
  // SPATIAL), and for NCHW the pooling's gradients of channel o and its scale.
  struct Row {
    RawVec<scalar_t, VEC> held;
    scalar_t spatial;
    PoolGrad<scalar_t> grad;
  };
  const auto rows = [&](const auto& load_row, const auto& row_out) {
    for_each_batched<kLoadsInFlight>(
        tc.o_begin + static_cast<int>(threadIdx.y), tc.o_end, static_cast<int>(blockDim.y),
        [&](int o) {
          Row r = load_row(o);
          if constexpr (ACCUMULATE) r.held = load_vec<VEC>(dp + static_cast<int64_t>(o) * Li);
          return r;
        },
        [&](int o, const Row& r) {
          acc_t out[VEC];
          row_out(o, r, out);
          if constexpr (ACCUMULATE) {
            acc_t held[VEC];
            widen<VEC>(r.held, held);
#pragma unroll
            for (int j = 0; j < VEC; ++j) out[j] += held[j];  // as store_or_add: rounded once
          }
          store_as<VEC>(dp + static_cast<int64_t>(o) * Li, out);
        });
  };
  if constexpr (KEPT_INNER) {  // channels_last: i = c, o = p
    acc_t a[VEC], m[VEC], s[VEC];
    int64_t id[VEC];
    load_pool_grads<VEC>(g, tc.n, tc.i0, count, Lo, a, m, id);
    if constexpr (SPATIAL) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s[j] = static_cast<acc_t>(sp.scale[tc.n * Li + tc.i0 + j]) / static_cast<acc_t>(Li);
      }
    }
    rows(
        [&](int o) {
          Row r{};
          if constexpr (SPATIAL) r.spatial = sp.mean[tc.n * sp.mean_sample + o * sp.mean_step];
          return r;
        },
        [&](int o, const Row& r, acc_t (&out)[VEC]) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] = a[j] + (id[j] == o ? m[j] : acc_t(0));
          if constexpr (SPATIAL) {
            const acc_t w = static_cast<acc_t>(r.spatial);
#pragma unroll
            for (int j = 0; j < VEC; ++j) out[j] += s[j] * w;
          }
        });
  } else {  // NCHW: o = c, i = p
    acc_t w[VEC];
    if constexpr (SPATIAL) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) w[j] = spatial_mean(tc.i0 + j);
    }
    rows(
        [&](int o) {
          Row r{};
          r.grad = pool_grad_at(g, tc.n, o);
          if constexpr (SPATIAL) r.spatial = sp.scale[tc.n * Lo + o];
          return r;
        },
        [&](int o, const Row& r, acc_t (&out)[VEC]) {
          acc_t a, m;
          int64_t id;
          r.grad.widen(count, Li, a, m, id);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] = a + (id == tc.i0 + j ? m : acc_t(0));
          if constexpr (SPATIAL) {
            const acc_t s = static_cast<acc_t>(r.spatial) / static_cast<acc_t>(Lo);
#pragma unroll
            for (int j = 0; j < VEC; ++j) out[j] += s * w[j];
          }
        });
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers. `like` supplies the device for partial buffers.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, bool SCALE>
void launch_row_pool(const at::Tensor& like, const scalar_t* x, const scalar_t* scale,
                     int64_t rows, int64_t rows_per_sample, int64_t L, int64_t count,
                     const PoolOut<scalar_t>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_width<scalar_t>();
  // About kLoadsInFlight vectors per thread (one batch), 4..kThreads threads per segment.
  auto group_for = [](int64_t len) {
    return static_cast<int>(std::clamp<int64_t>(
        pow2_ceil(ceil_div(ceil_div(len, VEC), kLoadsInFlight)), 4, kThreads));
  };
  int group = group_for(L);
  int64_t splits = 1;
  const int64_t target = resident_threads();
  if (rows * group < target && L > kMinChunk) {
    splits = std::min<int64_t>({ceil_div(target, rows * group), ceil_div(L, kMinChunk),
                                static_cast<int64_t>(kMaxSplits)});
  }
  int64_t chunk = L;
  if (splits > 1) {
    chunk = ceil_div(ceil_div(L, splits), 64) * 64;
    splits = ceil_div(L, chunk);  // every segment non-empty
    if (splits == 1) chunk = L;
    group = group_for(chunk);
  }
  const int64_t blocks = ceil_div(rows * splits, kThreads / group);
  TORCH_CHECK(blocks <= INT_MAX, "fused_cbam: tensor too large for the CUDA kernels' grid");

  at::Tensor psum, pmax, pidx;
  if (splits > 1) {
    psum = at::empty({splits, rows}, acc_options<acc_t>(like));
    pmax = at::empty({splits, rows}, acc_options<acc_t>(like));
    pidx = at::empty({splits, rows}, like.options().dtype(at::kInt));
  }
  acc_t* ps = splits > 1 ? psum.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* pm = splits > 1 ? pmax.mutable_data_ptr<acc_t>() : nullptr;
  int* pi = splits > 1 ? pidx.mutable_data_ptr<int>() : nullptr;
  row_pool_kernel<scalar_t, acc_t, SCALE>
      <<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(
          x, scale, rows, rows_per_sample, static_cast<int>(L), static_cast<int>(chunk),
          static_cast<int>(splits), group, static_cast<acc_t>(count), out, ps, pm, pi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    launch_pool_finalize<scalar_t, acc_t>(ps, pm, pi, rows, static_cast<int>(splits),
                                          static_cast<acc_t>(count), out);
  }
}

template <typename scalar_t, int VEC, bool SCALE>
void launch_outer_pool_vec(const at::Tensor& like, const scalar_t* x, const scalar_t* scale,
                           int64_t N, int64_t Li, int64_t Lo, int64_t count,
                           const PoolOut<scalar_t>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileConfig cfg = make_tile_config(N, Li, Lo, VEC, /*min_rows=*/4, kMaxSplits);
  const int64_t rows = N * Li;
  at::Tensor psum, pmax, pidx;
  if (cfg.splits > 1) {
    psum = at::empty({cfg.splits, rows}, acc_options<acc_t>(like));
    pmax = at::empty({cfg.splits, rows}, acc_options<acc_t>(like));
    pidx = at::empty({cfg.splits, rows}, like.options().dtype(at::kInt));
  }
  acc_t* ps = cfg.splits > 1 ? psum.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* pm = cfg.splits > 1 ? pmax.mutable_data_ptr<acc_t>() : nullptr;
  int* pi = cfg.splits > 1 ? pidx.mutable_data_ptr<int>() : nullptr;
  outer_pool_kernel<scalar_t, acc_t, VEC, SCALE><<<cfg.grid, cfg.block, 0, current_stream()>>>(
      x, scale, static_cast<int>(Li), static_cast<int>(Lo), cfg.itiles, cfg.splits, cfg.chunk,
      rows, static_cast<acc_t>(count), out, ps, pm, pi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (cfg.splits > 1) {
    launch_pool_finalize<scalar_t, acc_t>(ps, pm, pi, rows, cfg.splits,
                                          static_cast<acc_t>(count), out);
  }
}

template <typename scalar_t, bool SCALE>
void launch_outer_pool(const at::Tensor& like, const scalar_t* x, const scalar_t* scale,
                       int64_t N, int64_t Li, int64_t Lo, int64_t count,
                       const PoolOut<scalar_t>& out) {
  constexpr int V = vec_width<scalar_t>();
  if (Li % V == 0 && aligned16(x)) {
    launch_outer_pool_vec<scalar_t, V, SCALE>(like, x, scale, N, Li, Lo, count, out);
  } else {
    launch_outer_pool_vec<scalar_t, 1, SCALE>(like, x, scale, N, Li, Lo, count, out);
  }
}

template <typename scalar_t, int VEC, bool KEPT_INNER, bool ACCUMULATE, bool SPATIAL>
void launch_max_scatter_backward_vec(const PoolGrads<scalar_t>& g, int64_t count, int64_t N,
                                     int64_t Li, int64_t Lo, const SpatialShare<scalar_t>& sp,
                                     scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileConfig cfg = make_tile_config(N, Li, Lo, VEC, /*min_rows=*/4, INT_MAX);
  max_scatter_backward_kernel<scalar_t, acc_t, VEC, KEPT_INNER, ACCUMULATE, SPATIAL>
      <<<cfg.grid, cfg.block, 0, current_stream()>>>(g, static_cast<acc_t>(count),
                                                     static_cast<int>(Li), static_cast<int>(Lo),
                                                     cfg.itiles, cfg.splits, cfg.chunk, sp, dx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dx of x viewed as [N, Lo, Li] from the gradients of a (mean, max) pair pooled into [N, kept],
// written (or with ACCUMULATE added into dx; with SPATIAL also the spatial share `sp`).
template <typename scalar_t, bool ACCUMULATE, bool SPATIAL = false>
void launch_max_scatter_backward(const PoolGrads<scalar_t>& g, int64_t count, int64_t N,
                                 int64_t Li, int64_t Lo, bool kept_inner, scalar_t* dx,
                                 const SpatialShare<scalar_t>& sp = {}) {
  constexpr int V = vec_width<scalar_t>();
  const bool vec = Li % V == 0 && aligned16(dx);
  const auto launch = [&](auto vec_c, auto kept_inner_c) {
    launch_max_scatter_backward_vec<scalar_t, decltype(vec_c)::value,
                                    decltype(kept_inner_c)::value, ACCUMULATE, SPATIAL>(
        g, count, N, Li, Lo, sp, dx);
  };
  using One = std::integral_constant<int, 1>;
  using Vec = std::integral_constant<int, V>;
  if (kept_inner) {
    vec ? launch(Vec{}, std::true_type{}) : launch(One{}, std::true_type{});
  } else {
    vec ? launch(Vec{}, std::false_type{}) : launch(One{}, std::false_type{});
  }
}

// A pooling's gradient [N, ...kept] as PoolGrads reads it: (n, k) at n * sample + k * step, k
// over the kept dimensions flattened. A view whose kept positions are evenly spaced (a channel
// of the spatial conv's input gradient, NCHW or channels_last) is read in place; any other is
// copied to contiguous. `holder` keeps a copy alive.
struct GradView {
  at::Tensor holder;
  int64_t sample, step;
};

inline GradView grad_view(const at::Tensor& t) {
  // The kept dimensions of extent > 1 must step evenly: each stride = the next one's * extent.
  int64_t step = 1, expected = -1;
  bool even = true;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) == 1) continue;
    if (expected < 0) {
      step = t.stride(d);
    } else if (t.stride(d) != expected) {
      even = false;
    }
    expected = t.stride(d) * t.size(d);
  }
  if (even) return {t, t.stride(0), step};
  at::Tensor dense = t.contiguous();
  return {dense, dense.numel() / std::max<int64_t>(1, dense.size(0)), 1};
}

template <typename scalar_t>
PoolGrads<scalar_t> pool_grads(const GradView& mean, const GradView& max, const at::Tensor& argmax,
                               int64_t kept) {
  return {mean.holder.const_data_ptr<scalar_t>(), mean.sample, mean.step,
          max.holder.const_data_ptr<scalar_t>(),  max.sample,  max.step,
          argmax.const_data_ptr<int32_t>(),       kept};
}

}  // namespace gpu
}  // namespace fused_cbam
