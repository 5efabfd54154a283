// Autograd of the forward operators, in C++ as torchvision's operators have it: the three
// training operators' and channel_gate's backward calls the namespace's backward operator
// through the dispatcher (the CPU or CUDA kernel); cbam_inference's recomputes the block from its
// formula. Registered with the library itself, the gradients are right wherever it is loaded, a
// TorchScript or AOTInductor graph run from C++ without the Python package included, and a call
// costs no Python. (Triton's operators get theirs in Python: fused_cbam/_registrations.py.)
#include "autograd_helpers.h"

#include <ATen/OpMathType.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace fused_cbam {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Pooled = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

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
      AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& scale, bool max_first) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto spatial_pool =
        op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptionalTensor&, bool)>(
            "fused_cbam::spatial_pool");
    auto [maps, argmax] = spatial_pool.call(x, scale, max_first);
    ctx->save_for_backward({x, or_empty(scale), argmax});
    ctx->saved_data["max_first"] = max_first;
    ctx->mark_non_differentiable({argmax});
    return {maps, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1];
    refuse_double_backward({grads[0], x, scale});
    static const auto spatial_pool_backward =
        op<std::tuple<at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const OptionalTensor&)>("fused_cbam::spatial_pool_backward");
    // The maps' two channels, read in place (with their sample stride) by the backward kernels.
    const bool max_first = ctx->saved_data["max_first"].toBool();
    const at::Tensor grad_mean = grads[0].narrow(1, max_first ? 1 : 0, 1);
    const at::Tensor grad_max = grads[0].narrow(1, max_first ? 0 : 1, 1);
    auto [grad_x, grad_scale] =
        spatial_pool_backward.call(grad_mean, grad_max, saved[2], x, as_optional(scale));
    return {grad_x, scale.defined() ? grad_scale : at::Tensor(), at::Tensor()};
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
    auto [grad_x, grad_g, grad_h] =
        gate_apply_backward.call(grads[0], x, as_optional(g), as_optional(h));
    return {grad_x, g.defined() ? grad_g : at::Tensor(), h.defined() ? grad_h : at::Tensor()};
  }
};

class ChannelGate : public torch::autograd::Function<ChannelGate> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto channel_gate = op<at::Tensor(const at::Tensor&)>("fused_cbam::channel_gate");
    at::Tensor gate = channel_gate.call(logits);
    // sym_size: size() on a tensor with symbolic sizes (torch.export's) would specialise all of
    // them, the batch too; K itself is always a constant.
    ctx->saved_data["pools"] = logits.sym_size(0);
    ctx->save_for_backward({gate});
    return {gate};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    refuse_double_backward({grads[0], saved[0]});
    static const auto channel_gate_backward =
        op<at::Tensor(const at::Tensor&, const OptionalTensor&, const at::Tensor&, int64_t)>(
            "fused_cbam::channel_gate_backward");
    const int64_t pools = ctx->saved_data["pools"].toSymInt().guard_int(__FILE__, __LINE__);
    return {channel_gate_backward.call(grads[0], std::nullopt, saved[0], pools)};
  }
};

// The formula of cbam_inference (fused_cbam/reference.py's cbam_inference, which the tests
// hold both to): every parameter in x's opmath dtype, nothing rounded until the output.
at::Tensor block_formula(const std::vector<at::Tensor>& t, c10::string_view pooling, double bn_eps,
                         bool max_first) {
  const at::Tensor& x = t[0];
  const auto opmath = at::toOpMathType(x.scalar_type());
  const auto cast = [&](const at::Tensor& p) { return p.defined() ? p.to(opmath) : p; };
  const at::Tensor y = x.to(opmath), w1 = cast(t[1]), b1 = cast(t[2]), w2 = cast(t[3]),
                   b2 = cast(t[4]), conv_w = cast(t[5]), conv_b = cast(t[6]),
                   bn_mean = cast(t[7]), bn_var = cast(t[8]), bn_w = cast(t[9]), bn_b = cast(t[10]);
  const auto mlp = [&](const at::Tensor& v) {
    const at::Tensor hidden = at::linear(v, w1.flatten(1), as_optional(b1));
    return w2.defined() ? at::linear(at::relu(hidden), w2.flatten(1), as_optional(b2)) : hidden;
  };
  const at::Tensor planes = y.flatten(2);
  const at::Tensor avg = planes.mean(2), max = std::get<0>(planes.max(2));
  const at::Tensor logits = pooling == "avg" ? mlp(avg)
                            : pooling == "sum" ? mlp(avg) + mlp(max)
                                               : mlp(0.5 * avg + 0.5 * max);
  const at::Tensor gated = y * at::sigmoid(logits).unsqueeze(-1).unsqueeze(-1);
  const at::Tensor mean = gated.mean(1, /*keepdim=*/true),
                   spatial_max = std::get<0>(gated.max(1, /*keepdim=*/true));
  const at::Tensor maps = conv_w.size(1) == 1 ? 0.5 * mean + 0.5 * spatial_max
                          : max_first        ? at::cat({spatial_max, mean}, 1)
                                             : at::cat({mean, spatial_max}, 1);
  at::Tensor u = at::conv2d(maps, conv_w, as_optional(conv_b), 1, conv_w.size(-1) / 2);
  if (bn_mean.defined()) {
    u = (u - bn_mean) * at::rsqrt(bn_var + bn_eps);
    if (bn_w.defined()) u = u * bn_w;
    if (bn_b.defined()) u = u + bn_b;
  }
  return (gated * at::sigmoid(u)).to(x.scalar_type());
}

