"""Deformable Kernels (Gao et al., ICLR 2020) as a compiled PyTorch operator.

``import dk_ops`` loads the C++/CUDA extension ``dk_ops._C`` (which registers the
``torch.ops.dk_ops.*`` operators), attaches autograd and fake kernels, and exposes
the functional op and the modules.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from dk_ops import _C  # noqa: F401  (registers torch.ops.dk_ops)
from dk_ops.ops import deform_kernel_conv2d
from dk_ops.modules import DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d
from dk_ops.weight_mapping import rigid_to_scope, scope_sampling_matrix, scope_to_rigid

__all__ = [
    'deform_kernel_conv2d',
    'DeformKernel2d',
    'GlobalDeformKernel2d',
    'DeformKernelConv2d',
    'rigid_to_scope',
    'scope_sampling_matrix',
    'scope_to_rigid',
]
