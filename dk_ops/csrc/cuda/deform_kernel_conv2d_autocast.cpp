// deform_kernel_conv2d under torch.autocast("cuda"): like a convolution, the op runs in the
// autocast dtype (float16 unless autocast says bfloat16). Every floating-point CUDA tensor
// argument is cast to it, float64 ones excepted (as autocast does for conv2d).
//
// The backward op needs no autocast kernel: autograd calls it with the tensors saved by the
// forward and a gradient of the output's dtype.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dk_ops {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

Tensor forward_autocast(const Tensor& input, const Tensor& weight, const Tensor& kernel_offset,
                        const OptionalTensor& data_offset, const OptionalTensor& mask,
                        const OptionalTensor& bias, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        int64_t groups, int64_t kernel_offset_groups, int64_t deform_groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const auto dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  const auto cast = [dtype](const auto& tensor) {
    return at::autocast::cached_cast(dtype, tensor, c10::DeviceType::CUDA);
  };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dk_ops::deform_kernel_conv2d", "")
                             .typed<decltype(forward_autocast)>();
  return op.call(cast(input), cast(weight), cast(kernel_offset), cast(data_offset), cast(mask),
                 cast(bias), kernel_size, stride, padding, dilation, groups, kernel_offset_groups,
                 deform_groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(dk_ops, AutocastCUDA, m) { m.impl("deform_kernel_conv2d", &forward_autocast); }

}  // namespace dk_ops
