// channel_pool: mean, max and first arg-max of every (n, c) plane over H x W, and its backward.
//   NCHW x:          each (n, c) row is contiguous -> row_pool (a group of threads per row,
//                    rows split over several groups when N * C cannot fill the device).
//   channels_last x: lanes along C, rows of the block along H x W -> outer_pool.
//   backward:        dx = grad_avg / P + [p == argmax] * grad_max, one write of dx (or, in
//                    channel_pool_backward_add, added into a given gradient of x, with the
//                    mean's share of a spatial pooling when given).
#include "../spatial_share_args.h"
#include "common.cuh"
#include "kernels.h"
#include "pool.cuh"

namespace fused_cbam {
namespace gpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool(const at::Tensor& x_in) {
  constexpr const char* op = "fused_cbam::channel_pool";
  check_x(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_x(x_in);
  const bool cl = is_channels_last(x);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  at::Tensor avg = at::empty({N, C}, x.options());
  at::Tensor mx = at::empty({N, C}, x.options());
  at::Tensor idx = at::empty({N, C}, x.options().dtype(at::kInt));
  if (N * C == 0) return {avg, mx, idx};  // H * W > 0 is checked
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const PoolOut<scalar_t> out =
        dense_pool_out(avg.mutable_data_ptr<scalar_t>(), mx.mutable_data_ptr<scalar_t>(),
                       idx.mutable_data_ptr<int32_t>(), N * C);
    if (cl) {
      launch_outer_pool<scalar_t, false>(x, xp, nullptr, N, /*Li=*/C, /*Lo=*/P, /*count=*/P,
                                         out);
    } else {
      launch_row_pool<scalar_t, false>(x, xp, nullptr, /*rows=*/N * C, /*rows_per_sample=*/C,
                                       /*L=*/P, /*count=*/P, out);
    }
  });
  return {avg, mx, idx};
}

namespace {

// Writes (ACCUMULATE: adds) the gradient of x into dx, dense in its memory format; adding, also
// the mean's share of a spatial pooling when spatial_grad_mean (and spatial_scale) are given.
template <bool ACCUMULATE>
void channel_pool_backward_into(at::Tensor& dx, const at::Tensor& grad_avg,
                                const at::Tensor& grad_max, const at::Tensor& argmax,
                                const char* op,
                                const std::optional<at::Tensor>& spatial_grad_mean = {},
                                const std::optional<at::Tensor>& spatial_scale = {}) {
  const bool cl = is_channels_last(dx);
  const int64_t N = dx.size(0), C = dx.size(1), H = dx.size(2), W = dx.size(3), P = H * W;
  check_like(grad_avg, op, "grad_avg", dx, {N, C}, dx.scalar_type());
  check_like(grad_max, op, "grad_max", dx, {N, C}, dx.scalar_type());
  const at::Tensor am = check_small(argmax, op, "argmax", dx, {N, C}, at::kInt);
  check_spatial_share(spatial_grad_mean, spatial_scale);
  const bool spatial = spatial_grad_mean.has_value();
  at::Tensor ss;
  if (spatial) {
    check_like(*spatial_grad_mean, op, "spatial_grad_mean", dx, {N, 1, H, W}, dx.scalar_type());
    ss = check_small(*spatial_scale, op, "spatial_scale", dx, {N, C}, dx.scalar_type());
  }
  if (dx.numel() == 0) return;
  const GradView ga = grad_view(grad_avg), gm = grad_view(grad_max);
  // The spatial conv's input gradient, one channel of it, read in place.
  const GradView sgm = spatial ? grad_view(*spatial_grad_mean) : GradView{};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dx.scalar_type(), "fused_cbam::channel_pool_backward", [&] {
    // NCHW: kept (n, c) is the outer index, p the inner; channels_last the other way round.
    const PoolGrads<scalar_t> g = pool_grads<scalar_t>(ga, gm, am, C);
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const SpatialShare<scalar_t> sp =
        spatial ? SpatialShare<scalar_t>{ss.const_data_ptr<scalar_t>(),
                                         sgm.holder.const_data_ptr<scalar_t>(), sgm.sample,
                                         sgm.step}
                : SpatialShare<scalar_t>{};
    const auto scatter = [&](auto spatial_c) {
      constexpr bool kSpatial = decltype(spatial_c)::value;  // only ever given when adding
      launch_max_scatter_backward<scalar_t, ACCUMULATE || kSpatial, kSpatial>(
          g, /*count=*/P, N, /*Li=*/cl ? C : P, /*Lo=*/cl ? P : C, /*kept_inner=*/cl, dxp, sp);
    };
    spatial ? scatter(std::true_type{}) : scatter(std::false_type{});
  });
}

}  // namespace

at::Tensor channel_pool_backward(const at::Tensor& grad_avg, const at::Tensor& grad_max,
                                 const at::Tensor& argmax, const at::Tensor& x) {
  constexpr const char* op = "fused_cbam::channel_pool_backward";
  check_x(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = empty_like_x(x);  // x itself is never read
  channel_pool_backward_into<false>(dx, grad_avg, grad_max, argmax, op);
  return dx;
}

void channel_pool_backward_add(at::Tensor& grad_x, const at::Tensor& grad_avg,
                               const at::Tensor& grad_max, const at::Tensor& argmax,
                               const std::optional<at::Tensor>& spatial_grad_mean,
                               const std::optional<at::Tensor>& spatial_scale) {
  constexpr const char* op = "fused_cbam::channel_pool_backward_add";
  check_accumulator(grad_x, grad_x, op);
  const c10::cuda::CUDAGuard guard(grad_x.device());
  channel_pool_backward_into<true>(grad_x, grad_avg, grad_max, argmax, op, spatial_grad_mean,
                                   spatial_scale);
}

}  // namespace gpu
}  // namespace fused_cbam
