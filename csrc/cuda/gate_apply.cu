// gate_apply: out = x * g[n, c] * h[n, 0, h, w] (either gate optional), and its backward
//   grad_x = (dout * h) * g, grad_g[n, c] = sum_p (dout * h) * x,
//   grad_h[n, p] = sum_c dout * (x * g)
// (the products grouped as autograd groups them for out = (x * g) * h), in one read of dout and x.
//
// x viewed as [N, Lo, Li]: NCHW (Lo, Li) = (C, P), channels_last (Lo, Li) = (P, C). The gate
// indexed by the inner dimension (h for NCHW, g for channels_last) sits in registers; the other
// is read once per row. The gradient of the outer-indexed gate is a sum over the inner
// dimension: a lane reduction per row, then partials over inner tiles. The gradient of the
// inner-indexed gate is a sum over the outer dimension: registers, a tree over the block's rows,
// then partials over outer splits. Partials are summed in a fixed order by a second kernel.
#include "common.cuh"
#include "kernels.h"

namespace fused_cbam {
namespace gpu {

template <typename scalar_t, typename acc_t, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads)
    gate_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                      const scalar_t* __restrict__ h, int Li, int Lo, int64_t itiles, int splits,
                      int chunk, scalar_t* __restrict__ out) {
  const TileCoord tc = tile_coord<VEC>(Lo, itiles, splits, chunk);
  if (tc.i0 >= Li) return;  // no block-wide synchronisation in this kernel
  const scalar_t* __restrict__ gin = CL ? g : h;    // inner-indexed gate
  const scalar_t* __restrict__ gout = CL ? h : g;   // outer-indexed gate
  acc_t vin[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) vin[j] = gin ? static_cast<acc_t>(gin[tc.n * Li + tc.i0 + j]) : 1;
  const int64_t base = tc.n * Lo * Li + tc.i0;
  struct Row {  // what a batch holds of row o: x's vector and the outer-indexed gate, as loaded
    RawVec<scalar_t, VEC> x;
    scalar_t gate;
  };
  for_each_batched<kLoadsInFlight>(
      tc.o_begin + static_cast<int>(threadIdx.y), tc.o_end, static_cast<int>(blockDim.y),
      [&](int o) {
        Row r;
        r.x = load_vec<VEC>(x + base + static_cast<int64_t>(o) * Li);
        r.gate = gout ? gout[tc.n * Lo + o] : scalar_t(1);
        return r;
      },
      [&](int o, const Row& r) {
        const acc_t vout = static_cast<acc_t>(r.gate);
        acc_t v[VEC];
        widen<VEC>(r.x, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t gv = CL ? vin[j] : vout;
          const acc_t hv = CL ? vout : vin[j];
          v[j] = (v[j] * gv) * hv;  // multiplying by an absent gate's 1 is exact
        }
        store_as<VEC>(out + base + static_cast<int64_t>(o) * Li, v);
      });
}

