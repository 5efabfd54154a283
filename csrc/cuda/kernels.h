// Host entry points of the CUDA kernels (csrc/cuda/*.cu), registered in register.cpp.
// Semantics: csrc/ops.cpp and fused_cbam/reference.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fused_cbam {
namespace gpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool(const at::Tensor& x);

at::Tensor channel_pool_backward(const at::Tensor& grad_avg, const at::Tensor& grad_max,
                                 const at::Tensor& argmax, const at::Tensor& x);

void channel_pool_backward_add(at::Tensor& grad_x, const at::Tensor& grad_avg,
                               const at::Tensor& grad_max, const at::Tensor& argmax,
                               const std::optional<at::Tensor>& spatial_grad_mean,
                               const std::optional<at::Tensor>& spatial_scale);

std::tuple<at::Tensor, at::Tensor> spatial_pool(const at::Tensor& x,
                                                const std::optional<at::Tensor>& scale,
                                                bool max_first);

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(const at::Tensor& grad_mean,
                                                         const at::Tensor& grad_max,
                                                         const at::Tensor& argmax,
                                                         const at::Tensor& x,
                                                         const std::optional<at::Tensor>& scale);

at::Tensor spatial_pool_backward_add(at::Tensor& grad_x, const at::Tensor& grad_mean,
                                     const at::Tensor& grad_max, const at::Tensor& argmax,
                                     const at::Tensor& x,
                                     const std::optional<at::Tensor>& scale, bool add_mean);

at::Tensor gate_apply(const at::Tensor& x, const std::optional<at::Tensor>& channel_gate,
                      const std::optional<at::Tensor>& spatial_gate);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_apply_backward(
    const at::Tensor& grad_out, const at::Tensor& x,
    const std::optional<at::Tensor>& channel_gate,
    const std::optional<at::Tensor>& spatial_gate);

at::Tensor channel_gate(const at::Tensor& logits);

at::Tensor channel_gate_backward(const at::Tensor& grad_gate,
                                 const std::optional<at::Tensor>& grad_gate_2,
                                 const at::Tensor& gate, int64_t pools);

at::Tensor cbam_inference(
    const at::Tensor& x, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const std::optional<at::Tensor>& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pooling, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const std::optional<at::Tensor>& bn_mean,
    const std::optional<at::Tensor>& bn_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double bn_eps, bool max_first);

// Unchecked launcher for cbam_inference: out = x * g * h (either gate undefined for none), x
// dense (NCHW or channels_last), the gates contiguous in x's dtype, out dense like x.
void gate_apply_into(const at::Tensor& x, const at::Tensor& g, const at::Tensor& h,
                     at::Tensor& out);

}  // namespace gpu
}  // namespace fused_cbam
