// The CPU kernels of the direct depthwise path (DepthwiseKernels, deform_kernel_conv2d.h).
#pragma once

#include "../deform_kernel_conv2d.h"

namespace dk_ops {

void depthwise_forward_cpu(const DepthwiseOperands& t, at::Tensor& output);
void depthwise_backward_cpu(const DepthwiseOperands& t, const at::Tensor& grad_output,
                            DepthwiseGradients& grads);

}  // namespace dk_ops