// inner_* : sums over Li for each (n, o), i.e. grad of the outer-indexed gate, [itiles, N * Lo]
// outer_* : sums over Lo for each (n, i), i.e. grad of the inner-indexed gate, [splits, N * Li]
// A *_final pointer is written directly when there is a single partial.
// Three blocks an SM: ptxas then fits the four rows' dout and x in 80 registers without a
// spill, where on its own it took 98-102 and left two blocks an SM.
template <typename scalar_t, typename acc_t, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads, 3)
    gate_apply_backward_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ x,
                               const scalar_t* __restrict__ g, const scalar_t* __restrict__ h,
                               int Li, int Lo, int64_t itiles, int splits, int chunk, int64_t N,
                               scalar_t* __restrict__ dx, acc_t* __restrict__ inner_part,
                               scalar_t* __restrict__ inner_final, acc_t* __restrict__ outer_part,
                               scalar_t* __restrict__ outer_final) {
  __shared__ acc_t smem[VEC * kThreads];
  const TileCoord tc = tile_coord<VEC>(Lo, itiles, splits, chunk);
  const bool active = tc.i0 < Li;  // inactive lanes still join the reductions
  const scalar_t* __restrict__ gin = CL ? g : h;
  const scalar_t* __restrict__ gout = CL ? h : g;
  // Which gradients are wanted; kernel arguments, so uniform over the block.
  const bool do_inner = gout != nullptr;  // grad of the outer-indexed gate
  const bool do_outer = gin != nullptr;   // grad of the inner-indexed gate

  acc_t vin[VEC], oacc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    vin[j] = (active && gin) ? static_cast<acc_t>(gin[tc.n * Li + tc.i0 + j]) : acc_t(1);
    oacc[j] = 0;
  }
  const int64_t base = tc.n * Lo * Li + tc.i0;
  const int64_t inner_rows = N * Lo;
  // A thread's rows in batches of kLoadsInFlight, each batch's loads issued before its first
  // row is used (one row at a time kept one load of dout and x in flight), at block-uniform
  // trip counts: the lane reduction needs the whole warp.
  struct Row {  // what a batch holds of row o, as loaded
    RawVec<scalar_t, VEC> d, x;
    scalar_t gate;
  };
  for_each_batched_uniform<kLoadsInFlight>(
      tc.o_begin, tc.o_end, static_cast<int>(blockDim.y), static_cast<int>(threadIdx.y), active,
      [&](int o) {
        const int64_t off = base + static_cast<int64_t>(o) * Li;
        Row r;
        r.d = load_vec<VEC>(dout + off);
        r.x = load_vec<VEC>(x + off);
        r.gate = gout ? gout[tc.n * Lo + o] : scalar_t(1);
        return r;
      },
      [&](int o, bool row, const Row& r) {
        acc_t isum = 0;
        if (active && row) {
          const acc_t vout = static_cast<acc_t>(r.gate);
          acc_t d[VEC], xv[VEC], out[VEC];
          widen<VEC>(r.d, d);
          widen<VEC>(r.x, xv);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t gv = CL ? vin[j] : vout;
            const acc_t hv = CL ? vout : vin[j];
            const acc_t t = d[j] * hv;          // grad of x * g
            out[j] = t * gv;                    // grad_x
            const acc_t eg = t * xv[j];         // term of grad_g
            const acc_t eh = d[j] * (xv[j] * gv);  // term of grad_h
            // CL: inner is c -> the inner sum is grad_h, the outer sum grad_g; NCHW the reverse.
            isum += CL ? eh : eg;
            oacc[j] += CL ? eg : eh;
          }
          store_as<VEC>(dx + base + static_cast<int64_t>(o) * Li, out);
        }
        if (do_inner) {
          isum = group_sum(isum, blockDim.x);
          if (threadIdx.x == 0 && row) {
            store_row_sum(isum, tc.n * Lo + o, tc.itile, itiles, inner_rows, inner_final,
                          inner_part);
          }
        }
      });
  if (do_outer) {
    tree_sum_over_y<VEC>(oacc, smem);
    if (threadIdx.y == 0 && active) {
      const int64_t outer_rows = N * Li;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        store_row_sum(oacc[j], tc.n * Li + tc.i0 + j, tc.split, splits, outer_rows, outer_final,
                      outer_part);
      }
    }
  }
}

template <typename scalar_t, int VEC, bool CL>
void launch_gate_apply_vec(const scalar_t* x, const scalar_t* g, const scalar_t* h, int64_t N,
                           int64_t Li, int64_t Lo, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileConfig cfg = make_tile_config(N, Li, Lo, VEC, /*min_rows=*/4, INT_MAX);
  gate_apply_kernel<scalar_t, acc_t, VEC, CL><<<cfg.grid, cfg.block, 0, current_stream()>>>(
      x, g, h, static_cast<int>(Li), static_cast<int>(Lo), cfg.itiles, cfg.splits, cfg.chunk,
      out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC, bool CL>
void launch_gate_apply_backward_vec(const at::Tensor& like, const scalar_t* dout,
                                    const scalar_t* x, const scalar_t* g, const scalar_t* h,
                                    int64_t N, int64_t Li, int64_t Lo, scalar_t* dx,
                                    scalar_t* grad_g, scalar_t* grad_h) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileConfig cfg = make_tile_config(N, Li, Lo, VEC, /*min_rows=*/4, kMaxSplits);
  // The outer-indexed gate's gradient is the inner sum, and vice versa.
  const scalar_t* gout = CL ? h : g;
  const scalar_t* gin = CL ? g : h;
  scalar_t* inner_final = CL ? grad_h : grad_g;
  scalar_t* outer_final = CL ? grad_g : grad_h;
  const int64_t inner_rows = N * Lo, outer_rows = N * Li;
  at::Tensor inner_part, outer_part;
  const at::TensorOptions acc = acc_options<acc_t>(like);
  if (gout && cfg.itiles > 1) inner_part = at::empty({cfg.itiles, inner_rows}, acc);
  if (gin && cfg.splits > 1) outer_part = at::empty({cfg.splits, outer_rows}, acc);
  acc_t* ip = inner_part.defined() ? inner_part.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* op = outer_part.defined() ? outer_part.mutable_data_ptr<acc_t>() : nullptr;
  gate_apply_backward_kernel<scalar_t, acc_t, VEC, CL>
      <<<cfg.grid, cfg.block, 0, current_stream()>>>(
          dout, x, g, h, static_cast<int>(Li), static_cast<int>(Lo), cfg.itiles, cfg.splits,
          cfg.chunk, N, dx, ip, inner_final, op, outer_final);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ip) {
    TORCH_CHECK(cfg.itiles <= INT_MAX, "fused_cbam: tensor too large for the CUDA kernels");
    launch_sum_finalize<scalar_t, acc_t>(ip, inner_rows, static_cast<int>(cfg.itiles),
                                         inner_final);
  }
  if (op) launch_sum_finalize<scalar_t, acc_t>(op, outer_rows, cfg.splits, outer_final);
}

