"""A slow, obvious float64 reference of ``dk_ops.deform_kernel_conv2d``, the random
problems the op tests run on (``problems_named`` picks some), and the mmcv oracle for the
deformable-convolution ones.

The reference follows the operator's formula term by term:

    out[n,o,y,x] = bias[o] + sum_{c in group(o)} sum_{i<K_h, j<K_w} m * X(n,c,p) * W(o,c,q)
    p = (y*stride_h - pad_h + i*dil_h + dy_data,  x*stride_w - pad_w + j*dil_w + dx_data)
    q = (i + (S_h - K_h)/2 + dy_kernel,           j + (S_w - K_w)/2 + dx_kernel)

with X and W bilinear samples of the input plane and of the scope plane, pixels outside
a plane counting as zero. It is plain differentiable torch code (no dk_ops, no
grid_sample), so autograd through it gives the reference gradients. It expects finite
offsets.
"""
import dataclasses
from typing import Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor
from torch.nn.modules.utils import _pair


def bilinear_zero_padded(planes: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bilinear samples of ``planes`` (..., H, W) at real coordinates ``rows``/``cols`` (..., L).

    The leading dimensions of ``planes`` broadcast against those of the coordinates;
    pixels outside the plane count as zero.
    """
    height, width = planes.shape[-2:]
    flat = planes.flatten(-2).expand(*rows.shape[:-1], height * width)
    top, left = torch.floor(rows), torch.floor(cols)
    samples = torch.zeros_like(rows)
    for row in (top, top + 1):
        for col in (left, left + 1):
            # Each corner weighs 1 - distance along each axis.
            corner_weight = (1 - (rows - row).abs()) * (1 - (cols - col).abs())
            inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
            index = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long()
            value = torch.gather(flat, -1, index)
            samples = samples + torch.where(inside, corner_weight * value, 0)
    return samples


def deform_kernel_conv2d_reference(input: Tensor,
                                   weight: Tensor,
                                   kernel_offset: Tensor,
                                   bias: Optional[Tensor] = None,
                                   *,
                                   kernel_size,
                                   stride=1,
                                   padding=0,
                                   dilation=1,
                                   groups: int = 1,
                                   kernel_offset_groups: int = 1,
                                   data_offset: Optional[Tensor] = None,
                                   mask: Optional[Tensor] = None,
                                   deform_groups: int = 1) -> Tensor:
    """Same arguments and result as ``dk_ops.deform_kernel_conv2d``, computed in float64."""
    kernel_h, kernel_w = _pair(kernel_size)
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dilation_h, dilation_w = _pair(dilation)
    input, weight, kernel_offset = input.double(), weight.double(), kernel_offset.double()
    batch, in_channels, height, width = input.shape
    out_channels, group_in_channels, scope_h, scope_w = weight.shape
    out_h = (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    positions = out_h * out_w
    taps = kernel_h * kernel_w

    if kernel_offset.dim() == 2:  # global DK: the same offsets at every output location
        kernel_offset = kernel_offset[:, :, None, None].expand(-1, -1, out_h, out_w)
    kernel_offset = kernel_offset.reshape(batch, kernel_offset_groups, taps, 2, positions)
    if data_offset is None:
        data_offset = input.new_zeros(batch, 2 * deform_groups * taps, out_h, out_w)
    data_offset = data_offset.double().reshape(batch, deform_groups, taps, 2, positions)
    if mask is None:
        mask = input.new_ones(batch, deform_groups * taps, out_h, out_w)
    mask = mask.double().reshape(batch, deform_groups, taps, positions)

    # Offset block of every input channel (contiguous blocks of channels share offsets).
    channel = torch.arange(in_channels)
    kernel_block = channel // (in_channels // kernel_offset_groups)
    data_block = channel // (in_channels // deform_groups)
    # input_channel[o, c]: the input channel that scope plane weight[o, c] multiplies.
    group_of_output = torch.arange(out_channels) // (out_channels // groups)
    input_channel = group_of_output[:, None] * group_in_channels + torch.arange(group_in_channels)

    out_y = torch.arange(out_h, dtype=torch.float64).repeat_interleave(out_w)
    out_x = torch.arange(out_w, dtype=torch.float64).repeat(out_h)
    output = input.new_zeros(batch, out_channels, positions)
    for i in range(kernel_h):
        for j in range(kernel_w):
            tap = i * kernel_w + j
            # Data sampling point of this tap for every (n, input channel, location).
            p_y = out_y * stride_h - pad_h + i * dilation_h + data_offset[:, data_block, tap, 0]
            p_x = out_x * stride_w - pad_w + j * dilation_w + data_offset[:, data_block, tap, 1]
            data = bilinear_zero_padded(input, p_y, p_x) * mask[:, data_block, tap]
            # Scope sampling point for every (n, output channel, its input channel, location).
            block = kernel_block[input_channel]
            q_y = i + (scope_h - kernel_h) / 2 + kernel_offset[:, block, tap, 0]
            q_x = j + (scope_w - kernel_w) / 2 + kernel_offset[:, block, tap, 1]
            kernel = bilinear_zero_padded(weight, q_y, q_x)
            output = output + (data[:, input_channel] * kernel).sum(2)
    if bias is not None:
        output = output + bias.double()[None, :, None]
    return output.reshape(batch, out_channels, out_h, out_w)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The geometry of one op call; ``make_inputs`` draws random tensors for it."""
    name: str
    batch: int = 2
    in_channels: int = 4
    out_channels: int = 4
    input_size: Tuple[int, int] = (7, 6)
    kernel_size: Tuple[int, int] = (3, 3)
    scope_size: Tuple[int, int] = (4, 4)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    kernel_offset_groups: int = 1
    deform_groups: int = 1
    global_offset: bool = False
    data_offset: bool = False
    mask: bool = False
    bias: bool = True
    # Kernel offsets are drawn in (-r, r): with r > 0.5 some taps leave the scope partly.
    kernel_offset_range: float = 1.2
    data_offset_range: float = 2.0

    @property
    def taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def output_size(self) -> Tuple[int, int]:
        return tuple((size + 2 * pad - dil * (k - 1) - 1) // stride + 1
                     for size, k, stride, pad, dil in zip(self.input_size, self.kernel_size,
                                                          self.stride, self.padding,
                                                          self.dilation))

    def geometry(self) -> Dict:
        """The keyword arguments of the op besides the tensors."""
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups,
                    kernel_offset_groups=self.kernel_offset_groups,
                    deform_groups=self.deform_groups)

    def make_inputs(self, dtype=torch.float64, seed: int = 0) -> Dict[str, Optional[Tensor]]:
        """Random tensors for every argument (None for the unused optional ones).

        Offsets are continuous random numbers, so no sampling point sits on the integer
        kinks of bilinear interpolation (which would upset finite differences).
        """
        generator = torch.Generator().manual_seed(seed)

        def uniform(shape, bound):
            return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

        def normal(shape):
            return torch.randn(shape, generator=generator, dtype=torch.float64)

        out_h, out_w = self.output_size
        kernel_offset_channels = 2 * self.kernel_offset_groups * self.taps
        kernel_offset_shape = ((self.batch, kernel_offset_channels) if self.global_offset else
                               (self.batch, kernel_offset_channels, out_h, out_w))
        tensors = dict(
            input=normal((self.batch, self.in_channels, *self.input_size)),
            weight=normal((self.out_channels, self.in_channels // self.groups,
                           *self.scope_size)),
            kernel_offset=uniform(kernel_offset_shape, self.kernel_offset_range),
            bias=normal((self.out_channels, )) if self.bias else None,
            data_offset=(uniform((self.batch, 2 * self.deform_groups * self.taps, out_h,
                                  out_w), self.data_offset_range) if self.data_offset else None),
            mask=(torch.rand((self.batch, self.deform_groups * self.taps, out_h, out_w),
                             generator=generator, dtype=torch.float64) if self.mask else None),
        )
        return {name: None if t is None else t.to(dtype) for name, t in tensors.items()}

    def call(self, function, tensors: Dict[str, Optional[Tensor]]) -> Tensor:
        """``function`` (the op or the reference) applied to ``tensors`` with this geometry."""
        return function(tensors['input'], tensors['weight'], tensors['kernel_offset'],
                        tensors['bias'], data_offset=tensors['data_offset'],
                        mask=tensors['mask'], **self.geometry())


