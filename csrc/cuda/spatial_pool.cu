// spatial_pool: mean, max and first arg-max over C of y = x * scale[n, c] (math type, never
// stored), and its backward.
//   NCHW x:          lanes along H x W, rows of the block along C -> outer_pool (scale per row).
//   channels_last x: each pixel's C values are contiguous -> row_pool (a group per pixel).
//   backward:        w = grad_mean / C + [c == argmax] * grad_max; dx = w * scale[n, c];
//                    grad_scale[n, c] = sum_p w * x, reduced without atomics. dx is written,
//                    or in spatial_pool_backward_add added into a given gradient of x (with
//                    add_mean=False only the max's share, at each pixel's arg-max element).
#include "../spatial_share_args.h"
#include "common.cuh"
#include "kernels.h"
#include "pool.cuh"

namespace fused_cbam {
namespace gpu {

// Backward with a scale, x viewed as [N, Lo, Li]; `rows` = N * C.
// NCHW (CL = false): inner p, outer c. Each lane keeps its pixels' (mean, max, arg-max) grads in
//   registers; grad_scale of (n, c) is a lane reduction per row -> final, or partials
//   [itiles, N * C] when the pixels span several tiles.
// channels_last:  inner c, outer p. Each lane keeps its channels' scale in registers and adds
//   w * x over its rows; a tree over the block's rows -> final, or partials [splits, N * C].
// ACCUMULATE: dx is added to, not written; without ADD_MEAN only the max's share is added, an
// element per pixel (its arg-max channel's).
template <typename scalar_t, typename acc_t, int VEC, bool CL, bool ACCUMULATE, bool ADD_MEAN>
__global__ void __launch_bounds__(kThreads)
    scaled_spatial_backward_kernel(const PoolGrads<scalar_t> g, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ scale, acc_t count, int Li,
                                   int Lo, int64_t itiles, int splits, int chunk, int64_t rows,
                                   scalar_t* __restrict__ dx, acc_t* __restrict__ part,
                                   scalar_t* __restrict__ gscale) {
  static_assert(ACCUMULATE || ADD_MEAN, "a gradient written, not added, takes both shares");
  const TileCoord tc = tile_coord<VEC>(Lo, itiles, splits, chunk);
  const bool active = tc.i0 < Li;  // inactive lanes still join the reductions
  const int64_t base = tc.n * Lo * Li + tc.i0;
  if constexpr (!CL) {
    acc_t a[VEC], m[VEC];
    int64_t id[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      a[j] = 0;
      m[j] = 0;
      id[j] = -1;
    }
    if (active) {
      load_pool_grads<VEC>(g, tc.n, tc.i0, count, Lo, a, m, id);
    }
    // A thread's channels in batches of kLoadsInFlight, as loaded: x's vector, the channel's
    // scale, and the values dx holds where they are added to (all of them, or without the mean
    // the row's vector when one of the lane's pixels has its arg-max in this channel), at
    // block-uniform trip counts: the lane reduction needs the whole warp.
    struct Row {
      RawVec<scalar_t, VEC> x, held;
      scalar_t scale;
    };
    for_each_batched_uniform<kLoadsInFlight>(
        tc.o_begin, tc.o_end, static_cast<int>(blockDim.y), static_cast<int>(threadIdx.y), active,
        [&](int o) {
          const int64_t off = base + static_cast<int64_t>(o) * Li;
          Row r;
          r.x = load_vec<VEC>(x + off);
          r.scale = scale[tc.n * Lo + o];
          bool adds = ADD_MEAN && ACCUMULATE;
          if constexpr (!ADD_MEAN) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) adds |= id[j] == o;
          }
          if (adds) r.held = load_vec<VEC>(dx + off);
          return r;
        },
        [&](int o, bool row, const Row& r) {
          acc_t psum = 0;
          if (active && row) {
            const int64_t off = base + static_cast<int64_t>(o) * Li;
            const acc_t sc = static_cast<acc_t>(r.scale);
            acc_t xv[VEC], out[VEC], held[VEC];
            widen<VEC>(r.x, xv);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const acc_t w = a[j] + (id[j] == o ? m[j] : acc_t(0));
              out[j] = w * sc;
              // One rounding, as before: left to contraction, the last term's multiply was
              // moved past the branches below and added apart in 16-bit types (a review's SASS).
              psum = fma(w, xv[j], psum);
            }
            if constexpr (!ADD_MEAN) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                if (id[j] != o) continue;
                widen<VEC>(r.held, held);  // loaded: a pixel of the lane has its arg-max here
                // the max's share, rounded once
                dx[off + j] = static_cast<scalar_t>(m[j] * sc + held[j]);
              }
            } else {
              if constexpr (ACCUMULATE) {
                widen<VEC>(r.held, held);
#pragma unroll
                for (int j = 0; j < VEC; ++j) out[j] += held[j];  // as store_or_add: rounded once
              }
              store_as<VEC>(dx + off, out);
            }
          }
          psum = group_sum(psum, blockDim.x);
          if (threadIdx.x == 0 && row) {
            const int64_t r_out = tc.n * Lo + o;
            if (itiles == 1) {
              gscale[r_out] = static_cast<scalar_t>(psum);
            } else {
              part[tc.itile * rows + r_out] = psum;
            }
          }
        });
  } else {
    __shared__ acc_t smem[VEC * kThreads];
    acc_t sc[VEC], acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sc[j] = 0;
      acc[j] = 0;
    }
    if (active) {
      const int64_t k0 = tc.n * Li + tc.i0;
#pragma unroll
      for (int j = 0; j < VEC; ++j) sc[j] = static_cast<acc_t>(scale[k0 + j]);
      // A thread's pixels in batches of kLoadsInFlight, as loaded: x's vector, the values dx
      // holds where the whole gradient is added, the pooling's gradients, and without the mean
      // the dx element at the pixel's arg-max where it falls in this lane's vector. That
      // element's load waits on the arg-max's: the batch issues all of them after all of the
      // arg-maxes, then uses its rows (one pixel at a time waited twice a pixel).
      struct Row {
        RawVec<scalar_t, VEC> x, held;
        PoolGrad<scalar_t> grad;
        scalar_t at_max;
      };
      const int step = static_cast<int>(blockDim.y);
      for (int ob = tc.o_begin + static_cast<int>(threadIdx.y); ob < tc.o_end;
           ob += kLoadsInFlight * step) {
        Row batch[kLoadsInFlight];
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u) {
          const int o = ob + u * step;
          if (o >= tc.o_end) continue;
          const int64_t off = base + static_cast<int64_t>(o) * Li;
          batch[u].x = load_vec<VEC>(x + off);
          if constexpr (ADD_MEAN && ACCUMULATE) batch[u].held = load_vec<VEC>(dx + off);
          batch[u].grad = pool_grad_at(g, tc.n, o);
        }
        if constexpr (!ADD_MEAN) {
#pragma unroll
          for (int u = 0; u < kLoadsInFlight; ++u) {
            const int o = ob + u * step;
            if (o >= tc.o_end) continue;
            const int j = batch[u].grad.argmax - tc.i0;  // checked when widened, below
            if (j >= 0 && j < VEC) batch[u].at_max = dx[base + static_cast<int64_t>(o) * Li + j];
          }
        }
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u) {
          const int o = ob + u * step;
          if (o >= tc.o_end) continue;
          const Row& r = batch[u];
          acc_t a, m;
          int64_t id;
          r.grad.widen(count, Li, a, m, id);
          const int64_t off = base + static_cast<int64_t>(o) * Li;
          acc_t xv[VEC], out[VEC];
          widen<VEC>(r.x, xv);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t w = a + (id == tc.i0 + j ? m : acc_t(0));
            out[j] = w * sc[j];
            acc[j] += w * xv[j];
            if (!ADD_MEAN && id == tc.i0 + j) {  // the max's share added, rounded once
              dx[off + j] = static_cast<scalar_t>(m * sc[j] + static_cast<acc_t>(r.at_max));
            }
          }
          if constexpr (ADD_MEAN) {
            if constexpr (ACCUMULATE) {
              acc_t held[VEC];
              widen<VEC>(r.held, held);
#pragma unroll
              for (int j = 0; j < VEC; ++j) out[j] += held[j];  // as store_or_add: rounded once
            }
            store_as<VEC>(dx + off, out);
          }
        }
      }
    }
    tree_sum_over_y<VEC>(acc, smem);
    if (threadIdx.y == 0 && active) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        store_row_sum(acc[j], tc.n * Li + tc.i0 + j, tc.split, splits, rows, gscale, part);
      }
    }
  }
}

