// Shared pieces of the CUDA kernels: vector loads, the (value, index) arg-max rule, warp
// reductions, the deterministic split finalisers, launch geometry and input checks.
//
// Layout vocabulary used by every kernel here: x is viewed as [N, Lo, Li] with the inner
// dimension Li contiguous. NCHW: (Lo, Li) = (C, P); channels_last: (Lo, Li) = (P, C).
// A "tile" block is TX x TY threads: TX lanes along Li (each lane VEC consecutive elements),
// TY rows along Lo. Reductions over Li go through lane shuffles, reductions over Lo through
// registers and a shared-memory tree; splits of either are written as float partials and summed
// by a second kernel in a fixed order. No atomics anywhere: results are bitwise reproducible
// for a given shape, alignment and device.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fused_cbam {
namespace gpu {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kMaxSplits = 256;  // bound of the sequential loop of the finalisers
constexpr int64_t kMaxRow = int64_t{1} << 30;  // largest C and H * W (32-bit index math)

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));  // elements of one 16-byte load
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// VEC elements as loaded, held in 32-bit words where they fill them: a vector of 16-bit
// elements held across a branch's join is otherwise split there into one register per element
// (a PRMT, which waits on the load), and a batch of loads issued ahead waits row by row.
template <typename T, int N>
struct RawVec {
  static constexpr bool kWords = sizeof(T) < 4 && (sizeof(T) * N) % 4 == 0;
  using W = std::conditional_t<kWords, uint32_t, T>;
  static constexpr int kN = kWords ? static_cast<int>(sizeof(T) * N / 4) : N;
  alignas(sizeof(T) * N) W w[kN];
};

// Loads VEC elements, 16-byte aligned when VEC > 1, as they are stored.
template <int VEC, typename T>
__device__ __forceinline__ RawVec<T, VEC> load_vec(const T* __restrict__ p) {
  return *reinterpret_cast<const RawVec<T, VEC>*>(p);
}

// Widens loaded elements to the math type.
template <int VEC, typename T, typename A>
__device__ __forceinline__ void widen(const RawVec<T, VEC>& r, A (&out)[VEC]) {
  AlignedVec<T, VEC> v;
  memcpy(&v, &r, sizeof(v));
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<A>(v.val[j]);
}

// Loads VEC elements (16-byte aligned when VEC > 1) and widens them to the math type.
template <int VEC, typename T, typename A>
__device__ __forceinline__ void load_as(const T* __restrict__ p, A (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    widen<VEC>(load_vec<VEC>(p), out);
  }
}

// Rounds VEC math-type values once to T and stores them (16-byte aligned when VEC > 1).
template <int VEC, typename T, typename A>
__device__ __forceinline__ void store_as(T* __restrict__ p, const A (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    AlignedVec<T, VEC> v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.val[j] = static_cast<T>(in[j]);
    *reinterpret_cast<AlignedVec<T, VEC>*>(p) = v;
  }
}

// Stores VEC math-type values as store_as does, or with ACCUMULATE adds them to what p holds
// (the sum rounded once): the backward operators that add into one gradient of x.
template <bool ACCUMULATE, int VEC, typename T, typename A>
__device__ __forceinline__ void store_or_add(T* __restrict__ p, A (&in)[VEC]) {
  if constexpr (ACCUMULATE) {
    A held[VEC];
    load_as<VEC>(p, held);
#pragma unroll
    for (int j = 0; j < VEC; ++j) in[j] += held[j];
  }
  store_as<VEC>(p, in);
}

constexpr int kLoadsInFlight = 4;  // loads a streaming thread issues before using the first

// Calls visit(i, load(i)) for i = first, first + step, ... < end, in increasing order, issuing
// up to UNROLL loads before the first of their visits: a `#pragma unroll` of the plain loop
// keeps one load in flight, since no load may move above the exit check of the iteration
// before it. The loads past `end` of the last batch are predicated off, not made.
template <int UNROLL, typename Load, typename Visit>
__device__ __forceinline__ void for_each_batched(int first, int end, int step, const Load& load,
                                                 const Visit& visit) {
  for (int i = first; i < end; i += UNROLL * step) {
    decltype(load(i)) batch[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (i + u * step < end) batch[u] = load(i + u * step);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (i + u * step < end) visit(i + u * step, batch[u]);
    }
  }
}

