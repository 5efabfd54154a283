// Checks of the whole-block operators' parameters (schemas: csrc/ops.cpp), shared by
// cbam_inference's CPU and CUDA kernels and by cbam_training, so that all refuse the same
// arguments with the same messages. The check_ functions check; the others also return the
// parameter in the dtype the caller asks for (which read_dtype picks on the GPU), contiguous
// except the spatial conv's weight.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

namespace fused_cbam::inference {

inline void check_floating_on_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   ": expected a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(),
                    " (x's), got ", t.device());
}

// A parameter: of the expected shape, floating, on x's device.
inline void check_parameter(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                            const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  check_floating_on_device(t, x, name);
}

// A checked parameter in its own strides.
inline at::Tensor strided_parameter(const at::Tensor& t, const at::Tensor& x,
                                    at::IntArrayRef shape, const char* name,
                                    at::ScalarType dtype) {
  check_parameter(t, x, shape, name);
  return t.to(dtype);
}

inline at::Tensor parameter(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                            const char* name, at::ScalarType dtype) {
  return strided_parameter(t, x, shape, name, dtype).contiguous();
}

// Whether an optional parameter is given: C++ callers may pass an undefined tensor for None.
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_optional_parameter(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                     at::IntArrayRef shape, const char* name) {
  if (present(t)) check_parameter(*t, x, shape, name);
}

// An optional parameter of the given shape; an undefined tensor when absent.
inline at::Tensor optional_parameter(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                     at::IntArrayRef shape, const char* name,
                                     at::ScalarType dtype) {
  return present(t) ? parameter(*t, x, shape, name, dtype) : at::Tensor();
}

// The dtype a GPU kernel reads a group of parameters in (undefined tensors: absent ones): x's
// when all of them have it, the modules' case, where nothing is converted and so nothing
// launched; else x's math type.
inline at::ScalarType read_dtype(const at::Tensor& x,
                                 std::initializer_list<std::optional<at::Tensor>> parameters) {
  const auto dtype = x.scalar_type();
  for (const auto& t : parameters) {
    if (present(t) && t->scalar_type() != dtype) return at::toOpMathType(dtype);
  }
  return dtype;
}

// An MLP weight: [rows, cols], or a 1x1 conv's [rows, cols, 1, 1].
inline void check_matrix(const at::Tensor& t, const at::Tensor& x, int64_t rows, int64_t cols,
                         const char* name) {
  const bool conv = t.dim() == 4 && t.size(2) == 1 && t.size(3) == 1;
  TORCH_CHECK_VALUE((t.dim() == 2 || conv) && t.size(0) == rows && t.size(1) == cols, name,
                    ": expected shape [", rows, ", ", cols, "] (or [", rows, ", ", cols,
                    ", 1, 1]), got ", t.sizes());
  check_floating_on_device(t, x, name);
}

// A checked MLP weight as [rows, cols].
inline at::Tensor matrix(const at::Tensor& t, const at::Tensor& x, int64_t rows, int64_t cols,
                         const char* name, at::ScalarType dtype) {
  check_matrix(t, x, rows, cols, name);
  return t.reshape({rows, cols}).to(dtype).contiguous();
}

// The channel MLP: fc1 [hidden, C] and fc2 [C, hidden], or fc1 [C, C] alone (w2, b2 undefined);
// biases undefined where absent.
struct Mlp {
  at::Tensor w1, b1, w2, b2;
};

// Checks the MLP's parameters; returns its hidden size (C without fc2).
inline int64_t check_mlp(const at::Tensor& x, const at::Tensor& fc1_weight,
                         const std::optional<at::Tensor>& fc1_bias,
                         const std::optional<at::Tensor>& fc2_weight,
                         const std::optional<at::Tensor>& fc2_bias, c10::string_view pooling) {
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(pooling == "avg" || pooling == "sum" || pooling == "mix",
                    "pooling: expected \"avg\", \"sum\" or \"mix\", got \"", pooling, "\"");
  TORCH_CHECK_VALUE(fc1_weight.dim() >= 2 && fc1_weight.size(0) > 0,
                    "fc1_weight: expected shape [hidden, ", C, "] (or [hidden, ", C,
                    ", 1, 1]), got ", fc1_weight.sizes());
  TORCH_CHECK_VALUE(present(fc2_weight) || !present(fc2_bias),
                    "fc2_bias: expected None without fc2_weight");
  // Without fc2, fc1 alone maps the pooled vectors to the channel logits.
  const int64_t hidden = present(fc2_weight) ? fc1_weight.size(0) : C;
  check_matrix(fc1_weight, x, hidden, C, "fc1_weight");
  check_optional_parameter(fc1_bias, x, {hidden}, "fc1_bias");
  if (present(fc2_weight)) {
    check_matrix(*fc2_weight, x, C, hidden, "fc2_weight");
    check_optional_parameter(fc2_bias, x, {C}, "fc2_bias");
  }
  return hidden;
}

