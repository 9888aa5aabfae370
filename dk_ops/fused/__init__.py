"""The fused local DK path for GPUs: Triton kernels that build the scope columns tile by tile in
registers and multiply them on tensor cores, so the columns never go to memory (docs/gpu.md).

Opt-in: ``dk_ops.deform_kernel_conv2d`` runs it on CUDA tensors when ``DK_OPS_CUDA_PATH=fused``;
``dk_ops.fused.deform_kernel_conv2d`` calls it directly (on CPU tensors under
``TRITON_INTERPRET=1``, as the tests do). Needs Triton, which PyTorch's CUDA wheels bring.
"""
from dk_ops.fused.functional import deform_kernel_conv2d

__all__ = ['deform_kernel_conv2d']
