"""Export: the operator written in standard ATen ops, for ONNX and other graph consumers.

``torch.export.export`` keeps ``dk_ops.deform_kernel_conv2d`` as one node (its fake kernel
gives the output shape), which only runtimes that load this extension can execute.
:func:`deform_kernel_conv2d_decomposition` computes the same formula (see
:func:`dk_ops.deform_kernel_conv2d`) with ops every ONNX runtime has:

1. ``U[n, c, t, l]``: the input sampled at tap t of output location l, times the mask. On
   the rigid grid, a depthwise convolution with one-hot filters; with data offsets, a
   bilinear ``grid_sample`` (zeros outside the image).
2. ``B[..., t, s]``: the bilinear weight of scope cell s at tap t's kernel sample position,
   ``relu(1 - |q_y - row(s)|) * relu(1 - |q_x - col(s)|)``, zero outside the scope; one
   matrix per kernel-offset group and output location (local DK) or image (global DK).
3. Local DK, the scope-columns algorithm of the compiled kernels: the columns
   ``Z[n, l, c, s] = sum_t U[n, c, t, l] * B[n, l, t, s]`` (a batched matmul), then
   ``out = Z @ weight^T`` per conv group. Global DK: each image's kernel
   ``K[n, o, c, t] = sum_s weight[o, c, s] * B[n, t, s]``, then ``out = K @ U``, the GEMM of a
   rigid convolution. Then the bias.

:func:`export_decomposed` exports a module with the op replaced by this decomposition;
:func:`export_onnx` turns that into an ONNX model of default-domain operators only. Nothing
here imports onnx or onnxscript until :func:`export_onnx` runs.
"""
import os
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# The ONNX opset the export targets by default: torch.onnx's own (its torchlib is written for
# it). Other opsets go through the onnx version converter: later ones convert; earlier ones
# only where it has the adapters (GridSample, for data offsets, needs 16 anyway).
ONNX_OPSET = 18

# Sample positions are clamped to a band just outside the plane (NaN sent to its low end):
# every bilinear corner of such a point lies outside, as for any point beyond it, so finite
# positions give the same result and non-finite offsets contribute zero (as the op documents)
# instead of NaN.
def _finite_within(coordinate: Tensor, low: float, high: float) -> Tensor:
    coordinate = coordinate.clamp(low, high)
    return torch.where(torch.isnan(coordinate), low, coordinate)


def _tap_positions(kernel_size, scale, shift, like: Tensor) -> Tensor:
    """(T, 2): ``(i * scale[0] + shift[0], j * scale[1] + shift[1])`` for every tap
    t = i * K_w + j, in ``like``'s dtype and device."""
    rows, cols = (torch.arange(size, dtype=like.dtype, device=like.device) * step + start
                  for size, step, start in zip(kernel_size, scale, shift))
    return torch.stack(torch.meshgrid(rows, cols, indexing='ij'), -1).reshape(-1, 2)


