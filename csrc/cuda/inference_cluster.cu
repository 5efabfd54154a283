// cbam_inference in one kernel on Hopper (sm_90): x read from HBM once and the output written
// once, 2·|x|, where the chunked form reads x three times and torch.compile's code moves 4·|x|
// (benchmarks/NOTES.md, twenty-first session). A thread-block cluster keeps its samples in its
// blocks' shared memory from the channel pooling to the output.
//
// A cluster of K blocks takes S samples, and block r holds channels [r·CPC, (r+1)·CPC) of each of
// their pixels. With a cluster barrier wherever a block reads what another wrote:
//  1. the slice is copied into shared memory (cp.async); the block pools its channels (mean and
//     max over H×W) and writes them into every block;                                  barrier
//  2. the MLP's first layer: block r computes its share of the hidden units, written into every
//     block;                                                                           barrier
//     the last layer for the block's own channels: their gates g;
//  3. each pixel's sum and max of x·g over the block's channels;                       barrier
//  4. block r's share of the pixels: the K partials combined in rank order into the mean and
//     max maps, written into every block;                                              barrier
//  5. block r's share of the spatial gate h (the conv, the BatchNorm, the sigmoid), written into
//     every block;                                                                     barrier
//  6. out = (x·g)·h of the block's slice, from shared memory.
// Roundings are the chunked form's, which shares the MLP's and the gate's code
// (inference.cuh): the two differ only in the order of the pooling sums.
#include <cooperative_groups.h>
#include <cuda_pipeline_primitives.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "inference.cuh"

namespace fused_cbam {
namespace gpu {
namespace {

namespace cg = cooperative_groups;

// Two blocks an SM where their shared memory allows: ptxas's 85-109 registers a thread then fit
// (at 512 threads a block, one block would fill an SM's registers alone).
constexpr int kClusterThreads = 256;
constexpr int kMaxClusterBlocks = 16;  // a non-portable cluster size, allowed on Hopper
constexpr int kMaxClusterSamples = 8;
// Steps of an MLP row a lane unrolls: a block computes few rows (M/K of the first layer) while
// its other warps wait at the next barrier, so each lane keeps 2 x 8 weight loads from L2 in
// flight instead of the chunked kernel's 2 x 2. (Unused by the sm_80 pass: no kernel body there.)
[[maybe_unused]] constexpr int kClusterMlpUnroll = 8;


// Where each array lives in a block's dynamic shared memory (byte offsets, 16-byte aligned), for
// at most S samples a cluster.
struct ClusterSmem {
  int64_t per_block;  // channels a block holds (the last blocks may hold fewer, or none)
  int64_t row;       // channels_last: one pixel's channels of the slice, in elements
  int64_t x_sample;  // one sample's slice, in elements
  int64_t x, pooled, hidden, gate, psum, pmax, maps, h, scratch, total;