// for_each_batched for a block whose rows all take part in warp-wide work at every step (a
// lane reduction): thread row ty of the block has the rows o = ob + ty for ob = first, first +
// step, ... < end. Each thread loads the rows it has (load(o), where `active` and o < end), then
// visit(o, row, entry) runs at every step of the block with a row left, `row` saying whether
// this thread has one there (its entry is loaded only then, if active): the trip counts depend
// on block-uniform values alone.
template <int UNROLL, typename Load, typename Visit>
__device__ __forceinline__ void for_each_batched_uniform(int first, int end, int step, int ty,
                                                         bool active, const Load& load,
                                                         const Visit& visit) {
  for (int ob = first; ob < end; ob += UNROLL * step) {
    decltype(load(first)) batch[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int o = ob + u * step + ty;
      if (active && o < end) batch[u] = load(o);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (ob + u * step >= end) break;  // no row of the block left: uniform over it
      const int o = ob + u * step + ty;
      visit(o, o < end, batch[u]);
    }
  }
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return static_cast<A>(-INFINITY);
}

constexpr int kNoIndex = INT_MAX;  // index of the empty arg-max; loses every comparison

// The arg-max rule of torch.max(dim): NaN beats everything, then the larger value, and among
// equals (NaN or not) the lower index. A total order on (value, index) pairs, so partial results
// may be combined in any grouping. Returns whether (v, i) replaces (bv, bi).
template <typename A>
__device__ __forceinline__ bool arg_better(A v, int i, A bv, int bi) {
  const bool v_nan = v != v;
  const bool b_nan = bv != bv;
  if (v_nan) return !b_nan || i < bi;
  if (b_nan) return false;
  return v > bv || (v == bv && i < bi);
}

template <typename A>
__device__ __forceinline__ void arg_update(A v, int i, A& bv, int& bi) {
  if (arg_better(v, i, bv, bi)) {
    bv = v;
    bi = i;
  }
}

// Butterfly sum over aligned groups of `width` lanes (a power of two <= 32). Every lane of the
// warp must call it. xor pairs add the same two operands, so all lanes of a group end with the
// same bits.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum and (value, index) arg-max over aligned groups of `width` lanes; every lane must call it.
template <typename A>
__device__ __forceinline__ void group_pool(A& sum, A& bv, int& bi, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) {
    const A s = __shfl_xor_sync(0xffffffffu, sum, off);
    const A v = __shfl_xor_sync(0xffffffffu, bv, off);
    const int i = __shfl_xor_sync(0xffffffffu, bi, off);
    sum += s;
    arg_update(v, i, bv, bi);
  }
}

// Tile prologue: block b of a grid of itiles * splits * N blocks.
struct TileCoord {
  int64_t n;
  int i0;       // first inner index of this lane
  int itile;
  int split;
  int o_begin;  // outer range of this split
  int o_end;
};

template <int VEC>
__device__ __forceinline__ TileCoord tile_coord(int Lo, int64_t itiles, int splits, int chunk) {
  TileCoord t;
  // 32-bit division: the grid has at most INT_MAX blocks, so itiles and splits fit too.
  const unsigned it = static_cast<unsigned>(itiles), sp = static_cast<unsigned>(splits);
  unsigned b = blockIdx.x;
  t.itile = static_cast<int>(b % it);
  b /= it;
  t.split = static_cast<int>(b % sp);
  t.n = static_cast<int64_t>(b / sp);
  t.i0 = (t.itile * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
  t.o_begin = t.split * chunk;
  t.o_end = min(Lo, t.o_begin + chunk);
  return t;
}

// Deterministic tree over threadIdx.y of VEC values per thread, kept in `smem`
// ([VEC][kThreads]); afterwards row ty == 0 holds the column sums. Every thread must call it.
template <int VEC, typename A>
__device__ __forceinline__ void tree_sum_over_y(A (&v)[VEC], A* smem) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < VEC; ++j) smem[j * kThreads + tid] = v[j];
  __syncthreads();
  for (int stride = blockDim.y >> 1; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.y) < stride) {
      const int other = tid + stride * blockDim.x;
#pragma unroll
      for (int j = 0; j < VEC; ++j) smem[j * kThreads + tid] += smem[j * kThreads + other];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = smem[j * kThreads + tid];
}

// Stores the sum v of row r from part `part_index` of `parts`: the final value when one part
// covers the row, else a float partial that a finalize kernel adds in part order.
template <typename scalar_t, typename A>
__device__ __forceinline__ void store_row_sum(A v, int64_t r, int64_t part_index, int64_t parts,
                                              int64_t rows, scalar_t* final_out, A* partials) {
  if (parts == 1) {
    final_out[r] = static_cast<scalar_t>(v);
  } else {
    partials[part_index * rows + r] = v;
  }
}

