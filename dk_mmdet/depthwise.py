"""Deformable Kernels in a backbone's depthwise convs only, through one ``conv_cfg`` line.

Depthwise backbones pass ``conv_cfg`` to every conv they build through it: mmdet's CSPNeXt
(RTMDet) to its 1x1 convs, its strided 3x3 convs and the 5x5 depthwise conv of every CSPNeXt
block; MobileNetV2 to the 1x1 expand and project convs and the 3x3 depthwise conv of every
inverted residual. The layer types here, registered in mmengine's root ``MODELS`` like
:mod:`dk_mmdet.layers`, build a DK layer where the conv is depthwise (``groups ==
in_channels == out_channels``) with a kernel larger than 1, and a plain ``nn.Conv2d``
everywhere else:

- ``DKDepthwise``: local DK (:class:`dk_mmdet.layers.DKConv2d`; options ``scope_size``,
  ``kernel_offset_groups``);
- ``DKGlobalDepthwise``: global DK (:class:`dk_mmdet.layers.DKGlobalConv2d`);
- ``DKDCNDepthwise``: local DK plus DCN data offsets (:class:`dk_mmdet.layers.DKDCNConv2d`;
  adds ``deform_groups``).

The DK layers load rigid checkpoints as the other DK layers do (the rigid depthwise kernel
becomes the scope whose zero-offset taps reproduce it) and start as the rigid conv would.
A rigid conv built through ``conv_cfg`` sits in an mmcv ``ConvModule``, which Kaiming-initialises
its conv right after building it (normal, fan_out, ReLU gain), but only a conv without an
``init_weights`` of its own, which DK layers have (it re-zeroes their offset generators). So
these DK layers draw that Kaiming init into their zero-offset kernel themselves, as the last
step of their construction: built with the seed of the rigid network, the DK network draws the
same random numbers and holds the same kernels. ``ConvModule`` uses a LeakyReLU's slope in that
gain, which the layer cannot see: with a LeakyReLU activation the DK kernels start at the ReLU
gain instead (the same random numbers, sqrt(1 + slope^2) times larger), until an ``init_cfg``
draws them again.
"""
from mmengine.model import kaiming_init
from mmengine.registry import MODELS
from torch import nn
from torch.nn.modules.utils import _pair

from dk_mmdet.layers import DKConv2d, DKDCNConv2d, DKGlobalConv2d


class ConvModuleKaimingStart:
    """Ends construction with the Kaiming init that ConvModule gives a conv it has just built.

    Listed before a DK layer class; the init goes through the layer's rigid-kernel face
    (:mod:`dk_mmdet.rigid_init`), so it draws exactly what it draws for the rigid conv.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kaiming_init(self.rigid_kernel_init, mode='fan_out', nonlinearity='relu')


class DepthwiseDKConv2d(ConvModuleKaimingStart, DKConv2d):
    """The depthwise convs of ``conv_cfg=dict(type='DKDepthwise')``: local DK."""

    config_name = 'DKDepthwise'


class DepthwiseDKGlobalConv2d(ConvModuleKaimingStart, DKGlobalConv2d):
    """The depthwise convs of ``conv_cfg=dict(type='DKGlobalDepthwise')``: global DK."""

    config_name = 'DKGlobalDepthwise'


class DepthwiseDKDCNConv2d(ConvModuleKaimingStart, DKDCNConv2d):
    """The depthwise convs of ``conv_cfg=dict(type='DKDCNDepthwise')``: DK + DCN."""

    config_name = 'DKDCNDepthwise'


def is_depthwise_with_spatial_kernel(in_channels, out_channels, kernel_size, groups) -> bool:
    """Whether a conv is depthwise (one filter per channel) with a kernel larger than 1x1."""
    return groups == in_channels == out_channels and max(_pair(kernel_size)) > 1


def _depthwise_only(dk_class):
    """A conv_cfg builder: ``dk_class`` for depthwise convs, nn.Conv2d for all others."""

    def build(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
              groups=1, bias=True, **dk_options):
        if is_depthwise_with_spatial_kernel(in_channels, out_channels, kernel_size, groups):
            return dk_class(in_channels, out_channels, kernel_size, stride=stride,
                            padding=padding, dilation=dilation, groups=groups, bias=bias,
                            **dk_options)
        # The DK options configure the depthwise layers; a misspelt one fails at any conv.
        dk_class.check_options(dk_options)
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)

    build.__name__ = dk_class.config_name
    build.__doc__ = f'``conv_cfg`` type {dk_class.config_name!r}: {dk_class.__doc__}'
    MODELS.register_module(name=dk_class.config_name, module=build)
    return build


build_dk_depthwise = _depthwise_only(DepthwiseDKConv2d)
build_dk_global_depthwise = _depthwise_only(DepthwiseDKGlobalConv2d)
build_dk_dcn_depthwise = _depthwise_only(DepthwiseDKDCNConv2d)
