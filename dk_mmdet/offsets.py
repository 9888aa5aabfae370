"""The offsets that dynamic conv layers generate, and how far they move: a trained layer's
offsets against its rigid start, where every offset is 0.

- Kernel offsets (local DK, global DK, DK + DCN) are in scope cells: where each tap reads the
  scope, relative to its rigid position.
- Data offsets (DK + DCN, mmcv's DCN and DCNv2) are in input pixels of the layer: where each
  tap reads the input.

Both lay out (dy, dx) of tap t of offset group g at channels 2(g·K·K + t) and +1
(docs/operator.md), so a tap's move is the length of that pair. :func:`offset_magnitudes`
averages it over taps, locations and images, per backbone stage and kind.
"""
from collections import defaultdict
from typing import Callable, Dict, Iterable, Tuple

import torch
from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
from torch import Tensor, nn

import dk_ops

# mmdet's ResNet names its stages layer1..layer4; c3-c5 are the ones the configs make dynamic.
STAGES = {'layer1': 'c2', 'layer2': 'c3', 'layer3': 'c4', 'layer4': 'c5'}
OFFSET_LAYER_TYPES = (dk_ops.DeformKernel2d, dk_ops.GlobalDeformKernel2d,
                      dk_ops.DeformKernelConv2d, DeformConv2dPack, ModulatedDeformConv2dPack)


def _data_offsets(generated: Tensor, deform_groups: int, kernel_size) -> Tensor:
    # DCNv2 generators append the mask after the 2*G*K*K offset channels.
    return generated[:, :2 * deform_groups * kernel_size[0] * kernel_size[1]]


def generated_offsets(layer: nn.Module, layer_input: Tensor) -> Dict[str, Tensor]:
    """The offsets ``layer`` generates for ``layer_input``: ``'kernel'``, (N, 2GKK, H, W) or per
    image (N, 2GKK), and ``'data'``, (N, 2GKK, H, W), those the layer has."""
    if isinstance(layer, dk_ops.DeformKernelConv2d):
        return {'kernel': layer.kernel_offset_conv(layer_input),
                'data': _data_offsets(layer.data_offset_conv(layer_input), layer.deform_groups,
                                      layer.kernel_size)}
    if isinstance(layer, dk_ops.DeformKernel2d):
        return {'kernel': layer.kernel_offset_conv(layer_input)}
    if isinstance(layer, dk_ops.GlobalDeformKernel2d):
        return {'kernel': layer.kernel_offset(layer_input)}
    if isinstance(layer, (DeformConv2dPack, ModulatedDeformConv2dPack)):
        return {'data': _data_offsets(layer.conv_offset(layer_input), layer.deform_groups,
                                      layer.kernel_size)}
    raise TypeError(f'{type(layer).__name__} generates no offsets; supported layers: '
                    f'{[cls.__name__ for cls in OFFSET_LAYER_TYPES]}')


def tap_moves(offsets: Tensor) -> Tensor:
    """The length of each tap's (dy, dx): (N, GKK, ...) from (N, 2GKK, ...)."""
    pairs = offsets.unflatten(1, (offsets.shape[1] // 2, 2))
    return torch.linalg.vector_norm(pairs, dim=2)


def stage_of(module_name: str) -> str:
    """'c4' for 'backbone.layer3.1.conv2'."""
    for part in module_name.split('.'):
        if part in STAGES:
            return STAGES[part]
    raise ValueError(f'{module_name} is in no ResNet stage (layer1..layer4)')


@torch.no_grad()
def offset_magnitudes(model: nn.Module, run_image: Callable[[object], None],
                      images: Iterable) -> Dict[Tuple[str, str], float]:
    """Mean tap move per (stage, kind) of ``model``'s backbone layers, over ``images``.

    ``run_image(image)`` runs the model's backbone on one image; every offset-generating layer
    of the backbone is hooked while it does."""
    sums, counts = defaultdict(float), defaultdict(int)

    def record(name):
        def hook(layer, args):
            for kind, offsets in generated_offsets(layer, args[0]).items():
                moves = tap_moves(offsets)
                sums[stage_of(name), kind] += float(moves.sum())
                counts[stage_of(name), kind] += moves.numel()
        return hook

    handles = [module.register_forward_pre_hook(record(name))
               for name, module in model.named_modules()
               if name.startswith('backbone.') and isinstance(module, OFFSET_LAYER_TYPES)]
    if not handles:
        raise ValueError('the backbone has no offset-generating layer (DK or DCN): a rigid '
                         'model has no offsets')
    try:
        for image in images:
            run_image(image)
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / counts[key] for key in sorted(sums)}
