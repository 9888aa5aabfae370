"""The functional operator, its autograd formula and its fake (meta) kernels.

The schemas and the CPU/CUDA kernels live in C++ (``dk_ops/csrc``); argument checks
live there too, so a direct ``torch.ops.dk_ops`` call is as safe as this wrapper.
"""
import os
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

IntOrPair = Union[int, Sequence[int]]

_forward = torch.ops.dk_ops.deform_kernel_conv2d
_backward = torch.ops.dk_ops.deform_kernel_conv2d_backward


def _pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')
    return value


def _runs_fused(input: Tensor, kernel_offset: Tensor) -> bool:
    """Whether this call takes the fused Triton path: opt-in with ``DK_OPS_CUDA_PATH=fused``
    (read on every call; unset or ``columns`` for the compiled op), for local kernel offsets on
    CUDA in float32, float16 or bfloat16. No GPU has timed it yet (docs/gpu.md)."""
    path = os.environ.get('DK_OPS_CUDA_PATH', '') or 'columns'
    if path not in ('columns', 'fused'):
        raise ValueError(f"DK_OPS_CUDA_PATH must be 'columns' or 'fused' (or unset), got '{path}'")
    return (path == 'fused' and input.is_cuda and kernel_offset.dim() == 4 and
            input.dtype != torch.float64)


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
    r"""Deformable-kernel convolution.

    ``out[n,o,y,x] = bias[o] + sum_{c in group(o)} sum_{i<K_h, j<K_w}
    m * X(n, c, p_y, p_x) * W(o, c, q_y, q_x)`` with

    - ``p = (y*stride_h - pad_h + i*dil_h + dy_data, x*stride_w - pad_w + j*dil_w + dx_data)``,
    - ``q = (i + (S_h - K_h)/2 + dy_kernel, j + (S_w - K_w)/2 + dx_kernel)``,

    where X and W are bilinear samples (zero outside) of the input plane and of the
    scope ``weight[o, c]`` (shape ``S_h x S_w``), and ``m`` is the mask (or 1).

    Args:
        input: (N, C_in, H, W).
        weight: the kernel scope, (C_out, C_in / groups, S_h, S_w), S >= kernel_size.
        kernel_offset: local DK (N, 2*Gk*K_h*K_w, H_out, W_out) or global DK
            (N, 2*Gk*K_h*K_w); channels 2*(g*K_h*K_w + i*K_w + j) and +1 hold (dy, dx)
            of tap (i, j) for input-channel block g (Gk = ``kernel_offset_groups``).
        bias: (C_out,) or None.
        data_offset: DCN offsets (N, 2*Gd*K_h*K_w, H_out, W_out), Gd = ``deform_groups``.
        mask: DCNv2 modulation (N, Gd*K_h*K_w, H_out, W_out).

    The output size is F.conv2d's; a padded input smaller than the dilated kernel raises a
    ValueError. Non-finite offsets put their tap outside the scope (or image): the tap
    contributes zero and receives zero gradient. Every tensor gets first derivatives;
    double backward (differentiating them after ``create_graph=True``) raises
    NotImplementedError.

    dtypes: float32, float64, float16 and bfloat16, all tensors alike; any other (float8
    included) raises a TypeError. The CPU computes float16 / bfloat16 in float32; CUDA keeps
    the sampled scope columns and the GEMMs in that dtype and sums in float32 (like cuDNN
    convolutions). Under ``torch.autocast`` ("cpu" or "cuda") the op behaves like ``conv2d``:
    its floating-point tensors on that device (float64 ones excepted) are cast to the
    autocast dtype and it runs in it.

    Determinism on CUDA: without ``data_offset`` every kernel is deterministic. With
    ``data_offset``, the input gradient is added with atomics, so under
    ``torch.use_deterministic_algorithms(True)`` the backward raises (or warns, with
    ``warn_only=True``), as PyTorch's own nondeterministic ops do.

    ``DK_OPS_CUDA_PATH=fused`` runs local DK on CUDA on the fused Triton kernels instead
    (``dk_ops.fused``, docs/gpu.md).
    """
    if _runs_fused(input, kernel_offset):
        from dk_ops import fused  # here: Triton is imported only by those who ask for it
        return fused.deform_kernel_conv2d(input, weight, kernel_offset, bias,
                                          kernel_size=kernel_size, stride=stride,
                                          padding=padding, dilation=dilation, groups=groups,
                                          kernel_offset_groups=kernel_offset_groups,
                                          data_offset=data_offset, mask=mask,
                                          deform_groups=deform_groups)
    return _forward(input, weight, kernel_offset, data_offset, mask, bias,
                    _pair(kernel_size, 'kernel_size'), _pair(stride, 'stride'),
                    _pair(padding, 'padding'), _pair(dilation, 'dilation'), groups,
                    kernel_offset_groups, deform_groups)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (input, weight, kernel_offset, data_offset, mask, bias, *geometry) = inputs
    ctx.save_for_backward(input, weight, kernel_offset, data_offset, mask)
    ctx.geometry = geometry
    ctx.has_bias = bias is not None


