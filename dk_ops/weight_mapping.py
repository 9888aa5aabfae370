"""Map rigid K x K kernels into a larger S x S scope.

With zero kernel offsets the DK tap (i, j) samples the scope at
(i + (S_h - K_h)/2, j + (S_w - K_w)/2). That sampling is linear and separable:
``rigid = A_h @ scope @ A_w^T`` with A (K x S) the bilinear interpolation matrix of one
axis. The minimum-norm scope reproducing a rigid kernel is ``pinv(A_h) @ rigid @ pinv(A_w)^T``
(A has full row rank, so the fit is exact), which lets a DK layer load ImageNet
weights and start out equal to the rigid convolution.
"""
import math
from typing import Sequence, Tuple

import torch
from torch import Tensor


def scope_sampling_matrix(kernel: int, scope: int, dtype=torch.float64) -> Tensor:
    """(kernel x scope) bilinear weights of the zero-offset taps along one axis."""
    if kernel > scope:
        raise ValueError(f'kernel size {kernel} must not exceed the scope size {scope}')
    matrix = torch.zeros(kernel, scope, dtype=dtype)
    for i in range(kernel):
        position = i + (scope - kernel) / 2
        low = math.floor(position)
        frac = position - low
        matrix[i, low] += 1 - frac
        if frac > 0:
            matrix[i, low + 1] += frac
    return matrix


def _separable(kernels: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``rows @ k @ cols.T`` for every 2-D kernel k of ``kernels`` (..., H, W), in float64.

    As two plain GEMMs over all kernels at once: a batch of tiny matmuls is far slower for the
    millions of kernels of a ResNet stage.
    """
    batch, (height, width) = kernels.shape[:-2], kernels.shape[-2:]
    rows, cols = rows.to(kernels.device), cols.to(kernels.device)
    by_row = kernels.double().reshape(-1, width) @ cols.T                    # (B*H, W')
    by_col = by_row.reshape(-1, height, cols.shape[0]).transpose(1, 2)      # (B, W', H)
    mapped = by_col.reshape(-1, height) @ rows.T                            # (B*W', H')
    mapped = mapped.reshape(-1, cols.shape[0], rows.shape[0]).transpose(1, 2)
    return mapped.reshape(*batch, rows.shape[0], cols.shape[0]).to(kernels.dtype).contiguous()


def rigid_to_scope(rigid: Tensor, scope_size: Sequence[int]) -> Tensor:
    """Minimum-norm scope weights (..., S_h, S_w) whose zero-offset sampling is ``rigid``.

    ``rigid`` has shape (..., K_h, K_w); with S = K it is returned unchanged (copied).
    """
    kernel_h, kernel_w = rigid.shape[-2:]
    return _separable(rigid, torch.linalg.pinv(scope_sampling_matrix(kernel_h, scope_size[0])),
                      torch.linalg.pinv(scope_sampling_matrix(kernel_w, scope_size[1])))


def scope_to_rigid(scope: Tensor, kernel_size: Tuple[int, int]) -> Tensor:
    """The rigid kernel (..., K_h, K_w) that zero offsets sample from ``scope``."""
    return _separable(scope, scope_sampling_matrix(kernel_size[0], scope.shape[-2]),
                      scope_sampling_matrix(kernel_size[1], scope.shape[-1]))
