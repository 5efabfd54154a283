// Host entry points of the CUDA kernels (csrc/cuda/*.cu), registered in register.cpp.
// Semantics: csrc/ops.cpp and fused_cbam/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_cbam {
namespace gpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool(const at::Tensor& x);

at::Tensor channel_pool_backward(const at::Tensor& grad_avg, const at::Tensor& grad_max,
                                 const at::Tensor& argmax, const at::Tensor& x);

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_pool(
    const at::Tensor& x, const std::optional<at::Tensor>& scale);

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor& grad_mean,
                                                         const at::Tensor& grad_max,
                                                         const at::Tensor& argmax,
                                                         const at::Tensor& x,
                                                         const std::optional<at::Tensor>& scale);

at::Tensor gate_apply(const at::Tensor& x, const std::optional<at::Tensor>& channel_gate,
                      const std::optional<at::Tensor>& spatial_gate);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_apply_backward(
    const at::Tensor& grad_out, const at::Tensor& x,
    const std::optional<at::Tensor>& channel_gate,
    const std::optional<at::Tensor>& spatial_gate);

}  // namespace gpu
}  // namespace fused_cbam
