"""nn.Modules around :func:`dk_ops.deform_kernel_conv2d`.

Every offset generator starts at zero, so a freshly built layer is the rigid
convolution of its zero-offset kernel (taps at the centre of the scope); a modulated
DeformKernelConv2d, like DCNv2, starts with its mask at sigmoid(0) = 0.5. That kernel is drawn
as nn.Conv2d draws its weight, with the same random numbers, so a layer built with the seed of
an nn.Conv2d of the same geometry computes the same function (up to float rounding).
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from dk_ops.ops import deform_kernel_conv2d
from dk_ops.weight_mapping import rigid_to_scope


def _default_scope(kernel_size: Tuple[int, int]) -> Tuple[int, int]:
    # The paper's setting: a 3x3 kernel sampled from a 4x4 scope, kernel + 1 in general. Along
    # an axis of kernel size 1, though, a 2-cell scope puts the tap midway between two cells
    # that the rigid kernel maps to equal values: the offset gradient (their difference) and
    # the cells' different gradients are zero, so the layer never leaves its start. 3 cells put
    # the tap on the middle one, with zero neighbours.
    return tuple(size + 1 if size > 1 else 3 for size in kernel_size)


def _check_positive(name: str, value: int):
    if value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')


class _DeformKernelBase(nn.Module):
    """Holds the scope ``weight`` (C_out, C_in/groups, S_h, S_w), the bias and the geometry."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, scope_size=None,
                 kernel_offset_groups: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.kernel_offset_groups = kernel_offset_groups
        self.scope_size = _pair(scope_size) if scope_size is not None else _default_scope(
            self.kernel_size)
        # nn.Conv2d attributes that mmcv's ConvModule and friends read.
        self.transposed = False
        self.output_padding = (0, 0)
        self._check_geometry()
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.scope_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def _check_geometry(self):
        # A layer needs channels (its offset generators, convolutions too, would see none) and
        # group counts of at least one.
        for name, value in (('in_channels', self.in_channels), ('out_channels', self.out_channels),
                            ('groups', self.groups),
                            ('kernel_offset_groups', self.kernel_offset_groups)):
            _check_positive(name, value)
        for name, channels in (('in_channels', self.in_channels), ('out_channels',
                                                                   self.out_channels)):
            if channels % self.groups:
                raise ValueError(f'{name}={channels} must be divisible by groups={self.groups}')
        if self.in_channels % self.kernel_offset_groups:
            raise ValueError(f'in_channels={self.in_channels} must be divisible by '
                             f'kernel_offset_groups={self.kernel_offset_groups}')
        if any(s < k for s, k in zip(self.scope_size, self.kernel_size)):
            raise ValueError(f'scope_size={self.scope_size} must be at least '
                             f'kernel_size={self.kernel_size} in each dimension')

    def reset_parameters(self):
        # The rigid conv's init, mapped into the scope: a kernel drawn exactly as nn.Conv2d
        # draws its weight (kaiming_uniform with a=sqrt(5), then the bias), same shape, same
        # random numbers, becomes the minimum-norm scope whose zero-offset taps reproduce it.
        # A DK network built with the seed of its rigid twin is then the same function, and
        # every later layer draws the same numbers as the twin's.
        rigid = torch.empty(self.rigid_kernel_shape(), dtype=self.weight.dtype,
                            device=self.weight.device)
        nn.init.kaiming_uniform_(rigid, a=math.sqrt(5))
        with torch.no_grad():
            self.weight.copy_(rigid_to_scope(rigid, self.scope_size))
        if self.bias is not None:
            bound = 1 / math.sqrt(rigid[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def rigid_kernel_shape(self) -> Tuple[int, int, int, int]:
        """Shape of the rigid kernel the layer replaces, (C_out, C_in/groups, K_h, K_w)."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _offset_channels(self) -> int:
        return 2 * self.kernel_offset_groups * self.kernel_size[0] * self.kernel_size[1]

    def _conv(self, x: Tensor, kernel_offset: Tensor, **deform) -> Tensor:
        return deform_kernel_conv2d(x, self.weight, kernel_offset, self.bias,
                                    kernel_size=self.kernel_size, stride=self.stride,
                                    padding=self.padding, dilation=self.dilation,
                                    groups=self.groups,
                                    kernel_offset_groups=self.kernel_offset_groups, **deform)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'scope_size={self.scope_size}, stride={self.stride}, padding={self.padding}, '
                f'dilation={self.dilation}, groups={self.groups}, '
                f'kernel_offset_groups={self.kernel_offset_groups}, bias={self.bias is not None}')


class _ZeroStartConv2d(nn.Conv2d):
    """nn.Conv2d whose weight and bias start at zero, drawing no random numbers."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class OffsetConv2d(_ZeroStartConv2d):
    """An offset generator: a conv with the main conv's geometry whose output starts at zero.

    Two levels below nn.Conv2d on purpose: mmengine's initialisers pick the modules an init_cfg
    such as ``dict(type='Kaiming', layer='Conv2d')`` applies to by class name and direct bases,
    and would otherwise redraw the offsets of every DK layer in a network.
    """

    def __init__(self, in_channels: int, out_channels: int, like: _DeformKernelBase):
        super().__init__(in_channels, out_channels, like.kernel_size, like.stride, like.padding,
                         like.dilation, bias=True)


class _ZeroStartLinear(nn.Linear):
    """nn.Linear whose weight and bias start at zero, drawing no random numbers."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class OffsetLinear(_ZeroStartLinear):
    """The global offset generator (starts at zero; named apart from Linear as OffsetConv2d)."""


class DeformKernel2d(_DeformKernelBase):
    """Local DK: per-location kernel offsets from a conv of the main conv's geometry."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel_offset_conv = OffsetConv2d(self.in_channels, self._offset_channels(), self)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.kernel_offset_conv(x))


class GlobalDeformKernel2d(_DeformKernelBase):
    """Global DK: one kernel per image from global average pooling and a linear layer.

    As in the paper's code the sampled coordinates are clamped to the scope.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel_offset_fc = OffsetLinear(self.in_channels, self._offset_channels())
        # Zero-offset coordinate of every (group, tap, axis) entry of the offset vector.
        rows = torch.arange(self.kernel_size[0]) + (self.scope_size[0] - self.kernel_size[0]) / 2
        cols = torch.arange(self.kernel_size[1]) + (self.scope_size[1] - self.kernel_size[1]) / 2
        grid = torch.stack(torch.meshgrid(rows, cols, indexing='ij'), -1).reshape(-1)
        self.register_buffer('tap_positions', grid.repeat(self.kernel_offset_groups),
                             persistent=False)
        limits = torch.tensor([self.scope_size[0] - 1, self.scope_size[1] - 1], dtype=torch.float)
        self.register_buffer('scope_limits', limits.repeat(grid.numel() // 2 *
                                                           self.kernel_offset_groups),
                             persistent=False)

    def kernel_offset(self, x: Tensor) -> Tensor:
        offset = self.kernel_offset_fc(x.mean((2, 3)))
        position = self.tap_positions.to(offset.dtype)
        limits = self.scope_limits.to(offset.dtype)
        return torch.minimum(torch.clamp(position + offset, min=0), limits) - position

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.kernel_offset(x))


class DeformKernelConv2d(_DeformKernelBase):
    """DK + DCN: learned kernel offsets and learned data offsets (DCNv2 mask if modulated).

    ``deform_groups`` splits the input channels for the data offsets as in mmcv's DCN. The
    mask is ``sigmoid`` of its generator, so it starts at 0.5 everywhere, as in DCNv2.
    """

    def __init__(self, *args, deform_groups: int = 1, modulated: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        _check_positive('deform_groups', deform_groups)
        if self.in_channels % deform_groups:
            raise ValueError(f'in_channels={self.in_channels} must be divisible by '
                             f'deform_groups={deform_groups}')
        self.deform_groups = deform_groups
        self.modulated = modulated
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.kernel_offset_conv = OffsetConv2d(self.in_channels, self._offset_channels(), self)
        self.data_offset_conv = OffsetConv2d(self.in_channels,
                                             (3 if modulated else 2) * deform_groups * taps, self)

    def forward(self, x: Tensor) -> Tensor:
        data_offset = self.data_offset_conv(x)
        mask: Optional[Tensor] = None
        if self.modulated:
            split = 2 * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
            data_offset, mask = data_offset[:, :split], data_offset[:, split:].sigmoid()
        return self._conv(x, self.kernel_offset_conv(x), data_offset=data_offset, mask=mask,
                          deform_groups=self.deform_groups)

    def extra_repr(self) -> str:
        return (super().extra_repr() +
                f', deform_groups={self.deform_groups}, modulated={self.modulated}')
