// CPU entry points of the fused_cbam operators: argument checks, output allocation, and the
// choice of the kernel build that matches the CPU (the same capability PyTorch itself uses,
// so ATEN_CPU_CAPABILITY=default|avx2|avx512 also applies here).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/reshape.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../channel_gate_args.h"
#include "../inference_args.h"
#include "../spatial_share_args.h"
#include "kernels.h"

namespace fused_cbam::cpu {
namespace {

const KernelTable& kernels() {
  static const KernelTable& table = []() -> const KernelTable& {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return AVX512::kernels;
    if (capability == "AVX2") return AVX2::kernels;
    return DEFAULT::kernels;
  }();
  return table;
}

at::MemoryFormat format_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x itself when NCHW- or channels_last-contiguous; other strided views are copied to NCHW.
at::Tensor dense(const at::Tensor& x) {
  return x.is_contiguous() || is_channels_last(x) ? x : x.contiguous();
}

void check_input(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK_VALUE(
      x.dim() == 4, name, ": expected a 4-D tensor (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(
      at::isFloatingType(x.scalar_type()), name, ": expected a floating-point tensor, got ",
      x.scalar_type());
  TORCH_CHECK_VALUE(
      x.size(2) * x.size(3) > 0, name, ": expected a non-empty spatial size, got H x W = ",
      x.size(2), " x ", x.size(3));
  // The kernels track arg-max channels in float lanes, exact below 2^24; arg-max positions are
  // stored in int32.
  TORCH_CHECK_VALUE(
      x.size(1) > 0 && x.size(1) < (int64_t{1} << 24), name,
      ": expected between 1 and 2^24 - 1 channels, got ", x.size(1));
  TORCH_CHECK_VALUE(
      x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(), name,
      ": expected H * W < 2^31, got H x W = ", x.size(2), " x ", x.size(3));
}

// The arg-max a forward operator returned: its shape, int32, every index in [0, bound) (the
// kernels write at these positions: one from another input would write outside grad_x).
at::Tensor argmax_of(
    const at::Tensor& argmax, at::IntArrayRef shape, int64_t bound, const char* what) {
  TORCH_CHECK_VALUE(
      argmax.sizes() == shape, "argmax: expected shape ", shape, ", got ", argmax.sizes());
  TORCH_CHECK_TYPE(
      argmax.scalar_type() == at::kInt, "argmax: expected dtype int32, got ", argmax.scalar_type());
  at::Tensor am = argmax.contiguous();
  const int32_t* index = am.const_data_ptr<int32_t>();
  const bool in_range = std::all_of(
      index, index + am.numel(), [bound](int32_t i) { return i >= 0 && i < bound; });
  TORCH_CHECK_VALUE(in_range, "argmax: expected ", what, " in [0, ", bound,
                    ") (the arg-max of this x's forward), got one outside");
  return am;
}

// A tensor that goes with x: the expected shape, x's dtype and device.
void check_like(
    const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(
      t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
      " (x's), got ", t.scalar_type());
  TORCH_CHECK_VALUE(
      t.device() == x.device(), name, ": expected device ", x.device(), " (x's), got ", t.device());
}

// A small per-sample tensor (gate, scale, gradient) of the expected shape and x's dtype.
at::Tensor small(
    const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  check_like(t, x, shape, name);
  return t.contiguous();
}

at::Tensor optional_or_ones(
    const std::optional<at::Tensor>& t, const at::Tensor& x, at::IntArrayRef shape,
    const char* name) {
  return t.has_value() ? small(*t, x, shape, name) : at::ones(shape, x.options());
}

at::Tensor empty_like_x(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(format_of(x)));
}

std::vector<int64_t> per_channel(const at::Tensor& x) { return {x.size(0), x.size(1)}; }
std::vector<int64_t> per_pixel(const at::Tensor& x) { return {x.size(0), 1, x.size(2), x.size(3)}; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pool(const at::Tensor& x_in) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  at::Tensor avg = at::empty(per_channel(x), x.options());
  at::Tensor max = at::empty_like(avg);
  at::Tensor argmax = at::empty(per_channel(x), x.options().dtype(at::kInt));
  if (x.numel() > 0) kernels().channel_pool(x, avg, max, argmax);
  return {avg, max, argmax};
}

at::Tensor channel_pool_backward(
    const at::Tensor& grad_avg, const at::Tensor& grad_max, const at::Tensor& argmax,
    const at::Tensor& x_in) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  const auto shape = per_channel(x);
  const at::Tensor ga = small(grad_avg, x, shape, "grad_avg");
  const at::Tensor gm = small(grad_max, x, shape, "grad_max");
  const at::Tensor am = argmax_of(argmax, shape, x.size(2) * x.size(3), "positions h * W + w");
  at::Tensor grad_x = empty_like_x(x);
  if (x.numel() > 0) kernels().channel_pool_backward(ga, gm, am, grad_x);
  return grad_x;
}