  // C channels over K blocks, P pixels, M hidden units (0 for a one-layer MLP).
  ClusterSmem(int64_t S, int64_t K, int64_t C, int64_t P, int64_t M, int64_t pools, bool cl,
              int64_t elem, int64_t acc) {
    per_block = ceil_div(C, K);
    row = ceil_div(per_block, 16 / elem) * (16 / elem);
    x_sample = cl ? P * row : ceil_div(per_block * P, 16 / elem) * (16 / elem);
    int64_t at = 0;
    const auto take = [&at](int64_t bytes) {
      const int64_t offset = at;
      at = ceil_div(at + bytes, 16) * 16;
      return offset;
    };
    x = take(S * x_sample * elem);
    pooled = take(2 * S * C * elem);       // [avg, max][S][C]
    hidden = take(pools * S * M * elem);   // [pools][S][M]
    gate = take(S * per_block * elem);     // [S][per_block]
    psum = take(S * P * acc);              // [S][P]
    pmax = take(S * P * acc);
    maps = take(2 * S * P * elem);         // [S][mean, max][P]
    h = take(S * P * elem);                // [S][P]
    scratch = take(2 * kClusterThreads * acc);
    total = at;
  }
};

template <typename scalar_t>
struct ClusterArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ out;
  const scalar_t* w1;
  const scalar_t* b1;  // nullptr where absent, as b2
  const scalar_t* w2;  // nullptr: fc1 alone gives the logits
  const scalar_t* b2;
  SpatialGateParams<scalar_t, acc_t> conv;
  ClusterSmem smem;
  int64_t N;
  int C, H, W, M, K, samples;
};

// The max of torch.max: NaN wins.
template <typename A>
__device__ __forceinline__ A nan_max(A m, A v) {
  return (v > m || v != v) ? v : m;
}

template <typename A>
__device__ __forceinline__ A warp_nan_max(A v) {
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <typename scalar_t, bool CL, int POOLS, bool MIX>
__global__ void __launch_bounds__(kClusterThreads, 2)
    cbam_cluster_kernel(const ClusterArgs<scalar_t> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; cbam_inference_cluster launches nothing on older devices
#else
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_width<scalar_t>();
  constexpr int T = kClusterThreads;
  const cg::cluster_group cluster = cg::this_cluster();
  // Other blocks write into this one's shared memory only after every block has started.
  auto started = cluster.barrier_arrive();

  const int K = a.K, rank = static_cast<int>(cluster.block_rank());
  const int C = a.C, P = a.H * a.W, tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32, warps = T / 32;
  const ClusterSmem& L = a.smem;
  const int per_block = static_cast<int>(L.per_block);
  const int c0 = rank * per_block;
  const int cn = max(0, min(C - c0, per_block));  // this block's channels
  const int pixels_per_block = (P + K - 1) / K;
  const int p0 = rank * pixels_per_block;
  const int pn = max(0, min(P - p0, pixels_per_block));  // this block's share of the pixels
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / K) * a.samples;
  const int S = static_cast<int>(min(static_cast<int64_t>(a.samples), a.N - n0));

  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem + L.x);
  scalar_t* pooled = reinterpret_cast<scalar_t*>(smem + L.pooled);
  scalar_t* hidden = reinterpret_cast<scalar_t*>(smem + L.hidden);
  scalar_t* gate = reinterpret_cast<scalar_t*>(smem + L.gate);
  acc_t* psum = reinterpret_cast<acc_t*>(smem + L.psum);
  acc_t* pmax = reinterpret_cast<acc_t*>(smem + L.pmax);
  scalar_t* maps = reinterpret_cast<scalar_t*>(smem + L.maps);
  scalar_t* hmap = reinterpret_cast<scalar_t*>(smem + L.h);
  acc_t* scratch = reinterpret_cast<acc_t*>(smem + L.scratch);

  // The slice as rows: NCHW one run of cn·P elements a sample, channels_last P runs of cn. A
  // block's slice fits its shared memory, so 32-bit indices count its elements.
  const int rows = CL ? P : 1;
  const int len = CL ? cn : cn * P;
  const int64_t x_sample = static_cast<int64_t>(C) * P;
  const auto global_row = [&](int s, int row) -> int64_t {
    return (n0 + s) * x_sample +
           (CL ? static_cast<int64_t>(row) * C + c0 : static_cast<int64_t>(c0) * P);
  };
  const auto smem_row = [&](int s, int row) {
    return xs + s * L.x_sample + (CL ? static_cast<int64_t>(row) * L.row : 0);
  };
  const int cstep = CL ? 1 : P;                      // from one channel to the next in the slice
  const int pstep = CL ? static_cast<int>(L.row) : 1;  // from one pixel to the next
  // 16-byte copies where every row starts on a 16-byte boundary; the rest element by element.
  const bool vec = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && x_sample % V == 0 &&
                   (CL ? C % V == 0 && c0 % V == 0 : (static_cast<int64_t>(c0) * P) % V == 0);
  const int nv = vec ? len / V : 0;
  const int done = nv * V, tail = len - done;