def _rigid_tap_samples(input: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """The input at every tap of every output location, (N, C * T, H_out, W_out).

    A depthwise convolution with T one-hot filters per channel: each output channel c*T + t
    copies tap t exactly (the other taps weigh zero), and the shapes stay the convolution's,
    which keeps dynamic-shape exports simple. A non-finite input pixel spreads NaN over the
    taps of the windows that hold it, where the op's output is not finite either.
    """
    channels = input.shape[1]
    taps = kernel_size[0] * kernel_size[1]
    picks = torch.eye(taps, dtype=input.dtype, device=input.device).reshape(taps, 1, *kernel_size)
    return F.conv2d(input, picks.repeat(channels, 1, 1, 1), stride=stride, padding=padding,
                    dilation=dilation, groups=channels)


def _deformed_tap_samples(input: Tensor, data_offset: Tensor, kernel_size, stride, padding,
                          dilation, deform_groups: int, out_size) -> Tensor:
    """Bilinear samples of the input at the data-offset taps, (N, C, T, H_out * W_out)."""
    batch, channels, height, width = input.shape
    out_h, out_w = out_size
    taps = kernel_size[0] * kernel_size[1]
    # Pixel coordinates of every (n, deform group, tap, y, x) sample point.
    tap_start = _tap_positions(kernel_size, dilation, (-padding[0], -padding[1]), input)
    rows = torch.arange(out_h, dtype=input.dtype, device=input.device) * stride[0]
    cols = torch.arange(out_w, dtype=input.dtype, device=input.device) * stride[1]
    offset = data_offset.reshape(batch, deform_groups, taps, 2, out_h, out_w)
    p_y = tap_start[:, 0, None, None] + rows[:, None] + offset[:, :, :, 0]
    p_x = tap_start[:, 1, None, None] + cols + offset[:, :, :, 1]
    # grid_sample's normalised coordinates with align_corners=False: pixel p <-> (2p+1)/size - 1.
    # Pixels -1 and size (the last with a corner inside) map into [-2, 2] for any size >= 1,
    # and -2 and 2 lie outside.
    grid = torch.stack([(2 * p_x + 1) / width - 1, (2 * p_y + 1) / height - 1], -1)
    grid = _finite_within(grid, -2.0, 2.0).reshape(batch * deform_groups, taps, out_h * out_w, 2)
    planes = input.reshape(batch * deform_groups, channels // deform_groups, height, width)
    samples = F.grid_sample(planes, grid, mode='bilinear', padding_mode='zeros',
                            align_corners=False)
    return samples.reshape(batch, channels, taps, out_h * out_w)


def _scope_weights(kernel_offset: Tensor, kernel_size, scope_size) -> Tensor:
    """Bilinear weights B[..., t, s] of the scope cells s at each tap's sample position.

    ``kernel_offset`` is (..., T, 2) with (dy, dx) last; the result is (..., T, S_h * S_w).
    """
    (kernel_h, kernel_w), (scope_h, scope_w) = kernel_size, scope_size
    rigid = _tap_positions(kernel_size, (1, 1),
                           ((scope_h - kernel_h) / 2, (scope_w - kernel_w) / 2), kernel_offset)
    # Rows and columns -1 and S (the last with a corner inside) lie within [-2, S + 1].
    position = _finite_within(rigid + kernel_offset, -2.0, max(scope_h, scope_w) + 1.0)
    scope_rows = torch.arange(scope_h, dtype=position.dtype, device=position.device)
    scope_cols = torch.arange(scope_w, dtype=position.dtype, device=position.device)
    # The bilinear weight of a cell is the tent 1 - distance along each axis, zero beyond 1.
    row_weights = torch.relu(1 - (position[..., 0, None] - scope_rows).abs())
    col_weights = torch.relu(1 - (position[..., 1, None] - scope_cols).abs())
    return (row_weights[..., :, None] * col_weights[..., None, :]).flatten(-2)


def deform_kernel_conv2d_decomposition(input: Tensor, weight: Tensor, kernel_offset: Tensor,
                                       data_offset: Optional[Tensor], mask: Optional[Tensor],
                                       bias: Optional[Tensor], kernel_size: Sequence[int],
                                       stride: Sequence[int], padding: Sequence[int],
                                       dilation: Sequence[int], groups: int,
                                       kernel_offset_groups: int, deform_groups: int) -> Tensor:
    """``torch.ops.dk_ops.deform_kernel_conv2d`` (same arguments, in its schema's order) in
    standard ATen ops. It expects valid arguments: the op's own checks are not repeated."""
    batch, in_channels = input.shape[:2]
    out_channels, _, scope_h, scope_w = weight.shape
    taps, scope_cells = kernel_size[0] * kernel_size[1], scope_h * scope_w
    # The output size is read off a tensor that has it rather than computed again: fewer
    # symbolic expressions in dynamic-shape exports.
    if data_offset is None:
        samples = _rigid_tap_samples(input, kernel_size, stride, padding, dilation)
        out_h, out_w = samples.shape[-2:]
    else:
        out_h, out_w = data_offset.shape[-2:]
        samples = _deformed_tap_samples(input, data_offset, kernel_size, stride, padding,
                                        dilation, deform_groups, (out_h, out_w))
    positions = out_h * out_w
    if mask is not None:
        samples = (samples.reshape(batch, deform_groups, in_channels // deform_groups, taps,
                                   positions) *
                   mask.reshape(batch, deform_groups, 1, taps, positions))
    # (N, Gk, C / Gk, T, L): the channels of one kernel-offset group share its scope weights.
    samples = samples.reshape(batch, kernel_offset_groups, in_channels // kernel_offset_groups,
                              taps, positions)

    if kernel_offset.dim() == 2:  # global DK: one kernel per image, then a plain GEMM
        offset = kernel_offset.reshape(batch, kernel_offset_groups, taps, 2)
        scope = _scope_weights(offset, kernel_size, (scope_h, scope_w))  # (N, Gk, T, S)
        scope = scope[:, :, None].expand(-1, -1, in_channels // kernel_offset_groups, -1, -1)
        scope = scope.reshape(batch, groups, in_channels // groups, taps, scope_cells)
        # kernels[n, g, c, t, o] = sum_s B[n, block(c), t, s] * weight[o, c, s]
        scope_weight = weight.reshape(groups, out_channels // groups, in_channels // groups,
                                      scope_cells).permute(0, 2, 3, 1)
        kernels = (scope @ scope_weight).permute(0, 1, 4, 2, 3)  # (N, G, O/G, C/G, T)
        group_taps = in_channels // groups * taps  # the GEMM's inner size
        kernels = kernels.reshape(batch, groups, out_channels // groups, group_taps)
        output = kernels @ samples.reshape(batch, groups, group_taps, positions)  # (N, G, O/G, L)
    else:  # local DK: one B per location, scope columns laid out (N, L, C*S)
        offset = kernel_offset.reshape(batch, kernel_offset_groups, taps, 2, positions)
        scope = _scope_weights(offset.permute(0, 4, 1, 2, 3), kernel_size,
                               (scope_h, scope_w))  # (N, L, Gk, T, S)
        columns = samples.permute(0, 4, 1, 2, 3) @ scope  # (N, L, Gk, C/Gk, S)
        group_columns = in_channels // groups * scope_cells  # the GEMM's inner size
        columns = columns.reshape(batch, positions, groups, group_columns).transpose(1, 2)
        group_weight = weight.reshape(groups, out_channels // groups, group_columns)
        output = (columns @ group_weight.transpose(1, 2)).transpose(2, 3)  # (N, G, O/G, L)
    output = output.reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        output = output + bias[:, None, None]
    return output


# For ExportedProgram.run_decompositions: the op, and nothing else, becomes ATen ops.
DECOMPOSITIONS = {torch.ops.dk_ops.deform_kernel_conv2d.default: deform_kernel_conv2d_decomposition}


def export_decomposed(module: torch.nn.Module, args: Tuple[Any, ...], *,
                      dynamic_shapes: Optional[Any] = None) -> 'torch.export.ExportedProgram':
    """``torch.export.export(module, args)`` with every DK op decomposed into ATen ops."""
    exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    return exported.run_decompositions(DECOMPOSITIONS)


def export_onnx(module: torch.nn.Module, args: Tuple[Any, ...], path: Optional[str] = None, *,
                dynamic_shapes: Optional[Any] = None, input_names=None, output_names=None,
                opset_version: int = ONNX_OPSET) -> 'torch.onnx.ONNXProgram':
    """Export ``module`` to ONNX (opset ``opset_version``, default-domain operators only).

    The DK ops become the standard operators of their decomposition; the model is saved to
    ``path`` when given (weights inside the file, unless over protobuf's 2 GB), and the
    ``torch.onnx.ONNXProgram`` returned. ``dynamic_shapes`` is ``torch.export.export``'s.
    """
    program = torch.onnx.export(export_decomposed(module, args, dynamic_shapes=dynamic_shapes),
                                dynamo=True, input_names=input_names,
                                output_names=output_names, opset_version=opset_version,
                                verbose=False)
    model = program.model  # checked in onnx_ir form: serialising a detector takes a while
    opset = model.opset_imports.get('')
    if opset != opset_version:  # torch.onnx keeps its own opset where conversion fails
        raise ValueError(f'export_onnx: opset_version={opset_version} was asked for, but '
                         f'the onnx version converter could not convert the graph from opset '
                         f'{opset} (torch.onnx logs which operator); use opset_version '
                         f'{ONNX_OPSET}')
    # Checked rather than assumed: the point of the file is that any ONNX runtime runs it.
    custom = sorted({node.domain for node in model.graph.all_nodes()} - {'', 'ai.onnx'})
    if custom or model.functions:
        raise RuntimeError(f'export_onnx: the ONNX graph uses operators outside the default '
                           f'domain: domains {custom}, functions {sorted(model.functions)}')
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        program.save(path, external_data=False)
    return program


__all__ = ['ONNX_OPSET', 'DECOMPOSITIONS', 'deform_kernel_conv2d_decomposition',
           'export_decomposed', 'export_onnx']
