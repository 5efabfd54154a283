// What the C++ autograd of the fused_cbam operators shares (csrc/autograd.cpp, the forward
// operators'; csrc/training.cpp, the whole training block's).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <initializer_list>
#include <optional>

namespace fused_cbam {

using OptionalTensor = std::optional<at::Tensor>;

// An operator of the library by its qualified name, called through the dispatcher (the kernel of
// the tensors' device).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The backward operators have no derivatives of their own: say so instead of returning
// gradients that silently lack their second-order terms.
constexpr const char* kNoDoubleBackward =
    "fused_cbam operators do not support double backward (create_graph=True); use "
    "backend='reference' for higher-order gradients";

inline void refuse_double_backward(std::initializer_list<at::Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : tensors) TORCH_CHECK(!(t.defined() && t.requires_grad()), kNoDoubleBackward);
}

// Saved tensors cannot be optional: an absent gate or scale is saved as an undefined tensor.
inline at::Tensor or_empty(const OptionalTensor& t) { return t.value_or(at::Tensor()); }
inline OptionalTensor as_optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

// Whether autograd has anything to record: a tensor that requires a gradient (in grad mode), or
// one with a forward-mode tangent, which autograd::Function refuses with its own error (it has no
// jvp here) rather than returning an output without a tangent.
inline bool autograd_needed(std::initializer_list<OptionalTensor> tensors) {
  const bool grad_mode = at::GradMode::is_enabled();
  return std::any_of(tensors.begin(), tensors.end(), [grad_mode](const OptionalTensor& t) {
    return t.has_value() && t->defined() &&
           ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined());
  });
}

}  // namespace fused_cbam
