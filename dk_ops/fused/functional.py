"""``deform_kernel_conv2d`` on the fused kernels: the arguments of ``dk_ops.deform_kernel_conv2d``
checked, global offsets broadcast to every location, autocast applied as for ``conv2d``."""
from typing import Optional

import torch
from torch import Tensor

from dk_ops.fused.op import DTYPES, INTERPRETED, MAX_SCOPE_CELLS, fused_forward
from dk_ops.ops import IntOrPair, _pair


def _check(condition: bool, message: str, error=ValueError):
    if not condition:
        raise error(f'deform_kernel_conv2d (fused): {message}')


def _check_arguments(tensors, kernel_size, stride, padding, dilation, groups,
                     kernel_offset_groups, deform_groups):
    input, weight, kernel_offset = tensors['input'], tensors['weight'], tensors['kernel_offset']
    shapes = ', '.join(f'{name} {tuple(t.shape)}' for name, t in tensors.items() if t is not None)
    _check(input.dim() == 4 and weight.dim() == 4,
           f'input and weight must be 4-D, got {shapes}')
    devices = {t.device for t in tensors.values() if t is not None}
    wanted = 'cpu' if INTERPRETED else 'cuda'
    _check(len(devices) == 1 and next(iter(devices)).type == wanted,
           f'every tensor must be on one {wanted} device (the fused kernels run on CUDA, and '
           f'on the CPU under TRITON_INTERPRET=1), got {sorted(map(str, devices))}')
    dtypes = {t.dtype for t in tensors.values() if t is not None}
    _check(len(dtypes) == 1 and next(iter(dtypes)) in DTYPES,
           f'every tensor must have one dtype of {[str(d) for d in DTYPES]}, got '
           f'{sorted(map(str, dtypes))}', TypeError)
    _check(all(s >= 1 for s in stride) and all(d >= 1 for d in dilation) and
           all(p >= 0 for p in padding) and all(k >= 1 for k in kernel_size),
           f'kernel_size, stride and dilation must be >= 1 and padding >= 0, got '
           f'{kernel_size}, {stride}, {dilation}, {padding}')
    batch, in_channels, height, width = input.shape
    out_channels, group_channels, scope_h, scope_w = weight.shape
    _check(min(groups, kernel_offset_groups, deform_groups) >= 1 and
           in_channels % groups == 0 and out_channels % groups == 0 and
           in_channels % kernel_offset_groups == 0 and in_channels % deform_groups == 0 and
           group_channels * groups == in_channels,
           f'groups {groups}, kernel_offset_groups {kernel_offset_groups} and deform_groups '
           f'{deform_groups} must divide the channels of {shapes}, and weight.shape[1] must be '
           'in_channels / groups')
    _check(scope_h >= kernel_size[0] and scope_w >= kernel_size[1] and
           scope_h * scope_w <= MAX_SCOPE_CELLS,
           f'the scope {scope_h}x{scope_w} of weight {tuple(weight.shape)} must hold '
           f'kernel_size {kernel_size} and have at most {MAX_SCOPE_CELLS} cells')
    spanned = [dilation[d] * (kernel_size[d] - 1) + 1 for d in range(2)]
    padded = [input.shape[2 + d] + 2 * padding[d] for d in range(2)]
    _check(all(padded[d] >= spanned[d] for d in range(2)),
           f'input {tuple(input.shape)} with padding {padding} is smaller than the '
           f'{spanned} that kernel_size {kernel_size} spans with dilation {dilation}')
    out_size = tuple((padded[d] - spanned[d]) // stride[d] + 1 for d in range(2))
    taps = kernel_size[0] * kernel_size[1]
    expected = dict(
        kernel_offset=[(batch, 2 * kernel_offset_groups * taps, *out_size),
                       (batch, 2 * kernel_offset_groups * taps)],
        data_offset=[(batch, 2 * deform_groups * taps, *out_size)],
        mask=[(batch, deform_groups * taps, *out_size)],
        bias=[(out_channels, )])
    for name, shapes_allowed in expected.items():
        tensor = tensors[name]
        _check(tensor is None or tuple(tensor.shape) in shapes_allowed,
               f'{name} must have shape {" or ".join(map(str, shapes_allowed))}, got '
               f'{tuple(tensor.shape) if tensor is not None else None} (with {shapes})')
    return out_size


def deform_kernel_conv2d(input: Tensor,
                         weight: Tensor,
                         kernel_offset: Tensor,
                         bias: Optional[Tensor] = None,
                         *,
                         kernel_size: IntOrPair,
                         stride: IntOrPair = 1,
                         padding: IntOrPair = 0,
                         dilation: IntOrPair = 1,
                         groups: int = 1,
                         kernel_offset_groups: int = 1,
                         data_offset: Optional[Tensor] = None,
                         mask: Optional[Tensor] = None,
                         deform_groups: int = 1) -> Tensor:
    """``dk_ops.deform_kernel_conv2d`` (same arguments, same result) on the fused kernels:
    float32 (TF32 products where ``torch.backends.cudnn.allow_tf32``), float16 and bfloat16."""
    tensors = dict(input=input, weight=weight, kernel_offset=kernel_offset, data_offset=data_offset,
                   mask=mask, bias=bias)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        tensors = {name: t.to(dtype) if t is not None and t.is_floating_point() and
                   t.device.type == device_type and t.dtype != torch.float64 else t
                   for name, t in tensors.items()}
    geometry = [_pair(kernel_size, 'kernel_size'), _pair(stride, 'stride'),
                _pair(padding, 'padding'), _pair(dilation, 'dilation')]
    out_size = _check_arguments(tensors, *geometry, groups, kernel_offset_groups, deform_groups)
    if tensors['kernel_offset'].dim() == 2:  # global DK: the same offsets at every location
        tensors['kernel_offset'] = tensors['kernel_offset'][:, :, None, None].expand(
            -1, -1, *out_size)
    with torch.autocast(device_type, enabled=False):
        return fused_forward(tensors['input'], tensors['weight'], tensors['kernel_offset'],
                             tensors['data_offset'], tensors['mask'], tensors['bias'], *geometry,
                             groups, kernel_offset_groups, deform_groups)
