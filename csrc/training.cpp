// cbam_training: the whole block of the plain CBAM layouts in one operator with one autograd
// node, for the modules' eager training step. Through the three forward operators a step records
// some 14 operators and as many autograd nodes, each with its Python (module calls,
// autograd.Function) and the engine's work: on a 2-core CPU at 2x64x4x4, 40-45% of the step's host
// time lay above the ATen calls it makes (benchmarks/NOTES.md). Here the forward calls the fused
// operators and the ATen ones in C++, and the backward their backward operators, filling one
// gradient of x as fused_cbam/_one_grad.py does (the spatial pooling adds its max's share, the
// channel pooling's pass adds its own and the spatial mean's). Device-agnostic: every call goes
// through the dispatcher, to the CPU or CUDA kernels.
#include "autograd_helpers.h"
#include "inference_args.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace fused_cbam {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The operator's arguments, by their position in its schema.
enum Argument {
  kX, kFc1Weight, kFc1Bias, kFc2Weight, kFc2Bias, kPooling, kConvWeight, kConvBias, kBnMean,
  kBnVar, kBnWeight, kBnBias, kBnEps, kMaxFirst, kBnTraining, kBnMomentum, kArguments
};

// What the backward reads of the forward, by position in the saved list.
enum Saved {
  sX, sFc1Weight, sFc2Weight, sChannelArgmax, sRows, sHidden, sGate, sConvInput, sConvWeight,
  sConvOut, sBnWeight, sBnMean, sBnVar, sBnSaveMean, sBnSaveInvstd, sBnReserve, sSpatialGate,
  sSpatialArgmax, kSaved
};

struct Forward {
  at::Tensor out;
  std::vector<at::Tensor> saved;  // by Saved
  int64_t bn_impl = 0;            // which BatchNorm implementation ran (its backward takes the same)
};

// The pooled vectors the MLP takes (a checked pooling: inference::check_mlp).
int64_t pools_of(c10::string_view pooling) { return pooling == "sum" ? 2 : 1; }

// The spatial conv's padding keeps H x W.
std::array<int64_t, 2> same_padding(const at::Tensor& conv_weight) {
  return {conv_weight.size(2) / 2, conv_weight.size(3) / 2};
}

// The MLP's and the conv's parameters are used in x's dtype, whatever floating dtype they come
// in: under mixed precision the modules hand x in the autocast dtype and these in float32, which
// autocast converts so for linear and conv. Their gradients, computed in x's dtype, autograd's
// engine converts to each parameter's own, as for autocast's conversions. The BatchNorm's stay
// as they are, as F.batch_norm takes them.
// (No `to` call where the dtype is x's already: it would hand the argument back as it is, which
// an operator below autograd must not return from its calls.)
at::Tensor in_dtype_of(const at::Tensor& x, const at::Tensor& t) {
  return t.scalar_type() == x.scalar_type() ? t : t.to(x.scalar_type());
}
OptionalTensor in_dtype_of(const at::Tensor& x, const OptionalTensor& t) {
  return inference::present(t) ? OptionalTensor(in_dtype_of(x, *t)) : std::nullopt;
}

// The operator computes in x's dtype under autocast too: its linear, conv and mm calls would
// otherwise be converted to the autocast dtype.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// A Linear layer's or a 1x1 conv's weight as a matrix [out, in] (a new view: flatten would hand
// a 2-D weight back as it is, which an operator below autograd must not return from its calls).
at::Tensor matrix(const at::Tensor& weight) { return weight.reshape({weight.size(0), -1}); }

constexpr std::array<int64_t, 2> kOnes = {1, 1};
constexpr std::array<int64_t, 2> kZeros = {0, 0};

