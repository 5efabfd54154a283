// channel_gate: gate[m] = sigmoid(sum_k logits[k, m]) over the M = N * C gates, and its backward,
// which writes (grad[m] + grad_2[m]) * gate[m] * (1 - gate[m]) into each of the K rows of the
// logits' gradient. Elementwise, a grid-stride loop of at most one wave; math in x's opmath type
// (the sigmoid as ATen's: 1 / (1 + exp(-v))). The sum is rounded to the logits' dtype before the
// sigmoid, as the layouts' `logits.sum(0)` rounds it (a gate an ulp apart moves spatial maxima at
// near ties, with their whole gradient: benchmarks/NOTES.md, nineteenth session).
#include "../channel_gate_args.h"
#include "common.cuh"
#include "kernels.h"

namespace fused_cbam {
namespace gpu {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    channel_gate_kernel(const scalar_t* __restrict__ logits, int64_t pools, int64_t M,
                        scalar_t* __restrict__ gate) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; m < M; m += stride) {
    acc_t sum = 0;
    for (int64_t k = 0; k < pools; ++k) sum += static_cast<acc_t>(logits[k * M + m]);
    const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(sum));
    gate[m] = static_cast<scalar_t>(acc_t(1) / (acc_t(1) + std::exp(-v)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    channel_gate_backward_kernel(const scalar_t* __restrict__ grad,
                                 const scalar_t* __restrict__ grad_2,
                                 const scalar_t* __restrict__ gate, int64_t pools, int64_t M,
                                 scalar_t* __restrict__ grad_logits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; m < M; m += stride) {
    acc_t g = static_cast<acc_t>(grad[m]);
    if (grad_2 != nullptr) g += static_cast<acc_t>(grad_2[m]);
    const acc_t s = static_cast<acc_t>(gate[m]);
    const scalar_t d = static_cast<scalar_t>(g * (acc_t(1) - s) * s);
    for (int64_t k = 0; k < pools; ++k) grad_logits[k * M + m] = d;
  }
}

namespace {

// Blocks for M elements, one each, at most one full wave (the loop strides over the rest).
unsigned elementwise_blocks(int64_t M) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(ceil_div(M, kThreads), resident_threads() / kThreads)));
}

}  // namespace

at::Tensor channel_gate(const at::Tensor& logits_in) {
  constexpr const char* op = "fused_cbam::channel_gate";
  TORCH_CHECK_VALUE(logits_in.is_cuda(), op, ": logits: expected a CUDA tensor, got one on ",
                    logits_in.device());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = channel_gate_args::logits(logits_in);
  at::Tensor gate = at::empty({logits.size(1), logits.size(2)}, logits.options());
  const int64_t M = gate.numel();
  if (M == 0) return gate;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    channel_gate_kernel<scalar_t, at::opmath_type<scalar_t>>
        <<<elementwise_blocks(M), kThreads, 0, current_stream()>>>(
            logits.const_data_ptr<scalar_t>(), logits.size(0), M,
            gate.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gate;
}

at::Tensor channel_gate_backward(const at::Tensor& grad_gate_in,
                                 const std::optional<at::Tensor>& grad_gate_2_in,
                                 const at::Tensor& gate_in, int64_t pools) {
  constexpr const char* op = "fused_cbam::channel_gate_backward";
  TORCH_CHECK_VALUE(gate_in.is_cuda(), op, ": gate: expected a CUDA tensor, got one on ",
                    gate_in.device());
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor gate = channel_gate_args::gate(gate_in, pools);
  const at::Tensor grad = channel_gate_args::gradient(grad_gate_in, gate, "grad_gate");
  const bool has_grad_2 = grad_gate_2_in.has_value() && grad_gate_2_in->defined();
  const at::Tensor grad_2 =
      has_grad_2 ? channel_gate_args::gradient(*grad_gate_2_in, gate, "grad_gate_2")
                 : at::Tensor();
  at::Tensor grad_logits = at::empty({pools, gate.size(0), gate.size(1)}, gate.options());
  const int64_t M = gate.numel();
  if (M == 0) return grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), op, [&] {
    channel_gate_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
        <<<elementwise_blocks(M), kThreads, 0, current_stream()>>>(
            grad.const_data_ptr<scalar_t>(),
            has_grad_2 ? grad_2.const_data_ptr<scalar_t>() : nullptr,
            gate.const_data_ptr<scalar_t>(), pools, M, grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace gpu
}  // namespace fused_cbam