inline Mlp mlp(const at::Tensor& x, const at::Tensor& fc1_weight,
               const std::optional<at::Tensor>& fc1_bias,
               const std::optional<at::Tensor>& fc2_weight,
               const std::optional<at::Tensor>& fc2_bias, c10::string_view pooling,
               at::ScalarType dtype) {
  const int64_t C = x.size(1);
  const int64_t hidden = check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooling);
  Mlp m;
  m.w1 = matrix(fc1_weight, x, hidden, C, "fc1_weight", dtype);
  m.b1 = optional_parameter(fc1_bias, x, {hidden}, "fc1_bias", dtype);
  if (present(fc2_weight)) {
    m.w2 = matrix(*fc2_weight, x, C, hidden, "fc2_weight", dtype);
    m.b2 = optional_parameter(fc2_bias, x, {C}, "fc2_bias", dtype);
  }
  return m;
}

// The spatial conv and its eval-mode BatchNorm: weight [1, 2, K, K] over the two maps, or
// [1, 1, K, K] over 0.5 * mean + 0.5 * max (K odd), in its own strides (a channels_last
// model's is not contiguous: the GPU kernels read it as it is rather than copy it every call);
// the scalars undefined where absent.
struct SpatialConv {
  at::Tensor weight, bias, bn_mean, bn_var, bn_weight, bn_bias;
  int64_t maps, K;
};

// Checks the spatial conv's and its BatchNorm's parameters; returns the maps the conv takes (1
// or 2) and its size K.
inline std::pair<int64_t, int64_t> check_spatial_conv(
    const at::Tensor& x, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias) {
  const int64_t K = conv_weight.dim() == 4 ? conv_weight.size(3) : 0;
  const int64_t maps = conv_weight.dim() == 4 ? conv_weight.size(1) : 0;
  TORCH_CHECK_VALUE(K % 2 == 1 && (maps == 1 || maps == 2),
                    "conv_weight: expected shape [1, 2, K, K] (or [1, 1, K, K]) with K odd, got ",
                    conv_weight.sizes());
  TORCH_CHECK_VALUE(present(bn_mean) == present(bn_var),
                    "bn_mean, bn_var: expected both or neither");
  TORCH_CHECK_VALUE(present(bn_mean) || !(present(bn_weight) || present(bn_bias)),
                    "bn_weight, bn_bias: expected None without bn_mean and bn_var (the running "
                    "statistics they go with)");
  check_parameter(conv_weight, x, {1, maps, K, K}, "conv_weight");
  check_optional_parameter(conv_bias, x, {1}, "conv_bias");
  check_optional_parameter(bn_mean, x, {1}, "bn_mean");
  check_optional_parameter(bn_var, x, {1}, "bn_var");
  check_optional_parameter(bn_weight, x, {1}, "bn_weight");
  check_optional_parameter(bn_bias, x, {1}, "bn_bias");
  return {maps, K};
}

inline SpatialConv spatial_conv(const at::Tensor& x, const at::Tensor& conv_weight,
                                const std::optional<at::Tensor>& conv_bias,
                                const std::optional<at::Tensor>& bn_mean,
                                const std::optional<at::Tensor>& bn_var,
                                const std::optional<at::Tensor>& bn_weight,
                                const std::optional<at::Tensor>& bn_bias, at::ScalarType dtype) {
  SpatialConv s;
  std::tie(s.maps, s.K) =
      check_spatial_conv(x, conv_weight, conv_bias, bn_mean, bn_var, bn_weight, bn_bias);
  s.weight = strided_parameter(conv_weight, x, {1, s.maps, s.K, s.K}, "conv_weight", dtype);
  s.bias = optional_parameter(conv_bias, x, {1}, "conv_bias", dtype);
  s.bn_mean = optional_parameter(bn_mean, x, {1}, "bn_mean", dtype);
  s.bn_var = optional_parameter(bn_var, x, {1}, "bn_var", dtype);
  s.bn_weight = optional_parameter(bn_weight, x, {1}, "bn_weight", dtype);
  s.bn_bias = optional_parameter(bn_bias, x, {1}, "bn_bias", dtype);
  return s;
}

}  // namespace fused_cbam::inference
