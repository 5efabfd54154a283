// Checks of the arguments that move the mean's share of a spatial pooling's backward from
// spatial_pool_backward_add (add_mean=False) to channel_pool_backward_add (schemas:
// csrc/ops.cpp), shared by the CPU and CUDA kernels so that both refuse the same arguments with
// the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fused_cbam {

// The mean's share of a spatial pooling, scale[n, c] * grad_mean[n, p] / C, takes both tensors.
inline void check_spatial_share(const std::optional<at::Tensor>& spatial_grad_mean,
                                const std::optional<at::Tensor>& spatial_scale) {
  TORCH_CHECK_VALUE(spatial_grad_mean.has_value() == spatial_scale.has_value(),
                    "spatial_grad_mean, spatial_scale: expected both (the mean's share of a "
                    "spatial pooling, spatial_scale[n, c] * spatial_grad_mean[n, p] / C) or "
                    "neither, got only ",
                    spatial_grad_mean.has_value() ? "spatial_grad_mean" : "spatial_scale");
}

// The share left out (add_mean=False) is scale[n, c] * grad_mean[n, p] / C: it needs the scale.
inline void check_add_mean(bool add_mean, bool has_scale) {
  TORCH_CHECK_VALUE(add_mean || has_scale,
                    "add_mean: expected True without a scale (the mean's share left to "
                    "channel_pool_backward_add is scale[n, c] * grad_mean[n, p] / C)");
}

}  // namespace fused_cbam