// A gradient of x that a backward operator adds into: x's shape and dtype, dense in x's memory
// format (x itself when given, else its own).
void check_accumulator(const at::Tensor& grad_x, const at::Tensor& like) {
  check_input(grad_x, "grad_x");
  check_like(grad_x, like, like.sizes(), "grad_x");
  TORCH_CHECK_VALUE(
      grad_x.is_contiguous(format_of(like)) && (grad_x.is_contiguous() || is_channels_last(grad_x)),
      "grad_x: expected a tensor dense in x's memory format (NCHW or channels_last)");
}

void channel_pool_backward_add(
    at::Tensor& grad_x, const at::Tensor& grad_avg, const at::Tensor& grad_max,
    const at::Tensor& argmax, const std::optional<at::Tensor>& spatial_grad_mean,
    const std::optional<at::Tensor>& spatial_scale) {
  check_accumulator(grad_x, grad_x);
  const auto shape = per_channel(grad_x);
  const at::Tensor ga = small(grad_avg, grad_x, shape, "grad_avg");
  const at::Tensor gm = small(grad_max, grad_x, shape, "grad_max");
  const at::Tensor am =
      argmax_of(argmax, shape, grad_x.size(2) * grad_x.size(3), "positions h * W + w");
  check_spatial_share(spatial_grad_mean, spatial_scale);
  at::Tensor sgm, ss;
  if (spatial_grad_mean.has_value()) {
    sgm = small(*spatial_grad_mean, grad_x, per_pixel(grad_x), "spatial_grad_mean");
    ss = small(*spatial_scale, grad_x, shape, "spatial_scale");
  }
  if (grad_x.numel() > 0) kernels().channel_pool_backward_add(ga, gm, am, sgm, ss, grad_x);
}

std::tuple<at::Tensor, at::Tensor> spatial_pool(
    const at::Tensor& x_in, const std::optional<at::Tensor>& scale_in, bool max_first) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  const at::Tensor scale = optional_or_ones(scale_in, x, per_channel(x), "scale");
  at::Tensor maps = at::empty({x.size(0), 2, x.size(2), x.size(3)}, x.options());
  at::Tensor argmax = at::empty(per_pixel(x), x.options().dtype(at::kInt));
  if (x.numel() > 0) {
    at::Tensor mean = maps.narrow(1, max_first ? 1 : 0, 1);
    at::Tensor max = maps.narrow(1, max_first ? 0 : 1, 1);
    kernels().spatial_pool(x, scale, mean, max, argmax);
  }
  return {maps, argmax};
}

// spatial_pool_backward, writing the gradient of x into grad_x (accumulate: adding it; without
// add_mean, only the max's share), and returning the gradient of the scale.
at::Tensor spatial_pool_backward_into(
    at::Tensor& grad_x, bool accumulate, const at::Tensor& grad_mean, const at::Tensor& grad_max,
    const at::Tensor& argmax, const at::Tensor& x, const std::optional<at::Tensor>& scale_in,
    bool add_mean = true) {
  const auto shape = per_pixel(x);
  const at::Tensor gmean = small(grad_mean, x, shape, "grad_mean");
  const at::Tensor gmax = small(grad_max, x, shape, "grad_max");
  const at::Tensor am = argmax_of(argmax, shape, x.size(1), "channels");
  check_add_mean(add_mean, scale_in.has_value());
  const at::Tensor scale = optional_or_ones(scale_in, x, per_channel(x), "scale");
  at::Tensor grad_scale = at::empty(per_channel(x), x.options());
  if (x.numel() > 0) {
    auto kernel = !accumulate ? kernels().spatial_pool_backward
                  : add_mean  ? kernels().spatial_pool_backward_add
                              : kernels().spatial_pool_backward_max_add;
    kernel(gmean, gmax, am, x, scale, grad_x, grad_scale);
  } else {
    grad_scale.zero_();
  }
  return scale_in.has_value() ? grad_scale : at::empty({0}, x.options());
}

std::tuple<at::Tensor, at::Tensor> spatial_pool_backward(
    const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& argmax,
    const at::Tensor& x_in, const std::optional<at::Tensor>& scale_in) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  at::Tensor grad_x = empty_like_x(x);
  at::Tensor grad_scale =
      spatial_pool_backward_into(grad_x, false, grad_mean, grad_max, argmax, x, scale_in);
  return {grad_x, grad_scale};
}