// The whole block in one kernel; its backward recomputes the block from its formula and
// differentiates that. The modules take this operator only where no gradient is needed, but a
// graph traced from a module in eval mode (torch.jit.trace) may be differentiated later. Under
// create_graph the recomputation hangs on the inputs' own graph, so higher derivatives work;
// through an alias of each (view_as), so that an argument passed twice, or computed from another,
// gets its own gradient and not the total one, which autograd would then add again.
class CbamInference : public torch::autograd::Function<CbamInference> {
 public:
  // The positions of the tensor arguments among the operator's 14.
  static constexpr int kTensorArguments[] = {0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11};

  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fc1_weight,
      const OptionalTensor& fc1_bias, const OptionalTensor& fc2_weight,
      const OptionalTensor& fc2_bias, c10::string_view pooling, const at::Tensor& conv_weight,
      const OptionalTensor& conv_bias, const OptionalTensor& bn_mean,
      const OptionalTensor& bn_var, const OptionalTensor& bn_weight,
      const OptionalTensor& bn_bias, double bn_eps, bool max_first) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, fc1_weight, or_empty(fc1_bias), or_empty(fc2_weight),
                            or_empty(fc2_bias), conv_weight, or_empty(conv_bias),
                            or_empty(bn_mean), or_empty(bn_var), or_empty(bn_weight),
                            or_empty(bn_bias)});
    ctx->saved_data["pooling"] = std::string(pooling);
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["max_first"] = max_first;
    return call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight, conv_bias,
                bn_mean, bn_var, bn_weight, bn_bias, bn_eps, max_first);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool create_graph = at::GradMode::is_enabled();
    at::AutoGradMode enable_grad(true);
    std::vector<at::Tensor> inputs, wanted;
    std::vector<bool> needed;
    size_t edge = 0;  // autograd's edges are the defined tensor arguments
    for (const at::Tensor& t : saved) {
      const bool needs = t.defined() && ctx->needs_input_grad(edge++);
      inputs.push_back(!t.defined() ? t
                       : create_graph ? t.view_as(t)
                                      : t.detach().requires_grad_(needs));
      needed.push_back(needs);
      if (needs) wanted.push_back(inputs.back());
    }
    const at::Tensor out = block_formula(inputs, ctx->saved_data["pooling"].toStringRef(),
                                         ctx->saved_data["bn_eps"].toDouble(),
                                         ctx->saved_data["max_first"].toBool());
    const variable_list found =
        wanted.empty() ? variable_list()
                       : torch::autograd::grad({out}, wanted, {grads[0]}, /*retain_graph=*/std::nullopt,
                                               create_graph);
    variable_list result(14);
    for (size_t i = 0, next = 0; i < needed.size(); ++i) {
      if (needed[i]) result[kTensorArguments[i]] = found[next++];
    }
    return result;
  }

  static at::Tensor call(
      const at::Tensor& x, const at::Tensor& fc1_weight, const OptionalTensor& fc1_bias,
      const OptionalTensor& fc2_weight, const OptionalTensor& fc2_bias, c10::string_view pooling,
      const at::Tensor& conv_weight, const OptionalTensor& conv_bias,
      const OptionalTensor& bn_mean, const OptionalTensor& bn_var,
      const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, double bn_eps,
      bool max_first) {
    static const auto cbam_inference =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                      const OptionalTensor&, const OptionalTensor&, c10::string_view,
                      const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                      const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                      double, bool)>("fused_cbam::cbam_inference");
    return cbam_inference.call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling,
                               conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
                               bn_eps, max_first);
  }
};

at::Tensor cbam_inference(
    const at::Tensor& x, const at::Tensor& fc1_weight, const OptionalTensor& fc1_bias,
    const OptionalTensor& fc2_weight, const OptionalTensor& fc2_bias, c10::string_view pooling,
    const at::Tensor& conv_weight, const OptionalTensor& conv_bias, const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
    double bn_eps, bool max_first) {
  if (!autograd_needed({x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                        bn_mean, bn_var, bn_weight, bn_bias})) {  // the modules' case: no autograd node to build
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return CbamInference::call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling,
                               conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
                               bn_eps, max_first);
  }
  return CbamInference::apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling,
                              conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
                              bn_eps, max_first);
}

Pooled channel_pool(const at::Tensor& x) {
  auto out = ChannelPool::apply(x);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> spatial_pool(
    const at::Tensor& x, const OptionalTensor& scale, bool max_first) {
  auto out = SpatialPool::apply(x, scale, max_first);
  return {out[0], out[1]};
}

at::Tensor gate_apply(
    const at::Tensor& x, const OptionalTensor& channel_gate, const OptionalTensor& spatial_gate) {
  return GateApply::apply(x, channel_gate, spatial_gate)[0];
}

at::Tensor channel_gate(const at::Tensor& logits) { return ChannelGate::apply(logits)[0]; }

}  // namespace

TORCH_LIBRARY_IMPL(fused_cbam, Autograd, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("spatial_pool", &spatial_pool);
  m.impl("gate_apply", &gate_apply);
  m.impl("channel_gate", &channel_gate);
  m.impl("cbam_inference", &cbam_inference);
}

}  // namespace fused_cbam