// out[r] = sum over s of part[s * rows + r], rounded once to scalar_t. `width` lanes (a power
// of two <= 32) share a row: lane l adds s = l, l + width, ... in order, then a butterfly.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_finalize_kernel(const acc_t* __restrict__ part, int64_t rows, int splits, int width,
                        scalar_t* __restrict__ out) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = gid / width;
  const int lane = static_cast<int>(gid % width);
  acc_t s = 0;
  if (r < rows) {
    for (int k = lane; k < splits; k += width) s += part[k * rows + r];
  }
  s = group_sum(s, width);  // every lane takes part, live row or not
  if (r < rows && lane == 0) out[r] = static_cast<scalar_t>(s);
}

// Where a pooling writes the mean and max of its pooled row r = n * per_sample + k: at
// n * sample_stride + k, so that they may be two channels of one tensor (the spatial conv's
// [N, 2, H, W] input; dense when sample_stride == per_sample); the arg-max dense, at r.
template <typename scalar_t>
struct PoolOut {
  scalar_t* __restrict__ avg;
  scalar_t* __restrict__ mx;
  int32_t* __restrict__ idx;
  int64_t per_sample, sample_stride;

  __device__ __forceinline__ int64_t at(int64_t r) const {
    return sample_stride == per_sample ? r : r / per_sample * sample_stride + r % per_sample;
  }
  __device__ __forceinline__ void write(int64_t r, scalar_t mean, scalar_t max, int arg) const {
    const int64_t o = at(r);
    avg[o] = mean;
    mx[o] = max;
    idx[r] = arg;
  }
};

// PoolOut of dense [rows] outputs.
template <typename scalar_t>
PoolOut<scalar_t> dense_pool_out(scalar_t* avg, scalar_t* mx, int32_t* idx, int64_t rows) {
  return {avg, mx, idx, rows, rows};
}