at::Tensor spatial_pool_backward_add(
    at::Tensor& grad_x, const at::Tensor& grad_mean, const at::Tensor& grad_max,
    const at::Tensor& argmax, const at::Tensor& x_in, const std::optional<at::Tensor>& scale_in,
    bool add_mean) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  check_accumulator(grad_x, x);
  return spatial_pool_backward_into(
      grad_x, true, grad_mean, grad_max, argmax, x, scale_in, add_mean);
}

at::Tensor gate_apply(
    const at::Tensor& x_in, const std::optional<at::Tensor>& channel_gate,
    const std::optional<at::Tensor>& spatial_gate) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  const at::Tensor g = optional_or_ones(channel_gate, x, per_channel(x), "channel_gate");
  const at::Tensor h = optional_or_ones(spatial_gate, x, per_pixel(x), "spatial_gate");
  at::Tensor out = empty_like_x(x);
  if (x.numel() > 0) kernels().gate_apply(x, g, h, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_apply_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in,
    const std::optional<at::Tensor>& channel_gate, const std::optional<at::Tensor>& spatial_gate) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  check_like(grad_out_in, x, x.sizes(), "grad_out");
  const at::Tensor grad_out = grad_out_in.contiguous(format_of(x));
  const at::Tensor g = optional_or_ones(channel_gate, x, per_channel(x), "channel_gate");
  const at::Tensor h = optional_or_ones(spatial_gate, x, per_pixel(x), "spatial_gate");
  at::Tensor grad_x = empty_like_x(x);
  at::Tensor grad_g = at::zeros_like(g);
  at::Tensor grad_h = at::zeros_like(h);
  if (x.numel() > 0) kernels().gate_apply_backward(grad_out, x, g, h, grad_x, grad_g, grad_h);
  if (!channel_gate.has_value()) grad_g = at::empty({0}, x.options());
  if (!spatial_gate.has_value()) grad_h = at::empty({0}, x.options());
  return {grad_x, grad_g, grad_h};
}

at::Tensor channel_gate(const at::Tensor& logits_in) {
  const at::Tensor logits = channel_gate_args::logits(logits_in);
  at::Tensor gate = at::empty({logits.size(1), logits.size(2)}, logits.options());
  if (gate.numel() > 0) kernels().channel_gate(logits, gate);
  return gate;
}

at::Tensor channel_gate_backward(
    const at::Tensor& grad_gate_in, const std::optional<at::Tensor>& grad_gate_2_in,
    const at::Tensor& gate_in, int64_t pools) {
  const at::Tensor gate = channel_gate_args::gate(gate_in, pools);
  const at::Tensor grad_gate = channel_gate_args::gradient(grad_gate_in, gate, "grad_gate");
  const at::Tensor grad_gate_2 = inference::present(grad_gate_2_in)
      ? channel_gate_args::gradient(*grad_gate_2_in, gate, "grad_gate_2")
      : at::Tensor();
  at::Tensor grad_logits = at::empty({pools, gate.size(0), gate.size(1)}, gate.options());
  if (gate.numel() > 0) kernels().channel_gate_backward(grad_gate, grad_gate_2, gate, grad_logits);
  return grad_logits;
}

// A [1] parameter's value (already in the accumulation dtype, on the CPU).
double scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[0]
                                        : t.const_data_ptr<float>()[0];
}

// The spatial conv with an eval-mode BatchNorm folded in, its two kernels ordered [mean map,
// max map] (a [1, 1, K, K] kernel over 0.5 * mean + 0.5 * max: half of it on each map):
// weight [2, K, K] in the accumulation dtype, and the bias.
std::pair<at::Tensor, double> folded_spatial_conv(const inference::SpatialConv& conv,
                                                  bool max_first, double bn_eps) {
  const int64_t K = conv.K, maps = conv.maps;
  double scale = 1, shift = 0;
  if (conv.bn_var.defined()) {
    scale = 1 / std::sqrt(scalar(conv.bn_var) + bn_eps);
    shift = -scalar(conv.bn_mean) * scale;
    if (conv.bn_weight.defined()) {
      const double gamma = scalar(conv.bn_weight);
      scale *= gamma;
      shift *= gamma;
    }
    if (conv.bn_bias.defined()) shift += scalar(conv.bn_bias);
  }
  const double conv_b = conv.bias.defined() ? scalar(conv.bias) : 0;
  const double bias = conv_b * scale + shift;
  const double map_share = maps == 1 ? 0.5 : 1;  // one kernel over the average of the two maps
  const at::Tensor weight = conv.weight.contiguous();
  at::Tensor folded = at::empty({2, K, K}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "folded_spatial_conv", [&] {
    const scalar_t* src = weight.const_data_ptr<scalar_t>();
    scalar_t* dst = folded.data_ptr<scalar_t>();
    for (int64_t map = 0; map < 2; ++map) {
      const int64_t from = maps == 1 ? 0 : max_first ? 1 - map : map;
      for (int64_t i = 0; i < K * K; ++i) {
        dst[map * K * K + i] = static_cast<scalar_t>(src[from * K * K + i] * scale * map_share);
      }
    }
  });
  return {folded, bias};
}