// One layer of the MLP over the pooled rows [M, in], as the layout computes it: a Linear's as
// linear, a 1x1 conv's as a convolution of [M, in, 1, 1] images (core.py's pointwise). In 16 bits
// cuBLAS and cuDNN may round a biased output differently, and a ReLU input near 0 can then change
// sign, switching that unit's whole gradient on or off: the inferred cause of bfloat16 steps on
// an H200 0.45 off in a gradient of x against the module's own (benchmarks/NOTES.md).
at::Tensor mlp_layer(const at::Tensor& rows, const at::Tensor& weight, const OptionalTensor& bias) {
  if (weight.dim() == 2) return at::linear(rows, weight, bias);
  const at::Tensor images = rows.unsqueeze(-1).unsqueeze(-1);
  return at::convolution(images, weight, bias, kOnes, kZeros, kOnes, false, kZeros, 1).flatten(1);
}

// The block's forward as the modules compute it (fused_cbam/nn/core.py): every call below
// autograd. With BatchNorm in training, its running statistics are updated in place.
Forward block_forward(
    const at::Tensor& x, const at::Tensor& fc1_weight, const OptionalTensor& fc1_bias,
    const OptionalTensor& fc2_weight, const OptionalTensor& fc2_bias, c10::string_view pooling,
    const at::Tensor& conv_weight, const OptionalTensor& conv_bias, const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
    double bn_eps, bool max_first, bool bn_training, double bn_momentum, bool for_backward) {
  const NoAutocast no_autocast;
  static const auto channel_pool =
      op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&)>("fused_cbam::channel_pool");
  static const auto channel_gate = op<at::Tensor(const at::Tensor&)>("fused_cbam::channel_gate");
  static const auto spatial_pool =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptionalTensor&, bool)>(
          "fused_cbam::spatial_pool");
  static const auto gate_apply =
      op<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&)>(
          "fused_cbam::gate_apply");
  auto [avg, max, channel_argmax] = channel_pool.call(x);  // (which checks x)
  // The parameters, as cbam_inference checks them (any floating dtype: in_dtype_of).
  inference::check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling);
  inference::check_spatial_conv(x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias);
  const int64_t pools = pools_of(pooling);
  // The MLP's input: the pooled vectors stacked along the batch (one batched MLP call).
  const at::Tensor rows = pooling == "sum" ? at::cat({avg, max}) : pooling == "avg" ? avg : avg * 0.5 + max * 0.5;
  const at::Tensor fc1 = in_dtype_of(x, fc1_weight);
  const OptionalTensor fc2 = in_dtype_of(x, fc2_weight);
  at::Tensor hidden = mlp_layer(rows, fc1, in_dtype_of(x, fc1_bias)), logits = hidden;
  if (fc2.has_value()) {
    hidden = at::relu(hidden);
    logits = mlp_layer(hidden, *fc2, in_dtype_of(x, fc2_bias));
  } else {
    hidden = at::Tensor();
  }
  const at::Tensor gate = channel_gate.call(logits.unflatten(0, {pools, x.size(0)}));

  auto [maps, spatial_argmax] = spatial_pool.call(x, gate, max_first);
  // A 1-channel conv takes 0.5·mean + 0.5·max, as the sum of the halved maps (core.py's
  // spatial_gate_of_maps). On the CPU, where a gradient will flow, in channels_last strides:
  // oneDNN's backward over NCHW maps pads them to 16 channels (core.py's _spatial_conv_layout).
  at::Tensor conv_input = conv_weight.size(1) == 1 ? (maps * 0.5).sum(1, /*keepdim=*/true) : maps;
  if (x.is_cpu() && for_backward) conv_input = conv_input.clone(at::MemoryFormat::ChannelsLast);
  const at::Tensor conv = in_dtype_of(x, conv_weight);
  const at::Tensor conv_out = at::convolution(conv_input, conv, in_dtype_of(x, conv_bias), kOnes,
                                              same_padding(conv), kOnes, false, kZeros, 1);

  Forward result;
  result.saved.resize(kSaved);
  at::Tensor spatial_logits = conv_out;
  if (inference::present(bn_mean)) {
    // What nn.BatchNorm2d's F.batch_norm runs (cuDNN where it qualifies), with its check.
    TORCH_CHECK_VALUE(!bn_training || conv_out.numel() != 1,
                "Expected more than 1 value per channel when training, got input size ", conv_out.sizes());
    auto [normed, save_mean, save_invstd, reserve, impl] = at::_batch_norm_impl_index(
        conv_out, bn_weight, bn_bias, bn_mean, bn_var, bn_training, bn_momentum, bn_eps,
        at::globalContext().userEnabledCuDNN());
    spatial_logits = normed;
    result.bn_impl = impl;
    result.saved[sBnSaveMean] = save_mean;
    result.saved[sBnSaveInvstd] = save_invstd;
    result.saved[sBnReserve] = reserve;
    // Read by the backward in eval mode only. Copies (one value each): the module's next
    // forward in training mode updates the statistics in place before this backward may run,
    // without a version bump (ATen's BatchNorm makes none either).
    if (!bn_training && for_backward) {
      result.saved[sBnMean] = bn_mean->clone();
      result.saved[sBnVar] = bn_var->clone();
    }
  }
  const at::Tensor spatial_gate = at::sigmoid(spatial_logits);
  result.out = gate_apply.call(x, gate, spatial_gate);

  result.saved[sX] = x;
  result.saved[sFc1Weight] = fc1;
  result.saved[sFc2Weight] = or_empty(fc2);
  result.saved[sChannelArgmax] = channel_argmax;
  result.saved[sRows] = rows;
  result.saved[sHidden] = hidden;
  result.saved[sGate] = gate;
  result.saved[sConvInput] = conv_input;
  result.saved[sConvWeight] = conv;
  result.saved[sConvOut] = conv_out;
  result.saved[sBnWeight] = or_empty(bn_weight);
  result.saved[sSpatialGate] = spatial_gate;
  result.saved[sSpatialArgmax] = spatial_argmax;
  return result;
}

