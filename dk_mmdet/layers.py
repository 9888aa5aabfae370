"""Deformable Kernel layers as mmcv conv layers, registered in mmengine's root ``MODELS``.

Registering in the root registry (as mmcv does for ``DCN`` and ``DCNv2``) lets
``mmcv.cnn.build_conv_layer`` find them from any default scope: mmdet's registry falls back
to its parent, and scope-less code sees the root directly. Config names:

- ``DK``: local DK, kernel offsets per output location (options ``scope_size``,
  ``kernel_offset_groups``);
- ``DKGlobal``: global DK, one set of kernel offsets per image (same options);
- ``DKDCN``: local DK plus DCN data offsets (adds ``deform_groups``);
- ``DKDCNv2``: local DK plus DCNv2 data offsets and modulation mask (adds ``deform_groups``).

All take mmcv's conv signature ``(in_channels, out_channels, kernel_size, stride=1,
padding=0, dilation=1, groups=1, bias=False, **dk_options)``. ``scope_size`` defaults to
``kernel_size + 1`` (a 3x3 kernel sampled from a 4x4 scope), and to 3 along an axis of kernel
size 1 (see :mod:`dk_ops.modules`).

From scratch, each layer starts as the rigid conv it replaces would: its zero-offset kernel is
drawn as that conv's weight, at construction and by the init_cfg that would initialise it
(:mod:`dk_mmdet.rigid_init`), so with the seed of the rigid network the DK network computes the
same function at step 0. Rigid checkpoints load directly: a rigid ``(out, in, K, K)`` ``weight`` met while loading a
state dict is mapped into the scope with :func:`dk_ops.rigid_to_scope`, so with its offset
generators at zero the layer computes exactly the rigid convolution (for ``DKDCNv2`` the
zero-initialised mask is sigmoid(0) = 0.5, which halves the output, as in mmcv's DCNv2).
"""
from typing import Dict, Tuple

import torch
from mmengine.registry import MODELS
from torch import nn

import dk_ops
from dk_mmdet.rigid_init import RigidKernelInit


class MMCVConvMixin:
    """mmcv's conv signature, option checking and rigid-weight loading for a dk_ops module.

    Subclasses list it before the dk_ops module so that its methods wrap the module's.
    """

    config_name = ''
    # Keyword options the layer accepts beyond the conv signature.
    dk_option_names: Tuple[str, ...] = ('scope_size', 'kernel_offset_groups')
    # Options fixed by the layer type, passed to the dk_ops module.
    fixed_options: Dict = {}
    # Attributes holding offset generators, which start (and re-start in init_weights) at zero.
    offset_generator_names: Tuple[str, ...] = ()

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, **dk_options):
        self.check_options(dk_options)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, **self.fixed_options,
                         **dk_options)
        # Where an init_cfg would initialise the rigid conv, it initialises this layer's
        # zero-offset kernel the same way (dk_mmdet/rigid_init.py).
        self.rigid_kernel_init = RigidKernelInit(self)

    @classmethod
    def check_options(cls, dk_options: Dict) -> None:
        """Raises TypeError naming any option of ``dk_options`` the layer does not take."""
        unknown = sorted(set(dk_options) - set(cls.dk_option_names))
        if unknown:
            raise TypeError(f'{cls.config_name} got unknown option(s) {unknown}; the options '
                            f'of {cls.config_name} are {list(cls.dk_option_names)}')

    def rigid_kernel(self) -> torch.Tensor:
        """The kernel that zero offsets sample from the scope, (C_out, C_in/groups, K_h, K_w)."""
        return dk_ops.scope_to_rigid(self.weight.detach(), self.kernel_size)

    def set_rigid_kernel(self, rigid: torch.Tensor) -> None:
        """Set the scope to the minimum-norm one whose zero-offset kernel is ``rigid``."""
        with torch.no_grad():
            self.weight.copy_(dk_ops.rigid_to_scope(rigid, self.scope_size))

    def init_weights(self) -> None:
        # The offset generators start at zero and mmengine's name-matched initialisers skip
        # them, but an init that walks modules by isinstance(nn.Conv2d / nn.Linear), as some
        # heads do, would not; mmengine's BaseModule.init_weights calls this after its parent's.
        for name in self.offset_generator_names:
            for parameter in getattr(self, name).parameters():
                nn.init.zeros_(parameter)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + 'weight'
        if key in state_dict and self._is_rigid_weight(state_dict[key]):
            # torch hands every module a shallow copy of the caller's dict: this stays local.
            state_dict[key] = dk_ops.rigid_to_scope(state_dict[key], self.scope_size)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _is_rigid_weight(self, weight: torch.Tensor) -> bool:
        rigid_shape = (*self.weight.shape[:2], *self.kernel_size)
        return self.scope_size != self.kernel_size and tuple(weight.shape) == rigid_shape


def _register(cls):
    MODELS.register_module(name=cls.config_name, module=cls)
    return cls


@_register
class DKConv2d(MMCVConvMixin, dk_ops.DeformKernel2d):
    """Local Deformable Kernel (config ``type='DK'``)."""

    config_name = 'DK'
    offset_generator_names = ('kernel_offset_conv',)


@_register
class DKGlobalConv2d(MMCVConvMixin, dk_ops.GlobalDeformKernel2d):
    """Global Deformable Kernel (config ``type='DKGlobal'``)."""

    config_name = 'DKGlobal'
    offset_generator_names = ('kernel_offset_fc',)


@_register
class DKDCNConv2d(MMCVConvMixin, dk_ops.DeformKernelConv2d):
    """Local Deformable Kernel with DCN data offsets (config ``type='DKDCN'``)."""

    config_name = 'DKDCN'
    dk_option_names = MMCVConvMixin.dk_option_names + ('deform_groups',)
    fixed_options = dict(modulated=False)
    offset_generator_names = ('kernel_offset_conv', 'data_offset_conv')


@_register
class DKDCNv2Conv2d(MMCVConvMixin, dk_ops.DeformKernelConv2d):
    """Local Deformable Kernel with DCNv2 data offsets and mask (config ``type='DKDCNv2'``)."""

    config_name = 'DKDCNv2'
    dk_option_names = MMCVConvMixin.dk_option_names + ('deform_groups',)
    fixed_options = dict(modulated=True)
    offset_generator_names = ('kernel_offset_conv', 'data_offset_conv')