def _backward_formula(ctx, grad_output):
    input, weight, kernel_offset, data_offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], needs[2], data_offset is not None and needs[3],
                   mask is not None and needs[4]]
    grads = _backward(grad_output, input, weight, kernel_offset, data_offset, mask,
                      *ctx.geometry, output_mask)
    grad_input, grad_weight, grad_kernel_offset, grad_data_offset, grad_mask = (
        g if wanted else None for g, wanted in zip(grads, output_mask))
    grad_bias = grad_output.sum((0, 2, 3)) if ctx.has_bias and needs[5] else None
    return (grad_input, grad_weight, grad_kernel_offset, grad_data_offset, grad_mask,
            grad_bias) + (None, ) * len(ctx.geometry)


torch.library.register_autograd('dk_ops::deform_kernel_conv2d', _backward_formula,
                                setup_context=_setup_context)


# The backward op has no derivative: with create_graph=True its results stay differentiable,
# and differentiating them (a gradient penalty, say) raises here rather than giving wrong
# second derivatives.
def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        'dk_ops.deform_kernel_conv2d: double backward (differentiating its gradients, after '
        'create_graph=True) is not supported; first derivatives are')


torch.library.register_autograd('dk_ops::deform_kernel_conv2d_backward', _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake('dk_ops::deform_kernel_conv2d')
def _(input, weight, kernel_offset, data_offset, mask, bias, kernel_size, stride, padding,
      dilation, groups, kernel_offset_groups, deform_groups):
    # The real kernels' checks raise ValueError; these few the output shape needs do too.
    torch._check_value(
        input.dim() == 4,
        lambda: f'deform_kernel_conv2d: input must be 4-D, got {tuple(input.shape)}')
    torch._check_value(
        weight.dim() == 4,
        lambda: f'deform_kernel_conv2d: weight must be 4-D, got {tuple(weight.shape)}')
    torch._check_value(
        all(s >= 1 for s in stride),
        lambda: f'deform_kernel_conv2d: stride must be >= 1, got {list(stride)}')
    padded = [input.shape[2 + d] + 2 * padding[d] for d in range(2)]
    spanned = [dilation[d] * (kernel_size[d] - 1) + 1 for d in range(2)]
    for d in range(2):  # as F.conv2d: the padded input must hold the dilated kernel
        torch._check_value(
            padded[d] >= spanned[d],
            lambda: (f'deform_kernel_conv2d: input of shape {tuple(input.shape)} is '
                     f'{tuple(padded)} with padding {list(padding)}, smaller than the '
                     f'{tuple(spanned)} that kernel_size {list(kernel_size)} spans with '
                     f'dilation {list(dilation)}'))
    out_h, out_w = ((padded[d] - spanned[d]) // stride[d] + 1 for d in range(2))
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.register_fake('dk_ops::deform_kernel_conv2d_backward')
def _(grad_output, input, weight, kernel_offset, data_offset, mask, kernel_size, stride,
      padding, dilation, groups, kernel_offset_groups, deform_groups, output_mask):
    # Contiguous whatever the inputs' layout (channels-last included), as the real kernels
    # return them.
    def like(tensor, wanted):
        return tensor.new_empty(tensor.shape) if wanted else input.new_empty((0, ))

    return (like(input, output_mask[0]), like(weight, output_mask[1]),
            like(kernel_offset, output_mask[2]),
            like(data_offset, output_mask[3]) if data_offset is not None else like(input, False),
            like(mask, output_mask[4]) if mask is not None else like(input, False))