template <typename scalar_t, int VEC, bool CL, bool ACCUMULATE, bool ADD_MEAN>
void launch_scaled_spatial_backward_vec(const at::Tensor& like, const PoolGrads<scalar_t>& g,
                                        const scalar_t* x, const scalar_t* scale, int64_t N,
                                        int64_t C, int64_t P, scalar_t* dx, scalar_t* gscale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Li = CL ? C : P, Lo = CL ? P : C;
  const TileConfig cfg = make_tile_config(N, Li, Lo, VEC, /*min_rows=*/4, kMaxSplits);
  const int64_t nparts = CL ? cfg.splits : cfg.itiles;
  const int64_t rows = N * C;
  at::Tensor part;
  if (nparts > 1) part = at::empty({nparts, rows}, acc_options<acc_t>(like));
  acc_t* pp = nparts > 1 ? part.mutable_data_ptr<acc_t>() : nullptr;
  scaled_spatial_backward_kernel<scalar_t, acc_t, VEC, CL, ACCUMULATE, ADD_MEAN>
      <<<cfg.grid, cfg.block, 0, current_stream()>>>(
          g, x, scale, static_cast<acc_t>(C), static_cast<int>(Li),
          static_cast<int>(Lo), cfg.itiles, cfg.splits, cfg.chunk, rows, dx, pp, gscale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (nparts > 1) {
    TORCH_CHECK(nparts <= INT_MAX, "fused_cbam: tensor too large for the CUDA kernels");
    launch_sum_finalize<scalar_t, acc_t>(pp, rows, static_cast<int>(nparts), gscale);
  }
}

template <typename scalar_t, bool CL, bool ACCUMULATE, bool ADD_MEAN>
void launch_scaled_spatial_backward(const at::Tensor& like, const PoolGrads<scalar_t>& g,
                                    const scalar_t* x, const scalar_t* scale, int64_t N,
                                    int64_t C, int64_t P, scalar_t* dx, scalar_t* gscale) {
  constexpr int V = vec_width<scalar_t>();
  const int64_t Li = CL ? C : P;
  if (Li % V == 0 && aligned16(x) && aligned16(dx)) {
    launch_scaled_spatial_backward_vec<scalar_t, V, CL, ACCUMULATE, ADD_MEAN>(
        like, g, x, scale, N, C, P, dx, gscale);
  } else {
    launch_scaled_spatial_backward_vec<scalar_t, 1, CL, ACCUMULATE, ADD_MEAN>(
        like, g, x, scale, N, C, P, dx, gscale);
  }
}

std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x_in,
                                                const std::optional<at::Tensor>& scale_opt,
                                                bool max_first) {
  constexpr const char* op = "fused_cbam::spatial_pool";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_x(x_in);
  const bool cl = is_channels_last(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const at::Tensor scale = check_optional_small(scale_opt, op, "scale", x, {N, C}, x.scalar_type());
  const bool has_scale = scale.defined();
  at::Tensor maps = at::empty({N, 2, H, W}, x.options());
  at::Tensor idx = at::empty({N, 1, H, W}, x.options().dtype(at::kInt));
  if (N == 0) return {maps, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = has_scale ? scale.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* mp = maps.mutable_data_ptr<scalar_t>();
    // the mean and max maps: channels of `maps`, each sample's P values 2 * P apart
    const PoolOut<scalar_t> out{mp + (max_first ? P : 0), mp + (max_first ? 0 : P),
                                idx.mutable_data_ptr<int32_t>(), P, 2 * P};
    if (cl) {  // rows are pixels (n, p), of length C; scale row n = pixel row / P
      if (has_scale) {
        launch_row_pool<scalar_t, true>(x, xp, sp, N * P, P, C, C, out);
      } else {
        launch_row_pool<scalar_t, false>(x, xp, nullptr, N * P, P, C, C, out);
      }
    } else {  // [N, Lo = C, Li = P], scale indexed by the outer row
      if (has_scale) {
        launch_outer_pool<scalar_t, true>(x, xp, sp, N, P, C, C, out);
      } else {
        launch_outer_pool<scalar_t, false>(x, xp, nullptr, N, P, C, C, out);
      }
    }
  });
  return {maps, idx};
}

