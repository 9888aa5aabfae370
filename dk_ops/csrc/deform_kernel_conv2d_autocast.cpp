// deform_kernel_conv2d under torch.autocast: like a convolution, the op runs in the autocast
// dtype of the device (on CUDA float16, on the CPU bfloat16, unless autocast is given another).
// Every floating-point tensor argument on that device is cast to it, float64 ones excepted (as
// autocast does for conv2d).
//
// Compiled in every build and registered for both devices: a CPU-only build registers its
// AutocastCUDA kernel too, which is harmless, as it can only meet CUDA tensors, for which such
// a build has no kernel to run anyway.
//
// The backward op casts nothing: autograd calls it with the tensors saved by the forward and a
// gradient of the output's dtype. It only leaves autocast, as the forward does, for a backward
// called inside the autocast region: autograd runs it with that region's autocast state, which
// would otherwise cast the float32 sums of the driver's own ATen GEMMs down to the autocast dtype.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dk_ops {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

template <c10::DeviceType device_type>
Tensor forward_autocast(const Tensor& input, const Tensor& weight, const Tensor& kernel_offset,
                        const OptionalTensor& data_offset, const OptionalTensor& mask,
                        const OptionalTensor& bias, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, int64_t kernel_offset_groups, int64_t deform_groups) {
  // Autocast off for the call below: it reaches the CPU or CUDA kernel, whose own ATen calls
  // are then not cast either.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [dtype](const auto& tensor) {
    return at::autocast::cached_cast(dtype, tensor, device_type);
  };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dk_ops::deform_kernel_conv2d", "")
                             .typed<decltype(forward_autocast<device_type>)>();
  return op.call(cast(input), cast(weight), cast(kernel_offset), cast(data_offset), cast(mask),
                 cast(bias), kernel_size, stride, padding, dilation, groups, kernel_offset_groups,
                 deform_groups);
}

template <c10::DeviceType device_type>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_without_autocast(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight,
    const Tensor& kernel_offset, const OptionalTensor& data_offset, const OptionalTensor& mask,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, int64_t kernel_offset_groups, int64_t deform_groups,
    std::array<bool, 5> output_mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dk_ops::deform_kernel_conv2d_backward", "")
                             .typed<decltype(backward_without_autocast<device_type>)>();
  return op.call(grad_output, input, weight, kernel_offset, data_offset, mask, kernel_size, stride,
                 padding, dilation, groups, kernel_offset_groups, deform_groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_ops, AutocastCPU, m) {
  m.impl("deform_kernel_conv2d", &forward_autocast<c10::DeviceType::CPU>);
  m.impl("deform_kernel_conv2d_backward", &backward_without_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(dk_ops, AutocastCUDA, m) {
  m.impl("deform_kernel_conv2d", &forward_autocast<c10::DeviceType::CUDA>);
  m.impl("deform_kernel_conv2d_backward", &backward_without_autocast<c10::DeviceType::CUDA>);
}

}  // namespace dk_ops