void gate_apply_into(const at::Tensor& x, const at::Tensor& g, const at::Tensor& h,
                     at::Tensor& out) {
  const bool cl = is_channels_last(x);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gate_apply", [&] {
    constexpr int V = vec_width<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = h.defined() ? h.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    const int64_t Li = cl ? C : P, Lo = cl ? P : C;
    const bool vec = Li % V == 0 && aligned16(xp) && aligned16(outp);
    if (cl) {
      if (vec) {
        launch_gate_apply_vec<scalar_t, V, true>(xp, gp, hp, N, Li, Lo, outp);
      } else {
        launch_gate_apply_vec<scalar_t, 1, true>(xp, gp, hp, N, Li, Lo, outp);
      }
    } else {
      if (vec) {
        launch_gate_apply_vec<scalar_t, V, false>(xp, gp, hp, N, Li, Lo, outp);
      } else {
        launch_gate_apply_vec<scalar_t, 1, false>(xp, gp, hp, N, Li, Lo, outp);
      }
    }
  });
}

at::Tensor gate_apply(const at::Tensor& x_in, const std::optional<at::Tensor>& channel_gate,
                      const std::optional<at::Tensor>& spatial_gate) {
  constexpr const char* op = "fused_cbam::gate_apply";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_x(x_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto dtype = x.scalar_type();
  const at::Tensor g = check_optional_small(channel_gate, op, "channel_gate", x, {N, C}, dtype);
  const at::Tensor h =
      check_optional_small(spatial_gate, op, "spatial_gate", x, {N, 1, H, W}, dtype);
  at::Tensor out = empty_like_x(x);
  gate_apply_into(x, g, h, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_apply_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in,
    const std::optional<at::Tensor>& channel_gate,
    const std::optional<at::Tensor>& spatial_gate) {
  constexpr const char* op = "fused_cbam::gate_apply_backward";
  check_x(x_in, op);
  check_x(grad_out, op, "grad_out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_x(x_in);
  const bool cl = is_channels_last(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  const auto dtype = x.scalar_type();
  check_like(grad_out, op, "grad_out", x, x.sizes(), dtype);
  const at::Tensor dout = grad_out.contiguous(format_of(x));
  const at::Tensor g = check_optional_small(channel_gate, op, "channel_gate", x, {N, C}, dtype);
  const at::Tensor h =
      check_optional_small(spatial_gate, op, "spatial_gate", x, {N, 1, H, W}, dtype);
  const bool has_g = g.defined(), has_h = h.defined();
  at::Tensor dx = empty_like_x(x);
  if (dx.numel() == 0) {  // an empty batch
    return {dx, has_g ? at::zeros({N, C}, x.options()) : at::empty({0}, x.options()),
            has_h ? at::zeros({N, 1, H, W}, x.options()) : at::empty({0}, x.options())};
  }
  at::Tensor grad_g = has_g ? at::empty({N, C}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_h = has_h ? at::empty({N, 1, H, W}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    constexpr int V = vec_width<scalar_t>();
    const scalar_t* dp = dout.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = has_g ? g.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = has_h ? h.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    scalar_t* ggp = has_g ? grad_g.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* ghp = has_h ? grad_h.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t Li = cl ? C : P, Lo = cl ? P : C;
    const bool vec = Li % V == 0 && aligned16(dp) && aligned16(xp) && aligned16(dxp);
    if (cl) {
      if (vec) {
        launch_gate_apply_backward_vec<scalar_t, V, true>(x, dp, xp, gp, hp, N, Li, Lo, dxp, ggp,
                                                          ghp);
      } else {
        launch_gate_apply_backward_vec<scalar_t, 1, true>(x, dp, xp, gp, hp, N, Li, Lo, dxp, ggp,
                                                          ghp);
      }
    } else {
      if (vec) {
        launch_gate_apply_backward_vec<scalar_t, V, false>(x, dp, xp, gp, hp, N, Li, Lo, dxp,
                                                           ggp, ghp);
      } else {
        launch_gate_apply_backward_vec<scalar_t, 1, false>(x, dp, xp, gp, hp, N, Li, Lo, dxp,
                                                           ggp, ghp);
      }
    }
  });
  return {dx, grad_g, grad_h};
}

}  // namespace gpu
}  // namespace fused_cbam