  // 1. The slice into shared memory; the block's channel pooling, written into every block.
  for (int i = tid; i < S * rows * nv; i += T) {
    const int k = i % nv, sr = i / nv, row = sr % rows, s = sr / rows;
    __pipeline_memcpy_async(smem_row(s, row) + k * V, a.x + global_row(s, row) + k * V, 16);
  }
  __pipeline_commit();
  for (int i = tid; i < S * rows * tail; i += T) {
    const int k = done + i % tail, sr = i / tail, row = sr % rows, s = sr / rows;
    smem_row(s, row)[k] = a.x[global_row(s, row) + k];
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  cluster.barrier_wait(std::move(started));

  const auto publish_pool = [&](int q, acc_t sum, acc_t mx) {  // q = s * cn + channel
    const int s = q / cn, c = c0 + q % cn;
    const scalar_t avg = static_cast<scalar_t>(sum / static_cast<acc_t>(P));
    const scalar_t top = static_cast<scalar_t>(mx);
    for (int r = 0; r < K; ++r) {
      scalar_t* remote = cluster.map_shared_rank(pooled, r);
      remote[s * C + c] = avg;
      remote[(S + s) * C + c] = top;
    }
  };
  // Pixels part, part + parts, ... of column q's channel.
  const auto pool_column = [&](int q, int part, int parts, acc_t& sum, acc_t& mx) {
    const scalar_t* col = xs + (q / cn) * L.x_sample + (q % cn) * cstep;
    sum = 0;
    mx = neg_inf<acc_t>();
    for (int p = part; p < P; p += parts) {
      const acc_t v = static_cast<acc_t>(col[p * pstep]);
      sum += v;
      mx = nan_max(mx, v);
    }
  };
  const int cols = S * cn;
  if constexpr (!CL) {  // a warp a channel, its lanes along the channel's contiguous pixels
    for (int q = warp; q < cols; q += warps) {
      acc_t sum, mx;
      pool_column(q, lane, 32, sum, mx);
      sum = group_sum(sum, 32);
      mx = warp_nan_max(mx);
      if (lane == 0) publish_pool(q, sum, mx);
    }
  } else if (cols >= T) {  // a thread a channel, neighbours on neighbouring channels
    for (int q = tid; q < cols; q += T) {
      acc_t sum, mx;
      pool_column(q, 0, 1, sum, mx);
      publish_pool(q, sum, mx);
    }
  } else if (cols > 0) {  // `parts` threads a channel, their partials combined in part order
    const int parts = T / cols;
    if (tid < cols * parts) pool_column(tid % cols, tid / cols, parts, scratch[tid], scratch[T + tid]);
    __syncthreads();
    if (tid < cols) {
      acc_t sum = 0, mx = neg_inf<acc_t>();
      for (int part = 0; part < parts; ++part) {
        sum += scratch[part * cols + tid];
        mx = nan_max(mx, scratch[T + part * cols + tid]);
      }
      publish_pool(tid, sum, mx);
    }
  }
  cluster.sync();

  // 2. The MLP. Warps take kMlpWarpRows rows at a time (warp-uniform loops: the layer's
  // butterflies need every lane).
  const bool two_layers = a.w2 != nullptr;
  const MlpLayer<scalar_t, scalar_t> first{pooled, pooled + S * C, a.w1, a.b1, S, C, a.M,
                                           !two_layers};
  const auto rows_of = [&](int r_begin, int r_end, const auto& layer_rows) {
    for (int r0 = r_begin + warp * kMlpWarpRows; r0 < r_end; r0 += warps * kMlpWarpRows) {
      for (int s0 = 0; s0 < S; s0 += kMlpSamples) layer_rows(r0, r_end, s0);
    }
  };
  const auto to_gate = [&](int, int64_t s, int r, scalar_t v) { gate[s * per_block + r - c0] = v; };
  if (two_layers) {
    const int per_block_hidden = (a.M + K - 1) / K;
    const int m0 = min(a.M, rank * per_block_hidden);
    const auto to_every_block = [&](int pool, int64_t s, int r, scalar_t v) {
      for (int q = 0; q < K; ++q) cluster.map_shared_rank(hidden, q)[(pool * S + s) * a.M + r] = v;
    };
    rows_of(m0, min(a.M, m0 + per_block_hidden), [&](int r0, int r_end, int s0) {
      mlp_warp_rows<scalar_t, scalar_t, POOLS, MIX, kClusterMlpUnroll>(first, r0, r_end, s0,
                                                                       to_every_block);
    });
    cluster.sync();
    const MlpLayer<scalar_t, scalar_t> second{hidden, hidden + (POOLS - 1) * S * a.M, a.w2, a.b2,
                                              S, a.M, C, true};
    rows_of(c0, c0 + cn, [&](int r0, int r_end, int s0) {
      mlp_warp_rows<scalar_t, scalar_t, POOLS, false, kClusterMlpUnroll>(second, r0, r_end, s0,
                                                                         to_gate);
    });
  } else {
    rows_of(c0, c0 + cn, [&](int r0, int r_end, int s0) {
      mlp_warp_rows<scalar_t, scalar_t, POOLS, MIX, kClusterMlpUnroll>(first, r0, r_end, s0,
                                                                       to_gate);
    });
  }
  __syncthreads();

  // 3. Each pixel's partial sum and max of x·g over the block's channels.
  for (int f = tid; f < S * P; f += T) {
    const int s = f / P, p = f % P;
    const scalar_t* px = xs + s * L.x_sample + p * pstep;
    const scalar_t* g = gate + s * per_block;
    acc_t sum = 0, mx = neg_inf<acc_t>();
    int c = 0;
    if constexpr (CL) {  // the pixel's row is 16-byte aligned
      for (; c + V <= cn; c += V) {
        acc_t v[V];
        widen<V>(load_vec<V>(px + c), v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t y = v[j] * static_cast<acc_t>(g[c + j]);
          sum += y;
          mx = nan_max(mx, y);
        }
      }
    }
    for (; c < cn; ++c) {
      const acc_t y = static_cast<acc_t>(px[c * cstep]) * static_cast<acc_t>(g[c]);
      sum += y;
      mx = nan_max(mx, y);
    }
    psum[f] = sum;
    pmax[f] = mx;
  }
  cluster.sync();

  // 4. The maps of the block's pixels, from every block's partials in rank order.
  for (int f = tid; f < S * pn; f += T) {
    const int s = f / pn, i = s * P + p0 + f % pn;
    acc_t sum = 0, mx = neg_inf<acc_t>();
    for (int q = 0; q < K; ++q) {
      sum += cluster.map_shared_rank(psum, q)[i];
      mx = nan_max(mx, cluster.map_shared_rank(pmax, q)[i]);
    }
    const scalar_t mean = static_cast<scalar_t>(sum / static_cast<acc_t>(C));
    const scalar_t top = static_cast<scalar_t>(mx);
    for (int q = 0; q < K; ++q) {
      scalar_t* remote = cluster.map_shared_rank(maps, q);
      remote[i + s * P] = mean;  // [S][mean, max][P]
      remote[i + s * P + P] = top;
    }
  }
  cluster.sync();

  // 5. The spatial gate of the block's pixels.
  const SpatialGate<scalar_t, acc_t> gate_at(a.conv);
  for (int f = tid; f < S * pn; f += T) {
    const int s = f / pn, p = p0 + f % pn;
    const scalar_t* mean = maps + 2 * s * P;
    const scalar_t v = gate_at(mean, mean + P, a.H, a.W, p / a.W, p % a.W);
    for (int q = 0; q < K; ++q) cluster.map_shared_rank(hmap, q)[s * P + p] = v;
  }
  cluster.sync();

  // 6. out = (x·g)·h, rounded once, as gate_apply computes it, in x's memory order.
  const auto apply = [&](int s, int c, int p, acc_t v) {
    return (v * static_cast<acc_t>(gate[s * per_block + c])) * static_cast<acc_t>(hmap[s * P + p]);
  };
  for (int i = tid; i < S * rows * nv; i += T) {
    const int k = i % nv, sr = i / nv, row = sr % rows, s = sr / rows;
    acc_t v[V];
    widen<V>(load_vec<V>(smem_row(s, row) + k * V), v);
    int c = CL ? k * V : k * V / P;  // NCHW: the run's element k·V is (c, p)
    int p = CL ? row : k * V - c * P;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] = apply(s, c, p, v[j]);
      if constexpr (CL) {
        ++c;
      } else if (++p == P) {
        p = 0;
        ++c;
      }
    }
    store_as<V>(a.out + global_row(s, row) + k * V, v);
  }
  for (int i = tid; i < S * rows * tail; i += T) {
    const int k = done + i % tail, sr = i / tail, row = sr % rows, s = sr / rows;
    const int c = CL ? k : k / P, p = CL ? row : k % P;
    a.out[global_row(s, row) + k] =
        static_cast<scalar_t>(apply(s, c, p, static_cast<acc_t>(smem_row(s, row)[k])));
  }
#endif
}

