"""Parameters and multiply-accumulates (MACs) of an mmdet detector, DK and DCN layers included.

The MACs are those of mmengine's ``FlopAnalyzer`` (a jit trace of the forward; like fvcore it
counts one fused multiply-add as one "flop", i.e. it counts MACs), plus handles for the three
convolutions whose work it cannot see:

- ``dk_ops::deform_kernel_conv2d`` (the DK layers), as dk_ops computes it. Local kernel offsets
  (and global ones combined with data offsets or a mask): the scope-column GEMM,
  ``N*L * C_out * C_in/groups * S_h*S_w`` (L output locations, S the scope), plus the sampling
  that fills the scope columns, ``N*L * C_in * taps`` times 4 (scope corners), plus 4 (image
  corners) with data offsets, plus 1 with a mask. Global kernel offsets alone: building each
  image's kernel from its scope, ``N * C_out * C_in/groups * taps * S_h*S_w``, plus the
  convolution with it, ``N*L * C_out * C_in/groups * taps``. The offset generators are ordinary
  convs and linears, counted by mmengine.
- mmcv's ``DeformConv2dFunction`` (DCN) and ``ModulatedDeformConv2dFunction`` (DCNv2): the
  GEMM ``N*L * C_out * C_in/groups * taps`` plus the bilinear im2col, ``N*L * C_in * taps`` times
  4 (plus 1 for the mask).

Not counted: RoIAlign, NMS and element-wise operations (mmengine counts none of them either);
:func:`model_complexity` returns the names of the operators it skipped.

The counted forward is one test-mode image of the stated size (padded as the model's data
preprocessor pads). A two-stage detector's RoI head gets a fixed number of proposals,
``test_cfg.rpn.max_per_img`` (1000 in mmdet's COCO configs, what a trained RPN fills), rather
than whatever an untrained RPN proposes, so the count depends on the config only.
:func:`measure_complexity` builds a work_dir's model from its config and counts it at the size
its test pipeline resizes to.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.structures import InstanceData
from torch import nn

from dk_mmdet.results.work_dirs import WorkDirResults

DK_OP = 'dk_ops::deform_kernel_conv2d'
DCN_OP = 'prim::PythonOp.DeformConv2dFunction'
MODULATED_DCN_OP = 'prim::PythonOp.ModulatedDeformConv2dFunction'
BILINEAR_CORNERS = 4


def _int_list(value) -> List[int]:
    """The ints of a traced int-list argument: a constant, or a list built from constants."""
    constant = value.toIValue()
    if constant is not None:
        return list(constant)
    return [item.toIValue() for item in value.node().inputs()]


def dk_conv_macs(inputs: List, outputs: List) -> int:
    """MACs of one ``dk_ops::deform_kernel_conv2d`` call (see the module docstring)."""
    # Schema: input, weight, kernel_offset, data_offset, mask, bias, kernel_size, stride,
    # padding, dilation, groups, kernel_offset_groups, deform_groups.
    in_channels = get_shape(inputs[0])[1]
    out_channels, channels_per_group, scope_h, scope_w = get_shape(inputs[1])
    kernel_offset_shape = get_shape(inputs[2])
    has_data_offset = get_shape(inputs[3]) is not None
    has_mask = get_shape(inputs[4]) is not None
    kernel_h, kernel_w = _int_list(inputs[6])
    batch, _, out_h, out_w = get_shape(outputs[0])
    columns = batch * out_h * out_w
    taps = kernel_h * kernel_w
    scope_cells = scope_h * scope_w
    if len(kernel_offset_shape) == 2 and not has_data_offset and not has_mask:
        kernel_sampling = batch * out_channels * channels_per_group * taps * scope_cells
        return kernel_sampling + columns * out_channels * channels_per_group * taps
    gemm = columns * out_channels * channels_per_group * scope_cells
    sampling_per_tap = BILINEAR_CORNERS + (BILINEAR_CORNERS if has_data_offset else 0) + (
        1 if has_mask else 0)
    return gemm + columns * in_channels * taps * sampling_per_tap


def _mmcv_deform_conv_macs(weight_index: int, modulated: bool):

    def handle(inputs: List, outputs: List) -> int:
        in_channels = get_shape(inputs[0])[1]
        out_channels, channels_per_group, kernel_h, kernel_w = get_shape(inputs[weight_index])
        batch, _, out_h, out_w = get_shape(outputs[0])
        columns = batch * out_h * out_w
        taps = kernel_h * kernel_w
        im2col = columns * in_channels * taps * (BILINEAR_CORNERS + (1 if modulated else 0))
        return columns * out_channels * channels_per_group * taps + im2col

    return handle


# mmcv's Functions take (input, offset, weight, ...) and (input, offset, mask, weight, bias, ...).
DEFORM_CONV_HANDLES = {
    DK_OP: dk_conv_macs,
    DCN_OP: _mmcv_deform_conv_macs(weight_index=2, modulated=False),
    MODULATED_DCN_OP: _mmcv_deform_conv_macs(weight_index=3, modulated=True),
}


class _TestForward(nn.Module):
    """A detector's test forward on a tensor, for tracing; fixed proposals for two stages."""

    def __init__(self, detector: nn.Module, num_proposals: int):
        super().__init__()
        self.detector = detector
        self.num_proposals = num_proposals

    def forward(self, inputs: torch.Tensor):
        detector = self.detector
        if not (hasattr(detector, 'rpn_head') and hasattr(detector, 'roi_head')):
            return detector(inputs, mode='tensor')
        features = detector.extract_feat(inputs)
        rpn_outputs = detector.rpn_head(features)
        proposals = InstanceData(bboxes=fixed_proposals(self.num_proposals, inputs.shape[-2:]))
        return rpn_outputs, detector.roi_head.forward(features, [proposals])