// Samples each thread takes per chunk: as many as fit in three quarters of its L2 cache (the
// rest holds the output it writes and the small buffers), at least one.
int64_t samples_per_thread(const at::Tensor& x) {
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  const int64_t budget = (l2 > 0 ? l2 : 1 << 20) * 3 / 4;
  const int64_t sample_bytes = x.numel() / x.size(0) * x.element_size();
  return std::max<int64_t>(1, budget / std::max<int64_t>(sample_bytes, 1));
}

// The whole block without autograd (inference), x read from memory once: chunk by chunk of
// samples, the channel pooling, the MLP (see the schema in csrc/ops.cpp) and its sigmoid (its
// weights read once per chunk rather than once per sample), then the spatial pooling, the
// spatial gate sigmoid(bn(conv(maps))) and the output, with x still in cache.
at::Tensor cbam_inference(
    const at::Tensor& x_in, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const std::optional<at::Tensor>& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pooling, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double bn_eps, bool max_first) {
  check_input(x_in);
  const at::Tensor x = dense(x_in);
  const int64_t N = x.size(0), C = x.size(1);
  const auto opmath = at::toOpMathType(x.scalar_type());
  auto [w1, b1, w2, b2] = inference::mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling,
                                         opmath);
  const int64_t hidden = w1.size(0);
  if (!b1.defined()) b1 = at::zeros({hidden}, w1.options());
  if (w2.defined() && !b2.defined()) b2 = at::zeros({C}, w1.options());
  const auto [spatial_weight, spatial_bias] = folded_spatial_conv(
      inference::spatial_conv(x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
                              opmath),
      max_first, bn_eps);
  at::Tensor out = empty_like_x(x);
  if (x.numel() == 0) return out;
  const int64_t chunk = std::min(N, samples_per_thread(x) * at::get_num_threads());
  const int64_t sample_bytes = x.numel() / N * x.element_size();
  const int64_t weight_bytes = (w1.numel() + (w2.defined() ? w2.numel() : 0)) * w1.element_size();
  at::Tensor pooled, hidden_sums, gate;
  for (int64_t n0 = 0, n1; n0 < N; n0 = n1) {
    n1 = std::min(N, n0 + chunk);
    // Each chunk reads the MLP's weights once. A short last chunk joins this one when its x,
    // read twice more from beyond the L2 cache, costs less than a read of those weights (8 x
    // 2048 x 7 x 7 on a 2-core Xeon, a tail of 2 samples joining a chunk of 6: 0.55 -> 0.50 ms).
    if (2 * (N - n1) * sample_bytes < weight_bytes) n1 = N;
    const int64_t k = n1 - n0;
    if (!gate.defined() || gate.size(0) != k) {
      pooled = at::empty({2, k, C}, w1.options());
      hidden_sums = at::empty({k, hidden}, w1.options());
      gate = at::empty({k, C}, x.options());
    }
    kernels().inference_pool(x, n0, n1, pooled);
    kernels().inference_mlp(
        pooled, pooling == "sum" ? 2 : 1, pooling == "mix", w1, b1, w2, b2, hidden_sums, gate);
    kernels().inference_gate(x, n0, n1, gate, spatial_weight, spatial_bias, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_cbam, CPU, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_pool_backward", &channel_pool_backward);
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_pool_backward", &spatial_pool_backward);
  m.impl("spatial_pool_backward_add", &spatial_pool_backward_add);
  m.impl("channel_pool_backward_add", &channel_pool_backward_add);
  m.impl("gate_apply", &gate_apply);
  m.impl("gate_apply_backward", &gate_apply_backward);
  m.impl("channel_gate", &channel_gate);
  m.impl("channel_gate_backward", &channel_gate_backward);
  m.impl("cbam_inference", &cbam_inference);
}

}  // namespace fused_cbam::cpu