// A cluster launch's shape: K blocks a cluster, S samples a cluster; K == 0 where none fits.
struct ClusterShape {
  int64_t K, S;
};

cudaLaunchConfig_t cluster_config(const ClusterShape& shape, int64_t N, int64_t smem_bytes,
                                  cudaLaunchAttribute& cluster_dim) {
  cluster_dim = {};
  cluster_dim.id = cudaLaunchAttributeClusterDimension;
  cluster_dim.val.clusterDim.x = static_cast<unsigned>(shape.K);
  cluster_dim.val.clusterDim.y = 1;
  cluster_dim.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(ceil_div(N, shape.S) * shape.K));
  config.blockDim = dim3(kClusterThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = current_stream();
  config.attrs = &cluster_dim;
  config.numAttrs = 1;
  return config;
}

// The cluster shape for a kernel, a device and a problem, chosen once and remembered: the
// choice asks the device a dozen questions (attributes, occupancy), which a call in eager mode
// would otherwise pay each time. `choose` runs under the lock, once per key.
ClusterShape remembered(const void* kernel, int dev, int64_t N, int64_t C, int64_t P, int64_t M,
                        const std::function<ClusterShape()>& choose) {
  using Key = std::tuple<const void*, int, int64_t, int64_t, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, ClusterShape> chosen;
  const std::lock_guard<std::mutex> lock(mutex);
  const Key key{kernel, dev, N, C, P, M};
  auto it = chosen.find(key);
  if (it == chosen.end()) it = chosen.emplace(key, choose()).first;
  return it->second;
}

