// The CPU kernels, compiled once per CPU capability (DEFAULT, AVX2, AVX512: see setup.py) and
// chosen at run time by ops_cpu.cpp. Callers pass validated tensors: x is NCHW-contiguous or
// channels_last-contiguous, gates and scales are contiguous [N, C] / [N, 1, H, W] tensors of x's
// dtype, outputs are allocated in x's memory format.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_cbam::cpu {

struct KernelTable {
  void (*channel_pool)(const at::Tensor& x, at::Tensor& avg, at::Tensor& max, at::Tensor& argmax);
  void (*channel_pool_backward)(
      const at::Tensor& grad_avg, const at::Tensor& grad_max, const at::Tensor& argmax,
      at::Tensor& grad_x);
  // The same, adding into grad_x instead of writing it; with spatial_grad_mean (contiguous
  // [N, 1, H, W], read as [N, P]) defined, also spatial_scale[n, c] * spatial_grad_mean[n, p] / C
  // (the mean's share of a spatial pooling that spatial_pool_backward_max_add left out).
  void (*channel_pool_backward_add)(
      const at::Tensor& grad_avg, const at::Tensor& grad_max, const at::Tensor& argmax,
      const at::Tensor& spatial_grad_mean, const at::Tensor& spatial_scale, at::Tensor& grad_x);
  // mean and max [N, 1, H, W] may be two channels of one tensor: each sample's H * W values
  // contiguous, samples mean.stride(0) apart in both.
  void (*spatial_pool)(
      const at::Tensor& x, const at::Tensor& scale, at::Tensor& mean, at::Tensor& max,
      at::Tensor& argmax);
  void (*spatial_pool_backward)(
      const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& argmax,
      const at::Tensor& x, const at::Tensor& scale, at::Tensor& grad_x, at::Tensor& grad_scale);
  // The same, adding into grad_x instead of writing it.
  void (*spatial_pool_backward_add)(
      const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& argmax,
      const at::Tensor& x, const at::Tensor& scale, at::Tensor& grad_x, at::Tensor& grad_scale);
  // The same, adding only the max's share into grad_x (grad_scale whole).
  void (*spatial_pool_backward_max_add)(
      const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& argmax,
      const at::Tensor& x, const at::Tensor& scale, at::Tensor& grad_x, at::Tensor& grad_scale);
  void (*gate_apply)(
      const at::Tensor& x, const at::Tensor& channel_gate, const at::Tensor& spatial_gate,
      at::Tensor& out);
  void (*gate_apply_backward)(
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& channel_gate,
      const at::Tensor& spatial_gate, at::Tensor& grad_x, at::Tensor& grad_channel_gate,
      at::Tensor& grad_spatial_gate);
  // gate [N, C] = sigmoid of the sum of logits [K, N, C] over K; the backward writes
  // (grad_gate + grad_gate_2) * gate * (1 - gate) into each of the K rows of grad_logits
  // (grad_gate_2 undefined for none). All contiguous, in one dtype.
  void (*channel_gate)(const at::Tensor& logits, at::Tensor& gate);
  void (*channel_gate_backward)(
      const at::Tensor& grad_gate, const at::Tensor& grad_gate_2, const at::Tensor& gate,
      at::Tensor& grad_logits);
  // Inference of the whole block for samples [n0, n1) in three steps: pooled [2, n1 - n0, C]
  // (opmath dtype) gets the mean and max of each (n, c); the channel MLP over the first `pools`
  // of them, or (mixed) over 0.5 * mean + 0.5 * max, written over the means (weights and biases
  // in opmath dtype; fc2 undefined for one layer; hidden [n1 - n0, hidden size] scratch) gives
  // the channel gates [n1 - n0, C] (x's dtype); then the spatial gate (a KxK conv, weight
  // [2, K, K] in opmath dtype over the [mean, max] maps, plus bias, then a sigmoid) and
  // out = x * g * h.
  void (*inference_pool)(const at::Tensor& x, int64_t n0, int64_t n1, at::Tensor& pooled);
  void (*inference_mlp)(
      at::Tensor& pooled, int64_t pools, bool mixed, const at::Tensor& fc1_weight,
      const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
      at::Tensor& hidden, at::Tensor& gate);
  void (*inference_gate)(
      const at::Tensor& x, int64_t n0, int64_t n1, const at::Tensor& channel_gate,
      const at::Tensor& spatial_weight, double spatial_bias, at::Tensor& out);
};

// One table per capability; each is defined by a build of kernels.cpp.
namespace DEFAULT { extern const KernelTable kernels; }
namespace AVX2 { extern const KernelTable kernels; }
namespace AVX512 { extern const KernelTable kernels; }

inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace fused_cbam::cpu