# The shapes every op test runs over; each feature of the op appears at least once.
PROBLEMS = [
    Problem('k3_scope4_local'),
    Problem('k3_scope3', scope_size=(3, 3)),
    Problem('k3_scope5', scope_size=(5, 5), input_size=(6, 8), out_channels=3),
    Problem('k3x2_scope5x4_stride2x1_dil1x2', kernel_size=(3, 2), scope_size=(5, 4),
            input_size=(7, 9), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    Problem('stride2_dilation2_pad2', stride=(2, 2), padding=(2, 2), dilation=(2, 2),
            input_size=(9, 8)),
    Problem('groups2_kgroups2', out_channels=6, groups=2, kernel_offset_groups=2),
    Problem('groups2_kgroups4', groups=2, kernel_offset_groups=4, bias=False),
    Problem('depthwise', groups=4, kernel_offset_groups=4, data_offset=True, mask=True,
            deform_groups=2),
    Problem('k1_scope2', kernel_size=(1, 1), scope_size=(2, 2), padding=(0, 0)),
    Problem('data_offset', data_offset=True, bias=False),
    Problem('mask_only', mask=True),
    Problem('data_offset_mask_dgroups2_groups2', data_offset=True, mask=True, deform_groups=2,
            groups=2, kernel_offset_groups=2, out_channels=6),
    Problem('global', global_offset=True),
    Problem('global_scope5_groups2_kgroups2', global_offset=True, scope_size=(5, 5), groups=2,
            kernel_offset_groups=2),
    Problem('global_kgroups2', global_offset=True, kernel_offset_groups=2),
    Problem('global_groups2_kgroups4', global_offset=True, groups=2, kernel_offset_groups=4,
            out_channels=6),
    Problem('global_depthwise_kgroups2', global_offset=True, groups=4, kernel_offset_groups=2),
    Problem('global_k3x2_stride2', global_offset=True, kernel_size=(3, 2), scope_size=(4, 4),
            stride=(2, 2), input_size=(8, 7)),
    Problem('global_data_offset_mask_dgroups2', global_offset=True, data_offset=True,
            mask=True, deform_groups=2, stride=(2, 1)),
]

# Deformable convolutions (scope = kernel, zero kernel offsets, random data offsets), where
# mmcv's deform_conv2d (no mask, no bias) and modulated_deform_conv2d are oracles.
DCN_PROBLEMS = [
    Problem('dcn_k3', scope_size=(3, 3), kernel_offset_range=0, data_offset=True, bias=False),
    Problem('dcn_k3x2_stride2x1_dil2_groups2_dgroups2', kernel_size=(3, 2), scope_size=(3, 2),
            input_size=(9, 8), stride=(2, 1), padding=(2, 1), dilation=(2, 2), groups=2,
            deform_groups=2, out_channels=6, kernel_offset_range=0, data_offset=True,
            bias=False),
    Problem('modulated_dcn_k3', scope_size=(3, 3), kernel_offset_range=0, data_offset=True,
            mask=True),
    Problem('modulated_dcn_k3x2_stride2x1_dil2_groups2_dgroups2', kernel_size=(3, 2),
            scope_size=(3, 2), input_size=(9, 8), stride=(2, 1), padding=(2, 1),
            dilation=(2, 2), groups=2, deform_groups=2, out_channels=6, kernel_offset_range=0,
            data_offset=True, mask=True),
]


# Shapes for the CUDA work split that the CPU matrix (4 channels) does not reach: offset
# groups of more channels than a warp has lanes (and not a multiple of 32), kernel and
# deform group blocks that cut each other, scopes of more than 16 cells (two passes of the
# scope-column kernel), padded strided grids where some taps read no pixel, and the global
# path's chunks of scope entries.
CUDA_PROBLEMS = [
    Problem('wide_k3_scope4', batch=3, in_channels=72, out_channels=40, input_size=(13, 11)),
    Problem('wide_scope5_groups2_kgroups2_dgroups3_dcn_mask', in_channels=66, out_channels=8,
            scope_size=(5, 5), input_size=(10, 9), groups=2, kernel_offset_groups=2,
            deform_groups=3, data_offset=True, mask=True),
    Problem('wide_kgroups3_dgroups2_dcn', in_channels=36, out_channels=12, kernel_offset_groups=3,
            deform_groups=2, data_offset=True),
    Problem('wide_k3x2_scope6x5_stride2_dil2_mask', in_channels=48, out_channels=16,
            kernel_size=(3, 2), scope_size=(6, 5), input_size=(12, 9), stride=(2, 2),
            padding=(2, 1), dilation=(2, 2), mask=True),
    Problem('wide_k1_scope3_pad2_stride3', in_channels=40, out_channels=24, kernel_size=(1, 1),
            scope_size=(3, 3), input_size=(11, 10), stride=(3, 3), padding=(2, 2)),
    Problem('wide_global_dcn_mask', in_channels=40, out_channels=24, global_offset=True,
            data_offset=True, mask=True),
    # The global path's kernels: kernel offset groups that span conv groups, of more scope
    # entries (18 channels x 16 outputs) than one warp of the offset gradient sums (256), and
    # 25 scope cells (two passes of the weight gradient).
    Problem('wide_global_scope5_groups3_kgroups2', in_channels=36, out_channels=48,
            scope_size=(5, 5), groups=3, kernel_offset_groups=2, global_offset=True),
]


def problems_named(*names):
    """The problems of ``PROBLEMS`` and ``CUDA_PROBLEMS`` with these names, in that order; a name
    that is in neither raises, so that a renamed problem cannot drop out of a test unseen."""
    unknown = set(names) - {problem.name for problem in PROBLEMS + CUDA_PROBLEMS}
    if unknown:
        raise ValueError(f'no problems named {sorted(unknown)}')
    return [problem for problem in PROBLEMS + CUDA_PROBLEMS if problem.name in names]


# Problems whose columns split into chunks inside image rows and images (batch 3).
CHUNK_BOUNDARY_PROBLEMS = [
    dataclasses.replace(problem, batch=3)
    for problem in problems_named('k3x2_scope5x4_stride2x1_dil1x2', 'stride2_dilation2_pad2',
                                  'groups2_kgroups2', 'mask_only',
                                  'data_offset_mask_dgroups2_groups2',
                                  'global_data_offset_mask_dgroups2')
]

# Problems for half and bfloat16, on CUDA and on the emulated CUDA kernels.
REDUCED_PRECISION_PROBLEMS = problems_named(
    'k3_scope4_local', 'global', 'data_offset_mask_dgroups2_groups2',
    'global_data_offset_mask_dgroups2', 'wide_k3_scope4',
    'wide_scope5_groups2_kgroups2_dgroups3_dcn_mask')


def by_name(problems):
    """Parametrizes a test over ``problems``, naming each case after its problem."""
    return pytest.mark.parametrize('problem', problems, ids=lambda problem: problem.name)


def mmcv_deformable_conv(input: Tensor,
                         weight: Tensor,
                         kernel_offset: Tensor,
                         bias: Optional[Tensor] = None,
                         *,
                         kernel_size,
                         stride,
                         padding,
                         dilation,
                         groups: int,
                         kernel_offset_groups: int,
                         data_offset: Tensor,
                         mask: Optional[Tensor],
                         deform_groups: int) -> Tensor:
    """mmcv's DCN (no mask) or DCNv2 (with mask), called with the op's arguments.

    It is the op's oracle when the scope equals the kernel and the kernel offsets are
    zero, as in ``DCN_PROBLEMS``; ``kernel_offset`` is only checked to be zero.
    """
    import mmcv.ops as mmcv_ops  # here, so the other op tests also run where mmcv is not installed

    assert tuple(weight.shape[2:]) == tuple(kernel_size) and not kernel_offset.any()
    geometry = (stride, padding, dilation, groups, deform_groups)
    if mask is None:
        assert bias is None, "mmcv's deform_conv2d has no bias"
        return mmcv_ops.deform_conv2d(input, data_offset, weight, *geometry)
    return mmcv_ops.modulated_deform_conv2d(input, data_offset, mask, weight, bias, *geometry)


def output_and_gradients(problem: Problem, function, tensors: Dict[str, Optional[Tensor]],
                         view=lambda name, tensor: tensor, wrt=None):
    """``function``'s output and the gradients of its tensor arguments (those named in
    ``wrt``, all by default; None where ``function`` gives no gradient).

    The gradients are those of ``(output * grad_output).sum()`` for a fixed random
    ``grad_output``. ``view(name, tensor)`` may turn each leaf into a differentiable view
    (a non-contiguous layout, a broadcast) before the call; it also sees ``grad_output``.
    """
    wrt = [name for name, t in tensors.items() if t is not None] if wrt is None else wrt
    leaves = {name: None if t is None else t.detach().clone().requires_grad_(name in wrt)
              for name, t in tensors.items()}
    output = problem.call(function, {name: None if leaf is None else view(name, leaf)
                                     for name, leaf in leaves.items()})
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    output.backward(view('grad_output', grad_output.to(output.dtype)))
    gradients = {name: leaves[name].grad for name in wrt}
    return output.detach(), gradients


def non_contiguous(name, tensor):
    """The same values in a non-contiguous layout (channels-last, transposed or strided)."""
    if name in ('input', 'weight'):
        result = tensor.contiguous(memory_format=torch.channels_last)
    elif name == 'mask' or tensor.dim() == 2:
        result = tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        # Every other element of a larger buffer, the gaps filled with nan: reading the
        # wrong memory would show.
        result = torch.stack([tensor, torch.full_like(tensor, float('nan'))], -1)[..., 0]
    assert not result.is_contiguous()
    return result