// cuDNN's BatchNorm reserve space, as its backward may take it: autograd's own formula hands it
// a copy where the graph is retained (a second backward reads it again); a node here cannot see
// retain_graph, so always a copy (empty on the CPU; small on CUDA: one channel).
at::Tensor reserve_copy(const at::Tensor& reserve) {
  return reserve.defined() && reserve.numel() > 0 ? reserve.clone() : reserve;
}

class CbamTraining : public torch::autograd::Function<CbamTraining> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fc1_weight,
      const OptionalTensor& fc1_bias, const OptionalTensor& fc2_weight,
      const OptionalTensor& fc2_bias, c10::string_view pooling, const at::Tensor& conv_weight,
      const OptionalTensor& conv_bias, const OptionalTensor& bn_mean, const OptionalTensor& bn_var,
      const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, double bn_eps,
      bool max_first, bool bn_training, double bn_momentum) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Forward f = block_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight,
                              conv_bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, max_first,
                              bn_training, bn_momentum, /*for_backward=*/true);
    // Autograd's edges are the defined tensor arguments, in order: their positions, for
    // needs_input_grad.
    const std::initializer_list<std::pair<int64_t, OptionalTensor>> tensor_arguments = {
        {kX, x}, {kFc1Weight, fc1_weight}, {kFc1Bias, fc1_bias}, {kFc2Weight, fc2_weight},
        {kFc2Bias, fc2_bias}, {kConvWeight, conv_weight}, {kConvBias, conv_bias},
        {kBnMean, bn_mean}, {kBnVar, bn_var}, {kBnWeight, bn_weight}, {kBnBias, bn_bias}};
    std::vector<int64_t> edges;
    for (const auto& [position, t] : tensor_arguments) {
      if (t.has_value() && t->defined()) edges.push_back(position);
    }
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["pooling"] = std::string(pooling);
    ctx->saved_data["max_first"] = max_first;
    ctx->saved_data["bn_training"] = bn_training;
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["bn_impl"] = f.bn_impl;
    ctx->saved_data["has_conv_bias"] = conv_bias.has_value();
    ctx->save_for_backward(f.saved);
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto gate_apply_backward =
        op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&)>(
            "fused_cbam::gate_apply_backward");
    static const auto spatial_pool_backward_add =
        op<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const OptionalTensor&, bool)>(
            "fused_cbam::spatial_pool_backward_add");
    static const auto channel_gate_backward =
        op<at::Tensor(const at::Tensor&, const OptionalTensor&, const at::Tensor&, int64_t)>(
            "fused_cbam::channel_gate_backward");
    static const auto channel_pool_backward_add =
        op<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const OptionalTensor&, const OptionalTensor&)>("fused_cbam::channel_pool_backward_add");

    const NoAutocast no_autocast;
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& x = s[sX];
    // A node is built only where an input requires a gradient: under create_graph its
    // gradients would lack their second-order terms.
    TORCH_CHECK(!at::GradMode::is_enabled(), kNoDoubleBackward);
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto needs = [&](int64_t argument) {
      const auto it = std::find(edges.begin(), edges.end(), argument);
      return it != edges.end() && ctx->needs_input_grad(it - edges.begin());
    };
    const std::string pooling = ctx->saved_data["pooling"].toStringRef();
    const int64_t pools = pools_of(pooling), n = x.size(0);
    const bool max_first = ctx->saved_data["max_first"].toBool();
    variable_list result(kArguments);

    // The gate's backward makes the one gradient of x; the steps below add theirs into it.
    auto [grad_x, grad_gate, grad_spatial_gate] =
        gate_apply_backward.call(grads[0], x, s[sGate], s[sSpatialGate]);

    at::Tensor grad_conv_out = at::sigmoid_backward(grad_spatial_gate, s[sSpatialGate]);
    if (s[sBnSaveMean].defined()) {  // (a BatchNorm ran)
      auto [grad_in, grad_weight, grad_bias] = at::_batch_norm_impl_index_backward(
          ctx->saved_data["bn_impl"].toInt(), s[sConvOut], grad_conv_out,
          as_optional(s[sBnWeight]), as_optional(s[sBnMean]), as_optional(s[sBnVar]),
          as_optional(s[sBnSaveMean]), as_optional(s[sBnSaveInvstd]),
          ctx->saved_data["bn_training"].toBool(),
          ctx->saved_data["bn_eps"].toDouble(), {true, needs(kBnWeight), needs(kBnBias)},
          reserve_copy(s[sBnReserve]));
      // (ATen leaves it undefined for an empty batch without a BatchNorm weight; the empty
      // gradient above then stands for it.)
      if (grad_in.defined()) grad_conv_out = grad_in;
      result[kBnWeight] = grad_weight;
      result[kBnBias] = grad_bias;
    }
    const at::Tensor& conv_weight = s[sConvWeight];
    const std::vector<int64_t> bias_sizes = {conv_weight.size(0)};
    auto [grad_maps, grad_conv_weight, grad_conv_bias] = at::convolution_backward(
        grad_conv_out, s[sConvInput], conv_weight,
        ctx->saved_data["has_conv_bias"].toBool() ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
        kOnes, same_padding(conv_weight), kOnes, false, kZeros, 1,
        {true, needs(kConvWeight), needs(kConvBias)});
    result[kConvWeight] = grad_conv_weight;
    result[kConvBias] = grad_conv_bias;

    // The maps' gradients, read in place; a 1-channel conv took half of each map.
    const bool mixed = conv_weight.size(1) == 1;
    const at::Tensor grad_mean = mixed ? grad_maps * 0.5 : grad_maps.narrow(1, max_first ? 1 : 0, 1);
    const at::Tensor grad_max = mixed ? grad_mean : grad_maps.narrow(1, max_first ? 0 : 1, 1);
    const at::Tensor& gate = s[sGate];
    const at::Tensor grad_scale = spatial_pool_backward_add.call(
        grad_x, grad_mean, grad_max, s[sSpatialArgmax], x, gate, /*add_mean=*/false);
    const at::Tensor grad_logits =
        channel_gate_backward.call(grad_scale, grad_gate, gate, pools).flatten(0, 1);

    // The MLP's backward, as autograd's for linear, relu, linear (a 1x1 conv's too: the same
    // products, in another rounding than cuDNN's; the ReLU's mask is the forward's).
    at::Tensor grad_hidden = grad_logits;
    const at::Tensor& fc2_weight = s[sFc2Weight];
    if (fc2_weight.defined()) {
      const at::Tensor& hidden = s[sHidden];
      if (needs(kFc2Weight)) result[kFc2Weight] = grad_logits.t().mm(hidden).view(fc2_weight.sizes());
      if (needs(kFc2Bias)) result[kFc2Bias] = grad_logits.sum(0);
      grad_hidden = at::threshold_backward(grad_logits.mm(matrix(fc2_weight)), hidden, 0);
    }
    const at::Tensor& fc1_weight = s[sFc1Weight];
    if (needs(kFc1Weight)) result[kFc1Weight] = grad_hidden.t().mm(s[sRows]).view(fc1_weight.sizes());
    if (needs(kFc1Bias)) result[kFc1Bias] = grad_hidden.sum(0);
    if (!needs(kX)) return result;  // what remains is the gradient of x's channel pooling

    const at::Tensor grad_rows = grad_hidden.mm(matrix(fc1_weight));
    const at::Tensor grad_avg = pooling == "sum" ? grad_rows.narrow(0, 0, n)
                                : pooling == "avg" ? grad_rows
                                                   : grad_rows * 0.5;
    const at::Tensor grad_max_pool = pooling == "sum" ? grad_rows.narrow(0, n, n)
                                     : pooling == "avg" ? at::zeros_like(grad_rows)
                                                        : grad_avg;
    channel_pool_backward_add.call(grad_x, grad_avg, grad_max_pool, s[sChannelArgmax], grad_mean, gate);
    result[kX] = grad_x;
    return result;
  }
};

