// The operator's schemas (one TORCH_LIBRARY block) and the argument checks shared by
// every backend. Backends register their kernels in cpu/ and cuda/.
#include "deform_kernel_conv2d.h"

#include <Python.h>
#include <torch/library.h>

#include <sstream>

namespace dk_ops {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << (t.dim() == 1 ? ",)" : ")");
  return out.str();
}

std::string shape_of(std::initializer_list<int64_t> sizes) {
  std::ostringstream out;
  out << "(";
  bool first = true;
  for (int64_t s : sizes) {
    out << (first ? "" : ", ") << s;
    first = false;
  }
  out << ")";
  return out.str();
}

void check_pair(at::IntArrayRef value, const char* name, int64_t minimum) {
  TORCH_CHECK_VALUE(value.size() == 2, "deform_kernel_conv2d: ", name,
                    " must have 2 elements, got ", value);
  TORCH_CHECK_VALUE(value[0] >= minimum && value[1] >= minimum, "deform_kernel_conv2d: ", name,
                    " must be >= ", minimum, ", got ", value);
}

void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "deform_kernel_conv2d: ", name,
                   " has dtype ", t.scalar_type(), " but input has dtype ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input.device(), "deform_kernel_conv2d: ", name,
                    " is on ", t.device(), " but input is on ", input.device());
}

void check_divisible(int64_t channels, const char* what, int64_t groups, const char* group_name) {
  TORCH_CHECK_VALUE(groups >= 1, "deform_kernel_conv2d: ", group_name, " must be >= 1, got ",
                    groups);
  TORCH_CHECK_VALUE(channels % groups == 0, "deform_kernel_conv2d: ", what, " (", channels,
                    ") must be divisible by ", group_name, " (", groups, ")");
}

// A per-location tensor (data_offset, mask or local kernel_offset) of shape (N, C, H_out, W_out).
void check_per_location(const at::Tensor& t, const char* name, const char* layout,
                        int64_t channels, const DeformKernelGeometry& g) {
  TORCH_CHECK_VALUE(
      t.dim() == 4 && t.size(0) == g.batch && t.size(1) == channels && t.size(2) == g.out_h &&
          t.size(3) == g.out_w,
      "deform_kernel_conv2d: ", name, " must have shape ", layout, " = ",
      shape_of({g.batch, channels, g.out_h, g.out_w}), ", got ", shape_of(t));
}

}  // namespace