// Combines pooling partials [splits, rows] (sum, max, arg-max) in split order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pool_finalize_kernel(const acc_t* __restrict__ psum, const acc_t* __restrict__ pmax,
                         const int* __restrict__ pidx, int64_t rows, int splits, acc_t count,
                         PoolOut<scalar_t> out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  acc_t s = psum[r];
  acc_t bv = pmax[r];
  int bi = pidx[r];
  for (int k = 1; k < splits; ++k) {
    const int64_t q = k * rows + r;
    s += psum[q];
    arg_update(pmax[q], pidx[q], bv, bi);
  }
  out.write(r, static_cast<scalar_t>(s / count), static_cast<scalar_t>(bv), bi);
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads the current device holds at full occupancy (the size of one full wave).
// Cached per device (the launch geometry, hence the summation order, depends on it).
inline int64_t resident_threads() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < kMaxDevices) {
    const int64_t cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
  const int64_t threads = std::max<int64_t>(1, static_cast<int64_t>(sms) * per_sm);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(threads, std::memory_order_relaxed);
  return threads;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

template <typename acc_t>
inline at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

// Geometry of a tile kernel over x viewed as [N, Lo, Li].
struct TileConfig {
  int vec = 1;
  int tx = 32, ty = kThreads / 32;
  int64_t itiles = 1;
  int splits = 1;
  int chunk = 0;  // outer rows per split
  dim3 grid, block;
};

// Splits the outer dimension until one wave of the device is filled, keeping at least
// `min_rows` outer rows per thread. `max_splits` bounds the partial buffers (1 = no split).
inline TileConfig make_tile_config(int64_t N, int64_t Li, int64_t Lo, int vec, int min_rows,
                                   int max_splits) {
  TileConfig t;
  t.vec = vec;
  t.tx = static_cast<int>(std::min<int64_t>(32, pow2_ceil(ceil_div(Li, vec))));
  t.ty = kThreads / t.tx;
  t.itiles = ceil_div(Li, static_cast<int64_t>(t.tx) * vec);
  const int64_t blocks0 = t.itiles * N;
  const int64_t wave = std::max<int64_t>(1, resident_threads() / kThreads);
  int64_t splits = 1;
  if (blocks0 < wave) {
    splits = ceil_div(wave, blocks0);
    splits = std::min<int64_t>(splits, ceil_div(Lo, static_cast<int64_t>(t.ty) * min_rows));
    splits = std::min<int64_t>(splits, max_splits);
    splits = std::max<int64_t>(splits, 1);
  }
  t.chunk = static_cast<int>(ceil_div(Lo, splits));
  t.splits = static_cast<int>(ceil_div(Lo, t.chunk));  // every split non-empty
  const int64_t blocks = blocks0 * t.splits;
  TORCH_CHECK(blocks <= INT_MAX, "fused_cbam: tensor too large for the CUDA kernels' grid");
  t.grid = dim3(static_cast<unsigned>(blocks));
  t.block = dim3(t.tx, t.ty);
  return t;
}

// Sums partials [splits, rows] into out[rows] (scalar_t), deterministically.
template <typename scalar_t, typename acc_t>
void launch_sum_finalize(const acc_t* part, int64_t rows, int splits, scalar_t* out) {
  if (rows == 0) return;
  const int width = static_cast<int>(std::min<int64_t>(32, pow2_ceil(ceil_div(splits, 16))));
  const int64_t blocks = ceil_div(rows * width, kThreads);
  TORCH_CHECK(blocks <= INT_MAX, "fused_cbam: tensor too large for the CUDA kernels' grid");
  sum_finalize_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(part, rows, splits,
                                                                        width, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_pool_finalize(const acc_t* psum, const acc_t* pmax, const int* pidx, int64_t rows,
                          int splits, acc_t count, const PoolOut<scalar_t>& out) {
  if (rows == 0) return;
  TORCH_CHECK(ceil_div(rows, kThreads) <= INT_MAX, "fused_cbam: tensor too large");
  pool_finalize_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(ceil_div(rows, kThreads)), kThreads, 0, current_stream()>>>(
          psum, pmax, pidx, rows, splits, count, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- memory format and input checks

// The memory-format rule shared with the CPU path and fused_cbam/_registrations.py `_like_x`.
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat format_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x as the kernels read it: channels_last stays, anything else becomes NCHW contiguous.
inline at::Tensor dense_x(const at::Tensor& x) {
  return is_channels_last(x) ? x : x.contiguous();
}

inline at::Tensor empty_like_x(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(format_of(x)));
}

// Messages follow the CPU path: "<argument>: expected ..., got ...", prefixed with the operator.
inline void check_x(const at::Tensor& x, const char* op, const char* name = "x") {
  TORCH_CHECK_VALUE(x.defined(), op, ": ", name, ": expected a defined tensor");
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": ", name, ": expected a CUDA tensor, got one on ",
                    x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name,
                    ": expected a 4-D tensor (N, C, H, W), got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   op, ": ", name,
                   ": expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                   "got ",
                   t);
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, op, ": ", name,
                    ": expected a non-empty spatial size, got H x W = ", x.size(2), " x ",
                    x.size(3));
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": ", name, ": expected at least one channel, got shape ",
                    x.sizes());
  // Indices inside one row (a channel or a pixel) are 32-bit; offsets of rows are 64-bit.
  TORCH_CHECK_VALUE(x.size(1) <= kMaxRow && x.size(2) * x.size(3) <= kMaxRow, op, ": ", name,
                    ": expected C <= 2^30 and H * W <= 2^30, got shape ", x.sizes());
}

// Checks a tensor that goes with x: defined, the expected shape and dtype, x's device.
inline void check_like(const at::Tensor& t, const char* op, const char* name,
                       const at::Tensor& x, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, ": expected a defined tensor");
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, ": expected shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, ": expected dtype ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, ": expected a tensor on ",
                    x.device(), " (x's device), got one on ", t.device());
}

// Checks a small tensor against x (device, dtype, shape) and returns it contiguous.
inline at::Tensor check_small(const at::Tensor& t, const char* op, const char* name,
                              const at::Tensor& x, at::IntArrayRef shape,
                              at::ScalarType dtype) {
  check_like(t, op, name, x, shape, dtype);
  return t.contiguous();
}

// A gradient of x that a backward operator adds into: x's shape, dtype and device, dense in x's
// memory format (grad_x itself decides it where there is no x).
inline void check_accumulator(const at::Tensor& grad_x, const at::Tensor& x, const char* op) {
  check_x(grad_x, op, "grad_x");
  check_like(grad_x, op, "grad_x", x, x.sizes(), x.scalar_type());
  TORCH_CHECK_VALUE(grad_x.is_contiguous(format_of(x)),
                    op, ": grad_x: expected a tensor dense in x's memory format (NCHW or "
                    "channels_last)");
}

// An optional small tensor, checked as above; an undefined tensor when it is absent.
inline at::Tensor check_optional_small(const std::optional<at::Tensor>& t, const char* op,
                                       const char* name, const at::Tensor& x,
                                       at::IntArrayRef shape, at::ScalarType dtype) {
  const bool present = t.has_value() && t->defined();
  return present ? check_small(*t, op, name, x, shape, dtype) : at::Tensor();
}

}  // namespace gpu
}  // namespace fused_cbam
