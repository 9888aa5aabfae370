"""The fused local DK path as PyTorch ops: ``dk_ops::fused_deform_kernel_conv2d`` and its
backward, registered with ``torch.library.triton_op`` (so torch.compile traces into their
kernel launches), with autograd, tile configurations autotuned on the GPU at hand, and
argument checks.

The kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
import math
import os
import warnings
from typing import Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor

from dk_ops.fused import kernels

INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'

# Float64 stays on the columns path: Triton's float64 products do not use tensor cores.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPES = {torch.float32: triton.language.float32, torch.float16: triton.language.float16,
                 torch.bfloat16: triton.language.bfloat16}
# The most scope cells the fused path takes: a channel's Z rows, its cells padded to a power of
# two (S_PAD), must fit a tile of MAX_TILE_ROWS.
MAX_SCOPE_CELLS = 64


# The tile shapes the autotuner tries on a GPU: (BLOCK_L locations, BLOCK_O output channels,
# BLOCK_C input channels, warps, pipeline stages). A Z tile has BLOCK_C * S_PAD rows, at least
# 16 (tl.dot's smallest K) since S_PAD >= 16. tools/analysis_tools/triton_resources.py compiles
# every one for sm_90 and fails on spills (128 x 128 tiles spill in the float32 weight gradient).
TUNING_TILES = [(64, 64, 2, 4, 2), (64, 64, 4, 4, 2), (64, 64, 1, 4, 3), (128, 64, 2, 8, 2),
                (128, 64, 4, 8, 2), (64, 128, 2, 8, 2)]
TUNING_CONFIGS = [triton.Config(dict(BLOCK_L=block_l, BLOCK_O=block_o, BLOCK_C=block_c),
                                num_warps=warps, num_stages=stages)
                  for block_l, block_o, block_c, warps, stages in TUNING_TILES]
# The interpreter's one tile: autotuning there would only time numpy.
INTERPRETER_TILE = dict(BLOCK_L=64, BLOCK_O=16, BLOCK_C=4)
# At most this many Z rows in a tile (BLOCK_C * S_PAD), for register pressure.
MAX_TILE_ROWS = 128


def _keep_fitting_tiles(configs, named_args, **constants):
    fitting = [config for config in configs
               if config.kwargs['BLOCK_C'] * constants['S_PAD'] <= MAX_TILE_ROWS]
    return fitting or [min(configs, key=lambda config: config.kwargs['BLOCK_C'])]


_TUNING_KEY = ['group_channels', 'group_out_channels', 'locations', 'taps', 'S_PAD']


def _tuned(kernel, reset_to_zero=None):
    if INTERPRETED:
        return kernel
    return triton.autotune(configs=TUNING_CONFIGS, key=_TUNING_KEY, reset_to_zero=reset_to_zero,
                           prune_configs_by={'early_config_prune': _keep_fitting_tiles})(kernel)


_forward_kernel = _tuned(kernels.forward_kernel)
_weight_grad_kernel = _tuned(kernels.weight_grad_kernel)
_sampling_grad_kernel = _tuned(kernels.sampling_grad_kernel,
                               reset_to_zero=['grad_input', 'grad_kernel_offset',
                                              'grad_data_offset', 'grad_mask'])


def tile_count(size: int, tile: int) -> int:
    """Tiles of ``tile`` that cover ``size``, the last one partly."""
    return triton.cdiv(size, tile)


def _tile_grid(*axes):
    """A grid function of the tile sizes: each axis is a count, a (size, tile parameter) pair
    or a function of the tile sizes."""
    def grid(meta):
        return tuple(axis(meta) if callable(axis) else
                     tile_count(axis[0], meta[axis[1]]) if isinstance(axis, tuple) else axis
                     for axis in axes)
    return grid


def dot_precision(dtype: torch.dtype) -> str:
    """TF32 products for float32 where cuDNN convolutions use them: DK replaces a
    convolution, so it follows ``torch.backends.cudnn.allow_tf32``."""
    return 'tf32' if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else 'ieee'


def _launch(kernel, grid, *args, **constants):
    """``kernel`` on ``grid``, autotuned on a GPU, with the interpreter's fixed tile under
    TRITON_INTERPRET=1."""
    wrapped = torch.library.wrap_triton(kernel)
    if INTERPRETED:
        constants.update(INTERPRETER_TILE)
    wrapped[grid](*args, **constants)


class _Geometry:
    """The sizes every kernel takes, from the tensors and the op's arguments."""

    def __init__(self, input, weight, kernel_size, stride, padding, dilation, groups,
                 kernel_offset_groups, deform_groups):
        self.batch, self.in_channels, self.height, self.width = input.shape
        self.out_channels, self.group_channels, self.scope_h, self.scope_w = weight.shape
        kernel_h, kernel_w = kernel_size
        self.out_h, self.out_w = (
            (size + 2 * pad - dil * (kernel - 1) - 1) // step + 1
            for size, kernel, step, pad, dil in zip((self.height, self.width), kernel_size,
                                                    stride, padding, dilation))
        self.locations = self.out_h * self.out_w
        self.group_out_channels = self.out_channels // groups
        kernel_group_channels = self.in_channels // kernel_offset_groups
        deform_group_channels = self.in_channels // deform_groups
        # 1 without input channels, where no kernel runs.
        self.segment_channels = math.gcd(self.group_channels, kernel_group_channels,
                                         deform_group_channels) or 1
        self.s_pad = max(16, triton.next_power_of_2(self.scope_h * self.scope_w))
        # Every kernel takes these three runs of sizes, in this order.
        self.image = (self.in_channels, self.height, self.width, self.out_w, self.locations)
        self.grouping = (groups, self.group_channels, self.group_out_channels,
                         self.segment_channels)
        self.sampling = (kernel_group_channels, deform_group_channels, kernel_h * kernel_w,
                         kernel_offset_groups, deform_groups, kernel_w, *stride, *padding,
                         *dilation, (self.scope_h - kernel_h) / 2, (self.scope_w - kernel_w) / 2,
                         self.scope_h, self.scope_w)

    def channel_blocks(self, meta) -> int:
        """Channel blocks of a group: every segment's channels in blocks of BLOCK_C."""
        return (self.group_channels // self.segment_channels) * tile_count(
            self.segment_channels, meta['BLOCK_C'])

    def weight_grad_parts(self) -> int:
        """Ranges of (image, location) pairs whose weight gradients are summed apart, so that
        the blocks fill a GPU where output channels and Z rows make few tiles; capped so that
        the float32 parts take at most 64 MiB."""
        per_part = 32 if INTERPRETED else 2048
        part_bytes = 4 * self.out_channels * self.group_channels * self.scope_h * self.scope_w
        return max(1, min(self.batch * self.locations // per_part,
                          (64 << 20) // max(part_bytes, 1)))


def _flags(data_offset, mask, dtype):
    return dict(HAS_DATA_OFFSET=data_offset is not None, HAS_MASK=mask is not None,
                DTYPE=TRITON_DTYPES[dtype], DOT_IN_FLOAT32=INTERPRETED,
                DOT_PRECISION=dot_precision(dtype))


def _float32(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return None if tensor is None else tensor.float().contiguous()


@torch.library.triton_op('dk_ops::fused_deform_kernel_conv2d', mutates_args=())
def fused_forward(input: Tensor, weight: Tensor, kernel_offset: Tensor,
                  data_offset: Optional[Tensor], mask: Optional[Tensor], bias: Optional[Tensor],
                  kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, kernel_offset_groups: int,
                  deform_groups: int) -> Tensor:
    geometry = _Geometry(input, weight, kernel_size, stride, padding, dilation, groups,
                         kernel_offset_groups, deform_groups)
    output = input.new_zeros((geometry.batch, geometry.out_channels, geometry.out_h,
                              geometry.out_w))
    if output.numel() == 0 or geometry.in_channels == 0:
        return output if bias is None else output + bias[None, :, None, None]
    grid = _tile_grid((geometry.locations, 'BLOCK_L'), (geometry.group_out_channels, 'BLOCK_O'),
                      geometry.batch * groups)
    _launch(_forward_kernel, grid, input.contiguous(), weight.contiguous(),
            _float32(kernel_offset), _float32(data_offset), _float32(mask),
            None if bias is None else bias.contiguous(), output, *geometry.image,
            *geometry.grouping, *geometry.sampling, HAS_BIAS=bias is not None,
            S_PAD=geometry.s_pad, **_flags(data_offset, mask, input.dtype))
    return output


@torch.library.triton_op('dk_ops::fused_deform_kernel_conv2d_backward', mutates_args=())
def fused_backward(grad_output: Tensor, input: Tensor, weight: Tensor, kernel_offset: Tensor,
                   data_offset: Optional[Tensor], mask: Optional[Tensor],
                   kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int, kernel_offset_groups: int,
                   deform_groups: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of input, weight, kernel_offset, data_offset and mask (empty where the
    op has no such argument), in the arguments' dtype."""
    geometry = _Geometry(input, weight, kernel_size, stride, padding, dilation, groups,
                         kernel_offset_groups, deform_groups)
    float32_zeros = [torch.zeros(t.shape, dtype=torch.float32, device=input.device)
                     for t in (input, kernel_offset)]
    grad_input, grad_kernel_offset = float32_zeros
    grad_data_offset, grad_mask = (
        input.new_zeros((0, ), dtype=torch.float32) if t is None else
        torch.zeros(t.shape, dtype=torch.float32, device=input.device) for t in (data_offset, mask))
    parts = geometry.weight_grad_parts()
    grad_weight_parts = torch.zeros((parts, *weight.shape), dtype=torch.float32,
                                    device=input.device)
    if grad_output.numel() > 0 and geometry.in_channels > 0:
        tensors = (input.contiguous(), _float32(kernel_offset), _float32(data_offset),
                   _float32(mask))
        grad_output = grad_output.contiguous()
        flags = dict(S_PAD=geometry.s_pad, **_flags(data_offset, mask, input.dtype))
        _launch(_weight_grad_kernel,
                _tile_grid((geometry.group_out_channels, 'BLOCK_O'),
                           geometry.channel_blocks, parts * groups),
                grad_output, *tensors, grad_weight_parts, geometry.batch, *geometry.image,
                *geometry.grouping, *geometry.sampling, **flags)
        _launch(_sampling_grad_kernel,
                _tile_grid((geometry.locations, 'BLOCK_L'), geometry.channel_blocks,
                           geometry.batch * groups),
                grad_output, tensors[0], weight.contiguous(), *tensors[1:], grad_input,
                grad_kernel_offset, grad_data_offset, grad_mask, *geometry.image,
                *geometry.grouping, *geometry.sampling, **flags)
    dtype = input.dtype
    return (grad_input.to(dtype), grad_weight_parts.sum(0).to(dtype),
            grad_kernel_offset.to(dtype), grad_data_offset.to(dtype), grad_mask.to(dtype))


def _setup_context(ctx, inputs, output):
    input, weight, kernel_offset, data_offset, mask, bias, *geometry = inputs
    ctx.save_for_backward(input, weight, kernel_offset, data_offset, mask)
    ctx.geometry = geometry
    ctx.has_bias = bias is not None


def _alert_atomics():
    """PyTorch's deterministic mode refuses the backward (or warns, with warn_only): its
    gradients of the input, offsets and mask are added with atomics, in no fixed order."""
    if torch.are_deterministic_algorithms_enabled():
        message = ('deform_kernel_conv2d (fused): the backward adds the input, offset and mask '
                   'gradients with atomics and is not deterministic')
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message)


def _backward_formula(ctx, grad_output):
    _alert_atomics()
    input, weight, kernel_offset, data_offset, mask = ctx.saved_tensors
    grads = fused_backward(grad_output, input, weight, kernel_offset, data_offset, mask,
                           *ctx.geometry)
    grad_input, grad_weight, grad_kernel_offset, grad_data_offset, grad_mask = (
        g if present else None
        for g, present in zip(grads, (True, True, True, data_offset is not None,
                                      mask is not None)))
    grad_bias = grad_output.sum((0, 2, 3)) if ctx.has_bias else None
    return (grad_input, grad_weight, grad_kernel_offset, grad_data_offset, grad_mask,
            grad_bias) + (None, ) * len(ctx.geometry)


fused_forward.register_autograd(_backward_formula, setup_context=_setup_context)
