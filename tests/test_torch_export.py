"""``torch.export.export`` of DK detectors: the op stays one graph node, shaped by its fake kernel.

The tensor path of a Faster R-CNN with every DK layer type in c3-c5 (backbone, neck and the
RPN head's forward; the proposals' NMS and the RoI head need data-dependent shapes, which
mmdet's heads do not export) is exported with dynamic batch, height and width, and the
exported program must compute what the detector computes, at the traced size and at others.
"""
import os.path as osp

import pytest
import torch
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from dk_mmdet.config_loading import load_config
from dk_ops.modules import OffsetConv2d, OffsetLinear
from mmdet_fixtures import CONFIG_DIR

DK_OP = torch.ops.dk_ops.deform_kernel_conv2d.default
DK_LAYERS_IN_C3_C5 = 4 + 6 + 3  # the conv2 of every Bottleneck of a ResNet-50's c3-c5

# A thin ResNet-50-FPN (stage widths 64..512) and RPN, as the tools' tests use.
THIN_DETECTOR_OPTIONS = {
    'model.backbone.base_channels': 16,
    'model.neck.in_channels': [64, 128, 256, 512],
    'model.neck.out_channels': 32,
    'model.rpn_head.in_channels': 32,
    'model.rpn_head.feat_channels': 32,
    'model.roi_head.bbox_roi_extractor.out_channels': 32,
    'model.roi_head.bbox_head.in_channels': 32,
    'model.roi_head.bbox_head.fc_out_channels': 64,
}
# config file, extra options: local DK, global DK, DK + DCN and DK + DCNv2.
VARIANTS = {
    'DK': ('faster-rcnn_r50-dk-c3-c5_fpn_1x_coco.py', {}),
    'DKGlobal': ('faster-rcnn_r50-dk-global-c3-c5_fpn_1x_coco.py', {}),
    'DKDCN': ('faster-rcnn_r50-dk-dconv-c3-c5_fpn_1x_coco.py', {}),
    'DKDCNv2': ('faster-rcnn_r50-dk-dconv-c3-c5_fpn_1x_coco.py',
                {'model.backbone.dcn.type': 'DKDCNv2', 'model.backbone.dcn.deform_groups': 2}),
}


class TensorPath(nn.Module):
    """Image batch to the neck's feature maps and the RPN's scores and box deltas."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image):
        features = self.detector.extract_feat(image)
        scores, deltas = self.detector.rpn_head(features)
        return (*features, *scores, *deltas)


def thin_detector(variant: str) -> nn.Module:
    """The variant's thin detector in eval mode, with offsets of about a pixel or scope cell."""
    config, options = VARIANTS[variant]
    cfg = load_config(osp.join(CONFIG_DIR, config), {**THIN_DETECTOR_OPTIONS, **options})
    cfg.model.backbone.init_cfg = None  # no ImageNet weights here
    init_default_scope('mmdet')
    torch.manual_seed(0)
    detector = MODELS.build(cfg.model).eval()
    # Freshly built DK layers have zero offsets; draw the offset generators at random.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, (OffsetConv2d, OffsetLinear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) /
                                    fan_in**0.5)
    return detector


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_exported_detector_tensor_path_computes_what_the_detector_does(variant):
    module = TensorPath(thin_detector(variant)).eval()
    generator = torch.Generator().manual_seed(1)
    traced_image = torch.randn(2, 3, 96, 128, generator=generator)
    dims = {0: torch.export.Dim('batch', min=1, max=64),
            2: torch.export.Dim('height', min=65, max=4096),
            3: torch.export.Dim('width', min=65, max=4096)}
    exported = torch.export.export(module, (traced_image, ), dynamic_shapes={'image': dims})

    # The op is one node per DK layer, its output shape from the fake kernel: symbolic.
    dk_nodes = [node for node in exported.graph.nodes if node.target == DK_OP]
    assert len(dk_nodes) == DK_LAYERS_IN_C3_C5
    assert all(isinstance(size, torch.SymInt) for node in dk_nodes
               for size in (node.meta['val'].shape[0], *node.meta['val'].shape[2:]))

    program = exported.module()
    # The traced size, and another batch with sizes that are not multiples of the network's
    # stride.
    for shape in [(2, 3, 96, 128), (1, 3, 75, 90)]:
        image = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = module(image)
            got = program(image)
        assert len(got) == len(expected) == 15  # 5 feature maps, 5 score maps, 5 delta maps
        for index, (got_map, expected_map) in enumerate(zip(got, expected)):
            assert got_map.shape == expected_map.shape
            torch.testing.assert_close(got_map, expected_map, msg=lambda m: f'{index}: {m}')
