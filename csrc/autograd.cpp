// Autograd of the three forward operators, in C++ as torchvision's operators have it: each
// backward calls the namespace's backward operator through the dispatcher (the CPU or CUDA
// kernel). Registered with the library itself, the gradients are right wherever it is loaded,
// a TorchScript or AOTInductor graph run from C++ without the Python package included, and a
// call costs no Python. (cbam_inference's backward recomputes the block in Python:
// fused_cbam/_registrations.py.)
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fused_cbam {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Pooled = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;

// The backward operators have no derivatives of their own: say so instead of returning
// gradients that silently lack their second-order terms.
void refuse_double_backward(std::initializer_list<at::Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(
        !(t.defined() && t.requires_grad()),
        "fused_cbam operators do not support double backward (create_graph=True); use "
        "backend='reference' for higher-order gradients");
  }
}

// Saved tensors cannot be optional: an absent gate or scale is saved as an undefined tensor.
at::Tensor or_empty(const OptionalTensor& t) { return t.value_or(at::Tensor()); }
OptionalTensor present(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

class ChannelPool : public torch::autograd::Function<ChannelPool> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto channel_pool = op<Pooled(const at::Tensor&)>("fused_cbam::channel_pool");
    auto [avg, max, argmax] = channel_pool.call(x);
    ctx->save_for_backward({x, argmax});
    ctx->mark_non_differentiable({argmax});
    return {avg, max, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    refuse_double_backward({grads[0], grads[1], saved[0]});
    static const auto channel_pool_backward =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
            "fused_cbam::channel_pool_backward");
    return {channel_pool_backward.call(grads[0], grads[1], saved[1], saved[0])};
  }
};

class SpatialPool : public torch::autograd::Function<SpatialPool> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto spatial_pool =
        op<Pooled(const at::Tensor&, const OptionalTensor&)>("fused_cbam::spatial_pool");
    auto [mean, max, argmax] = spatial_pool.call(x, scale);
    ctx->save_for_backward({x, or_empty(scale), argmax});
    ctx->mark_non_differentiable({argmax});
    return {mean, max, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1];
    refuse_double_backward({grads[0], grads[1], x, scale});
    static const auto spatial_pool_backward =
        op<std::tuple<at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const OptionalTensor&)>("fused_cbam::spatial_pool_backward");
    auto [grad_x, grad_scale] =
        spatial_pool_backward.call(grads[0], grads[1], saved[2], x, present(scale));
    return {grad_x, scale.defined() ? grad_scale : at::Tensor()};
  }
};

class GateApply : public torch::autograd::Function<GateApply> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& channel_gate,
      const OptionalTensor& spatial_gate) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto gate_apply =
        op<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&)>(
            "fused_cbam::gate_apply");
    ctx->save_for_backward({x, or_empty(channel_gate), or_empty(spatial_gate)});
    return {gate_apply.call(x, channel_gate, spatial_gate)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &g = saved[1], &h = saved[2];
    refuse_double_backward({grads[0], x, g, h});
    static const auto gate_apply_backward =
        op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&)>(
            "fused_cbam::gate_apply_backward");
    auto [grad_x, grad_g, grad_h] = gate_apply_backward.call(grads[0], x, present(g), present(h));
    return {grad_x, g.defined() ? grad_g : at::Tensor(), h.defined() ? grad_h : at::Tensor()};
  }
};

Pooled channel_pool(const at::Tensor& x) {
  auto out = ChannelPool::apply(x);
  return {out[0], out[1], out[2]};
}

Pooled spatial_pool(const at::Tensor& x, const OptionalTensor& scale) {
  auto out = SpatialPool::apply(x, scale);
  return {out[0], out[1], out[2]};
}

at::Tensor gate_apply(
    const at::Tensor& x, const OptionalTensor& channel_gate, const OptionalTensor& spatial_gate) {
  return GateApply::apply(x, channel_gate, spatial_gate)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_cbam, Autograd, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("spatial_pool", &spatial_pool);
  m.impl("gate_apply", &gate_apply);
}

}  // namespace fused_cbam
