// Operator schemas of the fused_cbam namespace, declared once; each backend adds kernels with
// TORCH_LIBRARY_IMPL (csrc/cpu/, csrc/cuda/), the forward operators' autograd is in
// csrc/autograd.cpp, and the fake kernels live in Python (fused_cbam/_registrations.py).
//
// x is [N, C, H, W] (NCHW or channels_last), P = H * W. Gates and scales have x's dtype.
//   channel_pool(x)            -> avg [N, C], max [N, C] (x's dtype), argmax [N, C] int32 (index p)
//   spatial_pool(x, scale?, max_first=False)
//                              -> maps [N, 2, H, W] (x's dtype, NCHW-contiguous: the spatial
//                                 conv's input as it is), channel 0 the mean over c and channel 1
//                                 the max ([max, mean] if max_first), and argmax [N, 1, H, W]
//                                 int32 (channel c) of y = x * scale[n, c]; y is never stored
//   gate_apply(x, g?, h?)      -> x * g[n, c] * h[n, 0, h, w], in x's memory format
//   channel_gate(logits)       -> sigmoid(sum over k of logits[k]) [N, C] in logits' dtype, from
//                                 the channel MLP's logits of each of K pooled vectors [K, N, C]:
//                                 the sum in x's math type rounded to the logits' dtype (as the
//                                 layouts' logits.sum(0)), then the sigmoid, rounded
//   channel_gate_backward(grad_gate, grad_gate_2?, gate, pools)
//                              -> the gradient of the logits [pools, N, C]: every k gets
//                                 (grad_gate + grad_gate_2) * gate * (1 - gate), the two
//                                 gradients of a gate that feeds two operators added here
//   cbam_inference(x, fc1_weight, fc1_bias?, fc2_weight?, fc2_bias?, pooling, conv_weight,
//                  conv_bias?, bn_mean?, bn_var?, bn_weight?, bn_bias?, bn_eps, max_first)
//                              -> the whole block of the plain CBAM layouts, without autograd:
//                                 g = sigmoid(mlp(avg) + mlp(max)) for pooling "sum",
//                                 sigmoid(mlp(avg)) for "avg", sigmoid(mlp(0.5 avg + 0.5 max))
//                                 for "mix"; mlp = fc2(relu(fc1(.))), or fc1 alone without fc2;
//                                 h = sigmoid(bn(conv_KxK(maps(x * g)))); x * g * h. The fc
//                                 weights [hidden, C] / [C, hidden] (or 1x1 convs'); conv_weight
//                                 [1, 2, K, K] over the maps [max, mean] if max_first else
//                                 [mean, max], or [1, 1, K, K] over 0.5 mean + 0.5 max; bn in
//                                 eval mode (running statistics); CPU and CUDA kernels. The
//                                 CPU one computes the MLP and conv in x's math type; the CUDA one
//                                 rounds each MLP layer's output to x's dtype, as the modules'
//                                 layers in x's dtype do, and reads the MLP's (the conv's)
//                                 parameters in x's dtype if they all have it, else all in
//                                 x's math type
//   cbam_training(x, fc1_weight, fc1_bias?, fc2_weight?, fc2_bias?, pooling, conv_weight,
//                 conv_bias?, bn_mean?, bn_var?, bn_weight?, bn_bias?, bn_eps, max_first,
//                 bn_training, bn_momentum)
//                              -> the same block for training, with one autograd node
//                                 (csrc/training.cpp): the MLP and the conv as the modules'
//                                 layers compute them, in x's dtype (their parameters
//                                 converted to it, as autocast converts float32 ones; not
//                                 converted by an autocast around the call); bn as
//                                 nn.BatchNorm2d's
//                                 F.batch_norm with these running statistics, updated in place
//                                 (momentum bn_momentum) when bn_training. Device-agnostic: its
//                                 CPU and CUDA kernels call the operators above
// The backward operators return the gradient of x in x's memory format, and an empty tensor
// for the gradient of an absent optional input. channel_pool_backward_add and
// spatial_pool_backward_add add their gradient of x into grad_x (dense in x's memory format)
// instead: the fused modules' backward fills one gradient of x. There the spatial pooling's
// backward (add_mean=False) adds only its max's share, grad_max * scale[n, c] at each pixel's
// arg-max element, and the channel pooling's adds the rest of it, the mean's share
// spatial_scale[n, c] * spatial_grad_mean[n, p] / C, with its own in the same pass: the
// spatial step then only reads x (for the scale's gradient) instead of also reading and writing
// the gradient of x.
// A plain shared library, without Python: the package loads it with torch.ops.load_library
// (fused_cbam/_library.py), and a C++ program can dlopen it as it is.
#include <torch/library.h>

// flexible_layout: the kernels take x in any layout (outputs follow it, as the fake kernels say),
// so torch.compile hands them its own tensors. With Inductor's default for custom operators
// (keep eager's stride order), a compiled training step copied x once per operator call.
TORCH_LIBRARY(fused_cbam, m) {
  const std::vector<at::Tag> any_layout = {at::Tag::flexible_layout};
  m.def("channel_pool(Tensor x) -> (Tensor avg, Tensor max, Tensor argmax)", any_layout);
  m.def(
      "channel_pool_backward(Tensor grad_avg, Tensor grad_max, Tensor argmax, Tensor x) -> Tensor",
      any_layout);
  m.def(
      "channel_pool_backward_add(Tensor(a!) grad_x, Tensor grad_avg, Tensor grad_max, "
      "Tensor argmax, Tensor? spatial_grad_mean=None, Tensor? spatial_scale=None) -> ()",
      any_layout);
  m.def("spatial_pool(Tensor x, Tensor? scale, bool max_first=False) -> (Tensor maps, Tensor argmax)",
        any_layout);
  m.def(
      "spatial_pool_backward(Tensor grad_mean, Tensor grad_max, Tensor argmax, Tensor x, "
      "Tensor? scale) -> (Tensor grad_x, Tensor grad_scale)",
      any_layout);
  m.def(
      "spatial_pool_backward_add(Tensor(a!) grad_x, Tensor grad_mean, Tensor grad_max, "
      "Tensor argmax, Tensor x, Tensor? scale, bool add_mean=True) -> Tensor grad_scale",
      any_layout);
  m.def("gate_apply(Tensor x, Tensor? channel_gate, Tensor? spatial_gate) -> Tensor", any_layout);
  m.def(
      "gate_apply_backward(Tensor grad_out, Tensor x, Tensor? channel_gate, Tensor? spatial_gate) "
      "-> (Tensor grad_x, Tensor grad_channel_gate, Tensor grad_spatial_gate)",
      any_layout);
  m.def("channel_gate(Tensor logits) -> Tensor", any_layout);
  m.def(
      "channel_gate_backward(Tensor grad_gate, Tensor? grad_gate_2, Tensor gate, int pools) "
      "-> Tensor",
      any_layout);
  m.def(
      "cbam_inference(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, "
      "Tensor? fc2_bias, str pooling, Tensor conv_weight, Tensor? conv_bias, Tensor? bn_mean, "
      "Tensor? bn_var, Tensor? bn_weight, Tensor? bn_bias, float bn_eps, bool max_first) -> Tensor",
      any_layout);
  m.def(
      "cbam_training(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor? fc2_weight, "
      "Tensor? fc2_bias, str pooling, Tensor conv_weight, Tensor? conv_bias, Tensor(a!)? bn_mean, "
      "Tensor(b!)? bn_var, Tensor? bn_weight, Tensor? bn_bias, float bn_eps, bool max_first, "
      "bool bn_training, float bn_momentum) -> Tensor",
      any_layout);
}