DeformKernelGeometry check_deform_kernel_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& kernel_offset,
    const std::optional<at::Tensor>& data_offset, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups) {
  // The dtypes the kernels compute in; not at::isFloatingType, which admits float8 / float4.
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "deform_kernel_conv2d: input must be float32, float64, float16 or bfloat16, got dtype ",
      dtype);
  TORCH_CHECK_VALUE(input.dim() == 4, "deform_kernel_conv2d: input must be 4-D (N, C_in, H, W), got shape ",
                    shape_of(input));
  TORCH_CHECK_VALUE(weight.dim() == 4,
                    "deform_kernel_conv2d: weight must be 4-D (C_out, C_in/groups, S_h, S_w), got shape ",
                    shape_of(weight));
  // As in F.conv2d, the batch and the input channels may be empty (the output is then empty, or
  // the bias: a sum of no terms), the image and the output channels not.
  TORCH_CHECK_VALUE(input.size(2) >= 1 && input.size(3) >= 1,
                    "deform_kernel_conv2d: input of shape ", shape_of(input),
                    " has no pixels; only its batch or its channels may be empty");
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "deform_kernel_conv2d: weight of shape ",
                    shape_of(weight), " has no output channels; weight.shape[0] must be >= 1");
  check_like_input(weight, "weight", input);
  check_like_input(kernel_offset, "kernel_offset", input);
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);

  DeformKernelGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.scope_h = weight.size(2);
  g.scope_w = weight.size(3);
  g.kernel_h = kernel_size[0];
  g.kernel_w = kernel_size[1];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.groups = groups;
  g.kernel_offset_groups = kernel_offset_groups;
  g.deform_groups = deform_groups;

  check_divisible(g.in_channels, "input channels", groups, "groups");
  check_divisible(g.out_channels, "output channels (weight.shape[0])", groups, "groups");
  check_divisible(g.in_channels, "input channels", kernel_offset_groups, "kernel_offset_groups");
  check_divisible(g.in_channels, "input channels", deform_groups, "deform_groups");
  TORCH_CHECK_VALUE(weight.size(1) * groups == g.in_channels,
                    "deform_kernel_conv2d: weight must have C_in/groups = ", g.in_channels, "/",
                    groups, " input channels in dim 1, got weight of shape ", shape_of(weight),
                    " for input of shape ", shape_of(input));
  TORCH_CHECK_VALUE(g.scope_h >= g.kernel_h && g.scope_w >= g.kernel_w,
                    "deform_kernel_conv2d: the scope weight.shape[2:] = (", g.scope_h, ", ",
                    g.scope_w, ") must be at least kernel_size = (", g.kernel_h, ", ", g.kernel_w,
                    ") in each dimension");

  // As F.conv2d: the padded input must hold the dilated kernel. (A shortfall smaller than the
  // stride would otherwise round, towards zero, to an output of one row.)
  const int64_t padded_h = g.height + 2 * g.pad_h, padded_w = g.width + 2 * g.pad_w;
  const int64_t spanned_h = g.dilation_h * (g.kernel_h - 1) + 1;
  const int64_t spanned_w = g.dilation_w * (g.kernel_w - 1) + 1;
  TORCH_CHECK_VALUE(padded_h >= spanned_h && padded_w >= spanned_w,
                    "deform_kernel_conv2d: input of shape ", shape_of(input), " is ",
                    shape_of({padded_h, padded_w}), " with padding ", padding,
                    ", smaller than the ", shape_of({spanned_h, spanned_w}),
                    " that kernel_size ", kernel_size, " spans with dilation ", dilation);
  g.out_h = (padded_h - spanned_h) / g.stride_h + 1;
  g.out_w = (padded_w - spanned_w) / g.stride_w + 1;

  const int64_t kernel_offset_channels = 2 * kernel_offset_groups * g.taps();
  g.global_kernel_offset = kernel_offset.dim() == 2;
  if (g.global_kernel_offset) {
    TORCH_CHECK_VALUE(kernel_offset.size(0) == g.batch && kernel_offset.size(1) == kernel_offset_channels,
                      "deform_kernel_conv2d: global kernel_offset must have shape (N, 2*Gk*K_h*K_w) = ",
                      shape_of({g.batch, kernel_offset_channels}), ", got ", shape_of(kernel_offset));
  } else {
    TORCH_CHECK_VALUE(kernel_offset.dim() == 4,
                      "deform_kernel_conv2d: kernel_offset must be 4-D (local) or 2-D (global), got shape ",
                      shape_of(kernel_offset));
    check_per_location(kernel_offset, "kernel_offset", "(N, 2*Gk*K_h*K_w, H_out, W_out)",
                       kernel_offset_channels, g);
  }
  if (data_offset) {
    check_like_input(*data_offset, "data_offset", input);
    check_per_location(*data_offset, "data_offset", "(N, 2*Gd*K_h*K_w, H_out, W_out)",
                       2 * deform_groups * g.taps(), g);
  }
  if (mask) {
    check_like_input(*mask, "mask", input);
    check_per_location(*mask, "mask", "(N, Gd*K_h*K_w, H_out, W_out)", deform_groups * g.taps(), g);
  }
  if (bias) {
    check_like_input(*bias, "bias", input);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.out_channels,
                      "deform_kernel_conv2d: bias must have shape (C_out,) = (", g.out_channels,
                      ",), got ", shape_of(*bias));
  }
  return g;
}

DeformKernelGeometry check_deform_kernel_conv2d_backward_args(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& kernel_offset, const std::optional<at::Tensor>& data_offset,
    const std::optional<at::Tensor>& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t kernel_offset_groups, int64_t deform_groups) {
  const auto g = check_deform_kernel_conv2d_args(input, weight, kernel_offset, data_offset, mask,
                                                 std::nullopt, kernel_size, stride, padding,
                                                 dilation, groups, kernel_offset_groups,
                                                 deform_groups);
  check_like_input(grad_output, "grad_output", input);
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == g.batch &&
                        grad_output.size(1) == g.out_channels && grad_output.size(2) == g.out_h &&
                        grad_output.size(3) == g.out_w,
                    "deform_kernel_conv2d_backward: grad_output must have shape ",
                    shape_of({g.batch, g.out_channels, g.out_h, g.out_w}), ", got ",
                    shape_of(grad_output));
  return g;
}

TORCH_LIBRARY(dk_ops, m) {
  m.def(
      "deform_kernel_conv2d(Tensor input, Tensor weight, Tensor kernel_offset, "
      "Tensor? data_offset, Tensor? mask, Tensor? bias, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int kernel_offset_groups, "
      "int deform_groups) -> Tensor");
  // Gradients of (input, weight, kernel_offset, data_offset, mask); entries whose
  // output_mask is false (or whose input is None) come back as empty tensors.
  m.def(
      "deform_kernel_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor kernel_offset, Tensor? data_offset, Tensor? mask, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int kernel_offset_groups, "
      "int deform_groups, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace dk_ops

// `import dk_ops._C` loads this library (and so runs TORCH_LIBRARY above); the Python
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
