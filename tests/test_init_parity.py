"""Every variant starts where the rigid model starts.

Built and initialised with the seed of its rigid twin, a DK / global DK / DK + DCN / CondConv
network holds the twin's parameters (the DK scopes reproduce the twin's kernels, the offset
generators are zero, the CondConv experts average to the twin's kernel), so at step 0 it
computes the same function (DKDCNv2: the same at half scale in its DK layers, as documented).
"""
import functools
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.model import initialize
from mmengine.registry import init_default_scope
from torch import nn

import dk_mmdet
import dk_ops
from dk_ops.weight_mapping import scope_to_rigid
from mmdet_fixtures import REPO_ROOT, build_with_seed

VARIANT_LAYERS = (dk_mmdet.DKConv2d, dk_mmdet.DKGlobalConv2d, dk_mmdet.DKDCNConv2d,
                  dk_mmdet.DKDCNv2Conv2d, dk_mmdet.CondConv2d)
DK_MODULES = (dk_ops.DeformKernel2d, dk_ops.GlobalDeformKernel2d, dk_ops.DeformKernelConv2d)
OPS_MODULES = {
    'local': dk_ops.DeformKernel2d,
    'global': dk_ops.GlobalDeformKernel2d,
    'dk_dcn': dk_ops.DeformKernelConv2d,
}
GEOMETRIES = {
    'k3_bias': dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    'k3_scope5_groups2_stride2': dict(in_channels=6, out_channels=4, kernel_size=3, stride=2,
                                      padding=2, dilation=2, groups=2, scope_size=5,
                                      bias=False),
    'k1x3': dict(in_channels=4, out_channels=4, kernel_size=(1, 3), padding=(0, 1)),
}