at::Tensor cbam_training_kernel(
    const at::Tensor& x, const at::Tensor& fc1_weight, const OptionalTensor& fc1_bias,
    const OptionalTensor& fc2_weight, const OptionalTensor& fc2_bias, c10::string_view pooling,
    const at::Tensor& conv_weight, const OptionalTensor& conv_bias, const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
    double bn_eps, bool max_first, bool bn_training, double bn_momentum) {
  return block_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight,
                       conv_bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, max_first,
                       bn_training, bn_momentum, /*for_backward=*/false)
      .out;
}

at::Tensor cbam_training(
    const at::Tensor& x, const at::Tensor& fc1_weight, const OptionalTensor& fc1_bias,
    const OptionalTensor& fc2_weight, const OptionalTensor& fc2_bias, c10::string_view pooling,
    const at::Tensor& conv_weight, const OptionalTensor& conv_bias, const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
    double bn_eps, bool max_first, bool bn_training, double bn_momentum) {
  if (!autograd_needed({x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                        bn_weight, bn_bias})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return cbam_training_kernel(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling,
                                conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias,
                                bn_eps, max_first, bn_training, bn_momentum);
  }
  return CbamTraining::apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling, conv_weight,
                             conv_bias, bn_mean, bn_var, bn_weight, bn_bias, bn_eps, max_first,
                             bn_training, bn_momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_cbam, Autograd, m) { m.impl("cbam_training", &cbam_training); }
TORCH_LIBRARY_IMPL(fused_cbam, CPU, m) { m.impl("cbam_training", &cbam_training_kernel); }
#ifdef FUSED_CBAM_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_cbam, CUDA, m) { m.impl("cbam_training", &cbam_training_kernel); }
#endif

}  // namespace fused_cbam