template <typename scalar_t>
bool launch_cluster(const at::Tensor& x, const inference::Mlp& mlp, c10::string_view pooling,
                    const inference::SpatialConv& conv, double bn_eps, bool max_first,
                    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int dev = x.device().index();
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const bool two_layers = mlp.w2.defined();
  const int64_t M = two_layers ? mlp.w1.size(0) : 0;
  const bool cl = is_channels_last(x);
  const auto ptr = [](const at::Tensor& t) {
    return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
  };
  bool launched = false;
  with_mlp_variant(pooling == "sum" ? 2 : 1, pooling == "mix", [&](auto pools_c, auto mix_c) {
    constexpr int POOLS = decltype(pools_c)::value;
    constexpr bool MIX = decltype(mix_c)::value;
    const auto kernel = cl ? cbam_cluster_kernel<scalar_t, true, POOLS, MIX>
                           : cbam_cluster_kernel<scalar_t, false, POOLS, MIX>;
    const auto layout = [&](int64_t S, int64_t K) {
      return ClusterSmem(S, K, C, P, M, POOLS, cl, sizeof(scalar_t), sizeof(acc_t));
    };
    const auto choose = [&]() -> ClusterShape {
      // A device that refuses a query or a setting gets the chunked form rather than an error.
      const auto ok = [](cudaError_t e) {
        if (e == cudaSuccess) return true;
        (void)cudaGetLastError();
        return false;
      };
      int major = 0, sms = 0, optin = 0, per_sm = 0;
      if (!ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) ||
          major < 9 ||
          !ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) ||
          !ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) ||
          !ok(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev))) {
        return {0, 0};
      }
      // Code for sm_90 or later in the library (a build whose only code for this device is
      // older PTX has the trapping body).
      cudaFuncAttributes attributes{};
      if (!ok(cudaFuncGetAttributes(&attributes, kernel)) || attributes.ptxVersion < 90) {
        return {0, 0};
      }
      // The kernel-wide limits, set to the most this device allows (never lowered by a later
      // call with less: a CUDA graph captured with more must still replay).
      const int64_t fixed = static_cast<int64_t>(attributes.sharedSizeBytes);
      const int64_t dynamic = optin - fixed, two_an_sm = per_sm / 2 - 1024 - fixed;
      if (!ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(dynamic))) ||
          !ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1))) {
        return {0, 0};
      }
      // The most blocks a cluster (each then holds the fewest channels), first among those that
      // split the channels evenly in 16-byte pieces, then as many samples as keep two blocks an
      // SM and a block for every SM: each cluster reads the MLP's weights once.
      for (int64_t candidate = 0; candidate < 10; ++candidate) {
        const bool even = candidate < 5;
        const int64_t K = int64_t{kMaxClusterBlocks} >> (candidate % 5);
        if (K > C && K > 1) continue;
        if (even && (C % K != 0 || (C / K) % (16 / static_cast<int64_t>(sizeof(scalar_t))) != 0)) {
          continue;
        }
        if (layout(1, K).total > dynamic) continue;
        int64_t S = 1;
        while (S < kMaxClusterSamples && layout(2 * S, K).total <= two_an_sm &&
               ceil_div(N, 2 * S) * K >= sms) {
          S *= 2;
        }
        if (ceil_div(N, S) * K > INT_MAX) continue;
        cudaLaunchAttribute cluster_dim;
        const cudaLaunchConfig_t config =
            cluster_config({K, S}, N, layout(S, K).total, cluster_dim);
        // The largest cluster this block size and shared memory allow, asked first so that a
        // size the device cannot place is skipped without an error (compute-sanitizer counts
        // even a handled one); then how many such clusters the device holds at once: 0, none.
        int largest = 0, clusters = 0;
        if (ok(cudaOccupancyMaxPotentialClusterSize(&largest, kernel, &config)) && largest >= K &&
            ok(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config)) && clusters > 0) {
          return {K, S};
        }
      }
      return {0, 0};
    };
    const ClusterShape shape =
        remembered(reinterpret_cast<const void*>(kernel), dev, N, C, P, M, choose);
    if (shape.K == 0) return;
    const ClusterSmem smem = layout(shape.S, shape.K);
    cudaLaunchAttribute cluster_dim;
    const cudaLaunchConfig_t config = cluster_config(shape, N, smem.total, cluster_dim);
    const ClusterArgs<scalar_t> args{
        x.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(),
        mlp.w1.const_data_ptr<scalar_t>(),
        ptr(mlp.b1),
        ptr(mlp.w2),
        ptr(mlp.b2),
        spatial_gate_params<scalar_t, acc_t>(conv, bn_eps, max_first),
        smem,
        N,
        static_cast<int>(C),
        static_cast<int>(x.size(2)),
        static_cast<int>(x.size(3)),
        static_cast<int>(two_layers ? M : C),
        static_cast<int>(shape.K),
        static_cast<int>(shape.S)};
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

}  // namespace