def rigid_view(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What a variant's parameter is in its rigid twin's terms (None: no counterpart)."""
    if isinstance(module, DK_MODULES) and name == 'weight':
        return scope_to_rigid(tensor, module.kernel_size)
    if isinstance(module, dk_mmdet.CondConv2d) and name == 'weight':
        return tensor.mean(0)
    if isinstance(module, dk_mmdet.CondConv2d) and name == 'bias':
        return tensor[0]
    return tensor


def assert_starts_as_rigid(variant: nn.Module, rigid: nn.Module):
    """Every rigid parameter has its value in ``variant``; the variant's extras start at zero
    (offset generators) or at the constant routing (CondConv)."""
    rigid_params = dict(rigid.named_parameters())
    matched = set()
    for module_name, module in variant.named_modules():
        for name, tensor in module.named_parameters(recurse=False):
            full_name = f'{module_name}.{name}' if module_name else name
            if full_name in rigid_params:
                expected = rigid_params[full_name]
                actual = rigid_view(module, name, tensor.detach())
                assert actual.shape == expected.shape, full_name
                torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6,
                                           msg=full_name)
                matched.add(full_name)
            elif 'offset' in module_name.rsplit('.', 1)[-1]:
                assert torch.count_nonzero(tensor) == 0, full_name
            else:
                assert '.routing.' in full_name, f'{full_name} has no rigid counterpart'
    assert matched == set(rigid_params)


# ------------------------------------------------------------------------------ the modules
@pytest.mark.parametrize('kind', OPS_MODULES)
@pytest.mark.parametrize('geometry', GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_module_built_with_a_convs_seed_is_that_conv(kind, geometry):
    torch.manual_seed(3)
    rigid = nn.Conv2d(**{k: v for k, v in geometry.items() if k != 'scope_size'})
    after_rigid = torch.rand(4)
    torch.manual_seed(3)
    module = OPS_MODULES[kind](**{'bias': True, **geometry})
    # The same random numbers were drawn: the next draw agrees too.
    torch.testing.assert_close(torch.rand(4), after_rigid, rtol=0, atol=0)
    torch.testing.assert_close(scope_to_rigid(module.weight.detach(), module.kernel_size),
                               rigid.weight.detach(), rtol=1e-5, atol=1e-7)
    if rigid.bias is not None:
        torch.testing.assert_close(module.bias, rigid.bias, rtol=0, atol=0)
    x = torch.randn(2, geometry['in_channels'], 9, 8)
    torch.testing.assert_close(module(x), rigid(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('layer_type', ('DK', 'DKGlobal', 'DKDCN', 'CondConv'))
@pytest.mark.parametrize('init_cfg', [
    dict(type='Kaiming', layer='Conv2d'),
    dict(type='Kaiming', layer='Conv2d', mode='fan_in', distribution='uniform', bias=0.3),
    dict(type='Xavier', layer='Conv2d', distribution='uniform'),
    dict(type='Normal', layer='Conv2d', std=0.01),
    dict(type='TruncNormal', layer='Conv2d', std=0.02),
    dict(type='Caffe2Xavier', layer='Conv2d'),
], ids=lambda cfg: cfg['type'] + cfg.get('distribution', ''))
def test_init_cfg_draws_the_rigid_kernel(layer_type, init_cfg):
    from mmcv.cnn import build_conv_layer
    rigid, variant = [], []
    for conv_cfg, models in ((None, rigid), (dict(type=layer_type), variant)):
        torch.manual_seed(5)
        # Two convs, so that a difference in what the first draws shows in the second.
        model = nn.Sequential(build_conv_layer(conv_cfg, 4, 6, 3, padding=1, bias=True),
                              build_conv_layer(conv_cfg, 6, 6, 3, padding=1, bias=True))
        initialize(model, init_cfg)
        models.append(model)
    assert_starts_as_rigid(variant[0], rigid[0])
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(variant[0](x), rigid[0](x), rtol=1e-4, atol=1e-6)


def test_offset_generators_are_not_matched_by_name_and_are_rezeroed():
    layer = dk_mmdet.DKDCNConv2d(4, 4, 3, padding=1)
    initialize(layer, dict(type='Kaiming', layer=['Conv2d', 'Linear']))
    for name in layer.offset_generator_names:
        assert all(torch.count_nonzero(p) == 0 for p in getattr(layer, name).parameters())
    # An init that walks modules by isinstance, as some heads do, reaches them;
    # init_weights puts them back to zero.
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight)
    layer.init_weights()
    for name in layer.offset_generator_names:
        assert all(torch.count_nonzero(p) == 0 for p in getattr(layer, name).parameters())


# ------------------------------------------------------------------------------ the configs
def config_pairs(directory, rigid_names):
    """(rigid config, variant config) for each of our variants in ``directory``."""
    pairs = []
    for rigid in rigid_names:
        stem, suffix = rigid.split('_fpn')
        pattern = osp.join(REPO_ROOT, 'configs', directory, f'{stem}-*_fpn{suffix}.py')
        for path in sorted(glob.glob(pattern)):
            name = osp.basename(path)[:-3]
            if '-dk' in name or '-condconv' in name:
                pairs.append((rigid, name))
    return pairs


SHAPES_PAIRS = config_pairs('shapes', ('faster-rcnn_r50_fpn_shapes', 'mask-rcnn_r50_fpn_shapes'))
COCO_PAIRS = config_pairs('dk', ('faster-rcnn_r50_fpn_1x_coco', 'faster-rcnn_r101_fpn_1x_coco'))


def load(directory, name):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', directory, name + '.py'))
    cfg.model.backbone.init_cfg = None  # from scratch
    return cfg


@functools.lru_cache(maxsize=None)
def rigid_coco_backbone(name):
    return build_with_seed(load('dk', name).model.backbone)


def test_every_variant_config_is_paired():
    # Faster R-CNN: DK, global DK, DK + DCN, CondConv; Mask R-CNN: the three DK variants.
    assert len(SHAPES_PAIRS) == 4 + 3 and len(COCO_PAIRS) == 4 * 2


@pytest.mark.parametrize('rigid_name,variant_name', SHAPES_PAIRS,
                         ids=[variant for _, variant in SHAPES_PAIRS])
def test_shapes_variant_is_its_rigid_twin_at_step_0(rigid_name, variant_name):
    init_default_scope('mmdet')
    rigid = build_with_seed(load('shapes', rigid_name).model)
    variant = build_with_seed(load('shapes', variant_name).model)
    # The whole detector, not only the backbone: every layer after a DK one drew the same numbers.
    assert_starts_as_rigid(variant, rigid)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for rigid_level, variant_level in zip(rigid.extract_feat(image),
                                              variant.extract_feat(image)):
            torch.testing.assert_close(variant_level, rigid_level, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('rigid_name,variant_name', COCO_PAIRS,
                         ids=[variant for _, variant in COCO_PAIRS])
def test_coco_variant_backbone_is_its_rigid_twin_at_step_0(rigid_name, variant_name):
    rigid = rigid_coco_backbone(rigid_name)
    variant = build_with_seed(load('dk', variant_name).model.backbone)
    assert_starts_as_rigid(variant, rigid)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for rigid_level, variant_level in zip(rigid(image), variant(image)):
            torch.testing.assert_close(variant_level, rigid_level, rtol=1e-4, atol=1e-5)


def test_dkdcnv2_backbone_is_its_rigid_twin_at_half_scale():
    init_default_scope('mmdet')
    cfg = load('shapes', 'faster-rcnn_r50_fpn_shapes').model.backbone
    rigid = build_with_seed(cfg)
    cfg.update(dcn=dict(type='DKDCNv2', fallback_on_stride=False),
               stage_with_dcn=(False, True, True, True))
    variant = build_with_seed(cfg)
    assert_starts_as_rigid(variant, rigid)
    block_input = torch.randn(1, rigid.layer2[0].conv2.in_channels, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(variant.layer2[0].conv2(block_input),
                                   0.5 * rigid.layer2[0].conv2(block_input),
                                   rtol=1e-4, atol=1e-6)


def test_resnet_with_conv_cfg_dk_everywhere_is_its_rigid_twin():
    """conv_cfg reaches the stem, every 1x1 and 3x3 and the downsample convs (a plain
    nn.Sequential, whose DK layers no init_weights reaches)."""
    init_default_scope('mmdet')
    cfg = load('shapes', 'faster-rcnn_r50_fpn_shapes').model.backbone
    rigid = build_with_seed(cfg)
    cfg.conv_cfg = dict(type='DK')
    variant = build_with_seed(cfg)
    assert isinstance(variant.layer1[0].downsample[0], dk_mmdet.DKConv2d)
    assert_starts_as_rigid(variant, rigid)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for rigid_level, variant_level in zip(rigid(image), variant(image)):
            torch.testing.assert_close(variant_level, rigid_level, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('layer_type', ('DK', 'DKGlobal', 'DKDCN', 'DKDCNv2'))
def test_every_offset_generator_is_zero_after_init_weights(layer_type):
    """conv_cfg in the backbone and in the neck's ConvModules (whose init_weights never calls
    the conv's own)."""
    init_default_scope('mmdet')
    cfg = load('shapes', 'faster-rcnn_r50_fpn_shapes').model
    cfg.backbone.conv_cfg = dict(type=layer_type)
    cfg.neck.conv_cfg = dict(type=layer_type)
    model = build_with_seed(cfg)
    layers = [m for m in model.modules() if isinstance(m, VARIANT_LAYERS)]
    assert any(name.startswith('neck.') for name, m in model.named_modules()
               if isinstance(m, VARIANT_LAYERS))
    assert len(layers) > 50
    for layer in layers:
        for name in layer.offset_generator_names:
            for parameter in getattr(layer, name).parameters():
                assert torch.count_nonzero(parameter) == 0
    # The neck's DK layers keep the FPN's Xavier init of their rigid kernel (the ConvModule
    # re-init is skipped for layers with init_weights): drawn, not left at construction.
    lateral = model.neck.lateral_convs[0].conv
    kernel = lateral.rigid_kernel()
    fan_in, fan_out = kernel.shape[1] * kernel[0, 0].numel(), kernel.shape[0] * kernel[0, 0].numel()
    xavier_bound = (6 / (fan_in + fan_out)) ** 0.5
    assert kernel.abs().max() <= xavier_bound * (1 + 1e-5)
    assert kernel.abs().max() > 0.8 * xavier_bound


# ------------------------------------------------------------------ the depthwise detectors
DEPTHWISE_PAIRS = [
    *[('rtmdet_tiny_8xb32-300e_coco', f'rtmdet_tiny-{tag}_8xb32-300e_coco')
      for tag in ('dk-dw', 'dk-global-dw', 'dk-dconv-dw')],
    ('rtmdet_s_8xb32-300e_coco', 'rtmdet_s-dk-dw_8xb32-300e_coco'),
    ('ssdlite_mobilenetv2-scratch_8xb24-600e_coco',
     'ssdlite_mobilenetv2-dk-dw-scratch_8xb24-600e_coco'),
]


def depthwise_detector(name, backbone_init):
    """The detector of configs/dk/``name`` from scratch: with the backbone's own init_cfg
    (CSPNeXt's Kaiming in place of RTMDet's ImageNet weights; SSDLite's truncated normal), or
    with none, so that mmcv ConvModule's init of each conv is its last."""
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'dk', name + '.py'))
    backbone = cfg.model.backbone
    if backbone_init == 'none':
        backbone.init_cfg = None
    elif backbone.init_cfg.type == 'Pretrained':
        backbone.pop('init_cfg')
    return build_with_seed(cfg.model)


@pytest.mark.parametrize('backbone_init', ('scratch_init_cfg', 'none'))
@pytest.mark.parametrize('rigid_name,variant_name', DEPTHWISE_PAIRS,
                         ids=[variant for _, variant in DEPTHWISE_PAIRS])
def test_depthwise_detector_is_its_rigid_twin_at_step_0(rigid_name, variant_name, backbone_init):
    rigid = depthwise_detector(rigid_name, backbone_init)
    variant = depthwise_detector(variant_name, backbone_init)
    assert any(isinstance(module, DK_MODULES) for module in variant.modules())
    # The whole detector: the neck and head, built and initialised after the backbone, drew
    # the same numbers.
    assert_starts_as_rigid(variant, rigid)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for rigid_level, variant_level in zip(rigid.extract_feat(image),
                                              variant.extract_feat(image), strict=True):
            torch.testing.assert_close(variant_level, rigid_level, rtol=1e-4, atol=1e-5)