def fixed_proposals(count: int, image_shape: Sequence[int]) -> torch.Tensor:
    """``count`` boxes (x1, y1, x2, y2) spread over an image: centres on a grid, sizes cycling."""
    height, width = image_shape
    per_row = math.ceil(math.sqrt(count))
    index = torch.arange(count, dtype=torch.float32)
    centre_x = (index % per_row + 0.5) * width / per_row
    centre_y = (torch.div(index, per_row, rounding_mode='floor') + 0.5) * height / per_row
    half_size = (index % 4 + 1) / 8 * min(height, width) / 2
    return torch.stack([centre_x - half_size, centre_y - half_size, centre_x + half_size,
                        centre_y + half_size], dim=1)


def padded_input_shape(cfg_model: dict, height: int, width: int) -> Tuple[int, int]:
    """(height, width) after the model's data preprocessor pads to its size divisor."""
    divisor = cfg_model.get('data_preprocessor', {}).get('pad_size_divisor', 1)
    return (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)


def model_complexity(detector: nn.Module, height: int, width: int,
                     num_proposals: int) -> Dict:
    """Parameters and MACs of ``detector`` (eval mode) on one ``height`` x ``width`` image.

    Returns ``dict(params=..., macs=..., uncounted_ops={op name: calls})``.
    """
    detector.eval()
    inputs = torch.zeros(1, 3, height, width)
    analyzer = FlopAnalyzer(_TestForward(detector, num_proposals), (inputs, ))
    analyzer.set_op_handle(**DEFORM_CONV_HANDLES)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad():
        macs = analyzer.total()
    return dict(params=sum(p.numel() for p in detector.parameters()), macs=macs,
                uncounted_ops=dict(analyzer.unsupported_ops()))


def test_input_size(config: Config) -> Tuple[int, int]:
    """(height, width) the test pipeline resizes to: Resize's scale, read as (long, short) side."""
    for step in config.test_dataloader.dataset.pipeline:
        if step['type'].split('.')[-1] == 'Resize' and 'scale' in step:
            scale = step['scale']
            scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
            return (min(scale), max(scale))
    raise ValueError('the test pipeline has no Resize with a scale; pass --input-size H W')


def measure_complexity(results: WorkDirResults, input_size: Optional[Sequence[int]]) -> None:
    """Set ``results.input_shape`` and ``results.complexity`` for its config's model, at
    ``input_size`` (height, width) or else the test pipeline's size."""
    config = results.config
    init_default_scope(config.get('default_scope', 'mmdet'))
    model_cfg = config.model.copy()
    if model_cfg.get('backbone', {}).get('init_cfg'):
        model_cfg.backbone.init_cfg = None  # the count needs the shapes, not the weights
    detector = MODELS.build(model_cfg)
    height, width = input_size if input_size else test_input_size(config)
    results.input_shape = padded_input_shape(model_cfg, height, width)
    rpn_test_cfg = (model_cfg.get('test_cfg') or {}).get('rpn') or {}
    results.complexity = model_complexity(detector, *results.input_shape,
                                          num_proposals=rpn_test_cfg.get('max_per_img', 1000))