namespace {

// Writes (ACCUMULATE: adds) the gradient of x into dx (dense in x's memory format; without
// ADD_MEAN only the max's share) and returns the gradient of the scale (empty without a scale).
template <bool ACCUMULATE, bool ADD_MEAN = true>
at::Tensor spatial_pool_backward_into(at::Tensor& dx, const at::Tensor& grad_mean,
                                      const at::Tensor& grad_max, const at::Tensor& argmax,
                                      const at::Tensor& x_in,
                                      const std::optional<at::Tensor>& scale_opt,
                                      const char* op) {
  const bool cl = is_channels_last(x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t P = H * W;
  const auto dtype = x_in.scalar_type();
  check_like(grad_mean, op, "grad_mean", x_in, {N, 1, H, W}, dtype);
  check_like(grad_max, op, "grad_max", x_in, {N, 1, H, W}, dtype);
  const at::Tensor am = check_small(argmax, op, "argmax", x_in, {N, 1, H, W}, at::kInt);
  const at::Tensor scale = check_optional_small(scale_opt, op, "scale", x_in, {N, C}, dtype);
  const bool has_scale = scale.defined();
  check_add_mean(ADD_MEAN, has_scale);
  if (dx.numel() == 0) {  // an empty batch
    return has_scale ? at::zeros({N, C}, x_in.options()) : at::empty({0}, x_in.options());
  }
  // Each map's gradient in place (one channel of the spatial conv's input gradient, usually).
  const GradView gmean = grad_view(grad_mean), gmax = grad_view(grad_max);
  if (!has_scale) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "fused_cbam::spatial_pool_backward", [&] {
      // Kept (n, p): inner for NCHW, outer for channels_last; c is the pooled coordinate.
      launch_max_scatter_backward<scalar_t, ACCUMULATE>(
          pool_grads<scalar_t>(gmean, gmax, am, P), /*count=*/C, N, /*Li=*/cl ? C : P,
          /*Lo=*/cl ? P : C, /*kept_inner=*/!cl, dx.mutable_data_ptr<scalar_t>());
    });
    return at::empty({0}, x_in.options());
  }
  const at::Tensor x = dense_x(x_in);
  at::Tensor gs = at::empty({N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "fused_cbam::spatial_pool_backward", [&] {
    const PoolGrads<scalar_t> g = pool_grads<scalar_t>(gmean, gmax, am, P);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = gs.mutable_data_ptr<scalar_t>();
    if (cl) {
      launch_scaled_spatial_backward<scalar_t, true, ACCUMULATE, ADD_MEAN>(x, g, xp, sp, N, C, P,
                                                                           dxp, gsp);
    } else {
      launch_scaled_spatial_backward<scalar_t, false, ACCUMULATE, ADD_MEAN>(x, g, xp, sp, N, C, P,
                                                                            dxp, gsp);
    }
  });
  return gs;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(
    const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& argmax,
    const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  constexpr const char* op = "fused_cbam::spatial_pool_backward";
  check_x(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = empty_like_x(x);
  at::Tensor grad_scale =
      spatial_pool_backward_into<false>(dx, grad_mean, grad_max, argmax, x, scale, op);
  return {dx, grad_scale};
}

at::Tensor spatial_pool_backward_add(at::Tensor& grad_x, const at::Tensor& grad_mean,
                                     const at::Tensor& grad_max, const at::Tensor& argmax,
                                     const at::Tensor& x,
                                     const std::optional<at::Tensor>& scale, bool add_mean) {
  constexpr const char* op = "fused_cbam::spatial_pool_backward_add";
  check_x(x, op);
  check_accumulator(grad_x, x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto into = add_mean ? spatial_pool_backward_into<true, true>
                             : spatial_pool_backward_into<true, false>;
  return into(grad_x, grad_mean, grad_max, argmax, x, scale, op);
}

}  // namespace gpu
}  // namespace fused_cbam
