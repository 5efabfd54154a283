// CUDA implementations of the fused_cbam operators (schemas in csrc/ops.cpp).
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(fused_cbam, CUDA, m) {
  m.impl("channel_pool", &fused_cbam::gpu::channel_pool);
  m.impl("channel_pool_backward", &fused_cbam::gpu::channel_pool_backward);
  m.impl("spatial_pool", &fused_cbam::gpu::spatial_pool);
  m.impl("spatial_pool_backward", &fused_cbam::gpu::spatial_pool_backward);
  m.impl("channel_pool_backward_add", &fused_cbam::gpu::channel_pool_backward_add);
  m.impl("spatial_pool_backward_add", &fused_cbam::gpu::spatial_pool_backward_add);
  m.impl("gate_apply", &fused_cbam::gpu::gate_apply);
  m.impl("gate_apply_backward", &fused_cbam::gpu::gate_apply_backward);
  m.impl("channel_gate", &fused_cbam::gpu::channel_gate);
  m.impl("channel_gate_backward", &fused_cbam::gpu::channel_gate_backward);
  m.impl("cbam_inference", &fused_cbam::gpu::cbam_inference);
}
