// Checks of channel_gate's and channel_gate_backward's arguments (schemas: csrc/ops.cpp), shared
// by their CPU and CUDA kernels so that both refuse the same arguments with the same messages.
// Each returns its tensor contiguous, as the kernels index it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fused_cbam::channel_gate_args {

// The MLP's logits of K >= 1 pooled vectors, [K, N, C] with C >= 1.
inline at::Tensor logits(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 3,
                    "logits: expected a 3-D tensor [K, N, C] (the logits of K pooled vectors), "
                    "got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   "logits: expected a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) > 0, "logits: expected at least one pooled vector (K >= 1), got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.size(2) > 0, "logits: expected at least one channel, got shape ", t.sizes());
  return t.contiguous();
}

// The gate [N, C] that channel_gate returned, and the number of pooled vectors it summed.
inline at::Tensor gate(const at::Tensor& t, int64_t pools) {
  TORCH_CHECK_VALUE(t.dim() == 2, "gate: expected a 2-D tensor [N, C], got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   "gate: expected a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) > 0, "gate: expected at least one channel, got shape ", t.sizes());
  TORCH_CHECK_VALUE(pools > 0, "pools: expected at least one pooled vector, got ", pools);
  return t.contiguous();
}

// A gradient of the gate: the gate's shape, dtype and device.
inline at::Tensor gradient(const at::Tensor& t, const at::Tensor& gate, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == gate.sizes(), name, ": expected shape ", gate.sizes(),
                    " (the gate's), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == gate.scalar_type(), name, ": expected dtype ",
                   gate.scalar_type(), " (the gate's), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == gate.device(), name, ": expected a tensor on ", gate.device(),
                    " (the gate's device), got one on ", t.device());
  return t.contiguous();
}

}  // namespace fused_cbam::channel_gate_args