bool cbam_inference_cluster(const at::Tensor& x, const inference::Mlp& mlp,
                            c10::string_view pooling, const inference::SpatialConv& conv,
                            double bn_eps, bool max_first, at::Tensor& out) {
  const char* choice = std::getenv("FUSED_CBAM_CUDA_INFERENCE");
  const bool asked = choice != nullptr && std::strcmp(choice, "cluster") == 0;
  TORCH_CHECK_VALUE(asked || choice == nullptr || std::strcmp(choice, "chunks") == 0,
                    "FUSED_CBAM_CUDA_INFERENCE: expected \"chunks\" or \"cluster\", got \"",
                    choice, "\"");
  if (!asked) return false;
  // The modules' case: every parameter in x's dtype (mixed precision takes the chunked form).
  // Each group was converted as a whole (inference::read_dtype), so one tensor tells its dtype.
  if (mlp.w1.scalar_type() != x.scalar_type() || conv.weight.scalar_type() != x.scalar_type()) {
    return false;
  }
  switch (x.scalar_type()) {
    case at::kFloat:
      return launch_cluster<float>(x, mlp, pooling, conv, bn_eps, max_first, out);
    case at::kHalf:
      return launch_cluster<at::Half>(x, mlp, pooling, conv, bn_eps, max_first, out);
    case at::kBFloat16:
      return launch_cluster<at::BFloat16>(x, mlp, pooling, conv, bn_eps, max_first, out);
    default:  // float64: the chunked form
      return false;
  }
}

}  // namespace gpu
}  // namespace fused_cbam
