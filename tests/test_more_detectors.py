"""DK beyond Faster/Mask R-CNN R-50/101: RetinaNet, Cascade Mask R-CNN, ResNeXt-101, the FPN.

Each config is mmdet's own with a short diff, checked against mmdet's config (and mmdet's DCN
config where mmdet has one); the full-size model has the expected convs; and a thin copy of the
model trains one optimizer step on a 96x96 image, with finite losses, changing every parameter
of the conv2 in c3-c5 and of every DK layer.
"""
import math
import os.path as osp

import mmdet
import pytest
import torch
from mmcv.cnn import build_conv_layer
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from torch import nn

from dk_mmdet.layers import DKConv2d, DKDCNConv2d, DKGlobalConv2d
from dk_mmdet.mmcv_dcn import ZeroOffsetDeformConv2dPack
from mmdet_fixtures import CONFIG_DIR

# config stem -> mmdet's config that the stem's configs change
MMDET_CONFIGS = {
    'retinanet_r50': 'retinanet/retinanet_r50_fpn_1x_coco.py',
    'cascade-mask-rcnn_r50': 'cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
    'faster-rcnn_x101-32x4d': 'faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py',
}
# mmdet's own DCN c3-c5 config of a stem, where mmdet has one
MMDET_DCN_CONFIGS = {
    'cascade-mask-rcnn_r50': 'dcn/cascade-mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py',
    'faster-rcnn_x101-32x4d': 'dcn/faster-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco.py',
}
# conv tag in the file name -> class of the 3x3 conv2 of the Bottlenecks in c3-c5
CONV2_CLASSES = {
    None: nn.Conv2d,
    'dconv': ZeroOffsetDeformConv2dPack,
    'dk': DKConv2d,
    'dk-global': DKGlobalConv2d,
    'dk-dconv': DKDCNConv2d,
}
DK_CLASSES = (DKConv2d, DKGlobalConv2d, DKDCNConv2d)
# config file -> (stem, conv tag)
BACKBONE_CONFIGS = {
    f'{stem}{"" if conv is None else f"-{conv}-c3-c5"}_fpn_1x_coco.py': (stem, conv)
    for stem in MMDET_CONFIGS for conv in CONV2_CLASSES
}
FPN_DK_CONFIG = 'faster-rcnn_r50_fpn-dk_1x_coco.py'
CONFIGS = {**BACKBONE_CONFIGS, FPN_DK_CONFIG: ('faster-rcnn_r50', None)}
# backbone of a stem -> (conv2 groups, blocks per stage, channels of c5's conv2 at full size)
BACKBONES = {'r50': (1, (3, 4, 6, 3), 512), 'x101-32x4d': (32, (3, 4, 23, 3), 1024)}
R50_IMAGENET_URL = 'https://download.pytorch.org/models/resnet50-0676ba61.pth'
NUM_CLASSES = 3


def load(config_file):
    return Config.fromfile(osp.join(CONFIG_DIR, config_file))


def load_mmdet(config_path):
    """mmdet's config file, from the installed package, where 'mmdet::' points."""
    return Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', config_path))


def without_scope(value):
    """``value`` without the ``_scope_`` keys that mmengine adds to every dict inherited
    through 'mmdet::'; tuples as lists."""
    if isinstance(value, dict):
        return {key: without_scope(item) for key, item in value.items() if key != '_scope_'}
    if isinstance(value, (list, tuple)):
        return [without_scope(item) for item in value]
    return value


def flatten(tree, prefix=''):
    """{dotted key: leaf} of a config dict; lists (pipelines, cascade stages) are leaves."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[prefix + key] = value
    return flat


# The parts of a config that ours may change.
SECTIONS = ('custom_imports', 'model.backbone.init_cfg', 'model.backbone.dcn',
            'model.backbone.stage_with_dcn', 'model.neck.conv_cfg')


def changed_sections(ours, theirs):
    """The SECTIONS in which config ``ours`` differs from ``theirs``; a differing key outside
    them is returned as it is."""
    ours, theirs = (flatten(without_scope(cfg.to_dict())) for cfg in (ours, theirs))
    differing = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
    return {next((section for section in SECTIONS
                  if key == section or key.startswith(section + '.')), key)
            for key in differing}


@pytest.mark.parametrize('config_file', sorted(BACKBONE_CONFIGS))
def test_backbone_config_is_mmdets_with_the_conv_in_c3_c5(config_file):
    stem, conv = BACKBONE_CONFIGS[config_file]
    cfg = load(config_file)
    assert cfg.custom_imports == dict(imports=['dk_mmdet'], allow_failed_imports=False)
    # The R-50 ImageNet weights by URL (mmdet's torchvision:// name imports torchvision);
    # ResNeXt keeps mmdet's open-mmlab:// name, which mmengine maps to a URL by itself.
    is_r50 = stem.endswith('_r50')
    renamed_weights = {'model.backbone.init_cfg'} if is_r50 else set()
    with_conv = {'model.backbone.dcn', 'model.backbone.stage_with_dcn'} if conv else set()
    assert changed_sections(cfg, load_mmdet(MMDET_CONFIGS[stem])) == (
        {'custom_imports'} | renamed_weights | with_conv)
    assert cfg.model.backbone.init_cfg.checkpoint == (
        R50_IMAGENET_URL if is_r50 else 'open-mmlab://resnext101_32x4d')

    if conv == 'dconv' and stem in MMDET_DCN_CONFIGS:
        assert changed_sections(cfg, load_mmdet(MMDET_DCN_CONFIGS[stem])) == (
            {'custom_imports'} | renamed_weights)
    if conv is not None:
        # The same conv as in the Faster R-CNN R-50 row of the table.
        faster_r50 = load(f'faster-rcnn_r50-{conv}-c3-c5_fpn_1x_coco.py').model.backbone
        assert cfg.model.backbone.dcn == faster_r50.dcn
        assert tuple(cfg.model.backbone.stage_with_dcn) == (False, True, True, True)


def test_fpn_dk_config_is_the_rigid_faster_rcnn_with_dk_in_the_neck():
    cfg = load(FPN_DK_CONFIG)
    assert changed_sections(cfg, load('faster-rcnn_r50_fpn_1x_coco.py')) == {'model.neck.conv_cfg'}
    assert cfg.model.neck.conv_cfg == dict(type='DK')


@pytest.mark.parametrize('scope_size, learns_offsets', [(2, False), (None, True)])
def test_a_1x1_dk_learns_offsets_in_its_default_3x3_scope_not_in_a_2x2(scope_size,
                                                                      learns_offsets):
    # Why a 1x1 kernel's default scope is 3x3, not kernel + 1. Its zero-offset tap is the
    # centre of a 2x2 scope, so it reads the four cells with weight 1/4 each: the scope that
    # reproduces the rigid kernel is flat, the gradient of a flat scope is flat (it stays flat
    # after any step), and the tap's gradient along an offset, a difference of cells, is zero.
    options = {} if scope_size is None else dict(scope_size=scope_size)
    torch.manual_seed(0)
    layer = build_conv_layer(dict(type='DK', **options), 8, 4, kernel_size=1)
    x = torch.randn(2, 8, 10, 10)
    (layer(x) * torch.randn(2, 4, 10, 10)).sum().backward()
    offset_gradient = torch.cat([parameter.grad.flatten()
                                 for parameter in layer.kernel_offset_conv.parameters()])
    # relative to the scope's gradient: zero up to float rounding, or of its order
    relative = float(offset_gradient.norm() / layer.weight.grad.norm())
    assert relative > 0.1 if learns_offsets else relative < 1e-6
    if scope_size is None:
        assert layer.scope_size == (3, 3)
    else:
        for flat in (layer.weight.detach(), layer.weight.grad):
            torch.testing.assert_close(flat, flat[..., :1, :1].expand_as(flat))


def build(model_cfg):
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(model_cfg)


def neck_convs(model):
    return [module.conv for module in (*model.neck.lateral_convs, *model.neck.fpn_convs)]


@pytest.mark.parametrize('config_file', sorted(CONFIGS))
def test_full_size_model_has_the_expected_convs(config_file):
    stem, conv = CONFIGS[config_file]
    cfg = load(config_file)
    cfg.model.backbone.init_cfg = None
    # On the meta device: the real shapes, without the memory and the random initialisation.
    with torch.device('meta'):
        model = build(cfg.model)

    groups, blocks_per_stage, c5_channels = BACKBONES[stem.split('_')[1]]
    for stage, blocks in enumerate(blocks_per_stage):
        res_layer = getattr(model.backbone, f'layer{stage + 1}')
        assert len(res_layer) == blocks
        expected = nn.Conv2d if stage == 0 else CONV2_CLASSES[conv]
        for block in res_layer:
            assert type(block.conv2) is expected
            assert block.conv2.groups == groups
    assert model.backbone.layer4[0].conv2.out_channels == c5_channels
    assert model.neck.out_channels == 256

    if config_file == FPN_DK_CONFIG:
        # The 1x1 lateral and the 3x3 output convs, each DK with a 3x3 scope.
        assert {neck_conv.kernel_size for neck_conv in neck_convs(model)} == {(1, 1), (3, 3)}
        for neck_conv in neck_convs(model):
            assert type(neck_conv) is DKConv2d
            # The default scopes: kernel + 1, and 3 for the 1x1 lateral convs.
            default_scope = (3, 3) if neck_conv.kernel_size == (1, 1) else (4, 4)
            assert neck_conv.scope_size == default_scope
    else:
        assert all(type(neck_conv) is nn.Conv2d for neck_conv in neck_convs(model))


def as_list(config_or_list):
    return config_or_list if isinstance(config_or_list, list) else [config_or_list]


def make_thin(cfg):
    """``cfg``'s model at test size: a backbone a quarter as wide, from scratch, thin neck and
    heads, fewer proposals and sampled RoIs. In place."""
    model = cfg.model
    # From scratch the BNs' running statistics are 0 and 1, so in eval mode (mmdet's norm_eval)
    # they normalise nothing: the thin ResNeXt-101's features blow up through its 33 blocks and
    # whole ReLUs die (a c5 conv2 got no gradient). Without the zero-initialised last BN of
    # each residual branch, every conv2 gets a gradient.
    model.backbone.update(base_channels=16, init_cfg=None, norm_eval=False,
                          zero_init_residual=False)
    if model.backbone.type == 'ResNeXt':
        # ResNeXt's conv2 is planes * base_width / base_channels * groups wide: a quarter too.
        model.backbone.base_width = 1
    model.neck.update(in_channels=[64, 128, 256, 512], out_channels=32)
    if model.type == 'RetinaNet':
        model.bbox_head.update(in_channels=32, feat_channels=32, num_classes=NUM_CLASSES)
        return
    model.rpn_head.update(in_channels=32, feat_channels=32)
    roi_head = model.roi_head
    roi_head.bbox_roi_extractor.out_channels = 32
    # Cascade R-CNN has a head and a train_cfg per stage.
    for bbox_head in as_list(roi_head.bbox_head):
        bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=NUM_CLASSES)
    if 'mask_head' in roi_head:
        roi_head.mask_roi_extractor.out_channels = 32
        roi_head.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=NUM_CLASSES)
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=64)
    for stage in as_list(model.train_cfg.rcnn):
        stage.sampler.num = 32


def watched_parameters(model):
    """{name: parameter} of the conv2 of every block in c3-c5 and of every DK layer."""
    prefixes = [f'backbone.layer{stage}.{block}.conv2.' for stage in (2, 3, 4)
                for block in range(len(getattr(model.backbone, f'layer{stage}')))]
    prefixes += [name + '.' for name, module in model.named_modules()
                 if isinstance(module, DK_CLASSES)]
    return {name: parameter for name, parameter in model.named_parameters()
            if name.startswith(tuple(prefixes))}


@pytest.mark.parametrize('config_file', sorted(CONFIGS))
def test_thin_model_trains_one_step(config_file):
    stem, conv = CONFIGS[config_file]
    cfg = load(config_file)
    make_thin(cfg)
    torch.manual_seed(0)
    model = build(cfg.model)
    model.init_weights()

    dk_layers = [module for module in model.modules() if isinstance(module, DK_CLASSES)]
    assert bool(dk_layers) == (config_file == FPN_DK_CONFIG or CONV2_CLASSES[conv] in DK_CLASSES)
    # Each DK layer starts as the rigid conv it replaces: its offset generators at zero.
    for layer in dk_layers:
        for name in layer.offset_generator_names:
            assert all(not parameter.any() for parameter in getattr(layer, name).parameters())
    watched = watched_parameters(model)
    before = {name: parameter.detach().clone() for name, parameter in watched.items()}

    # Without weight decay, a parameter changes only through its gradient.
    cfg.optim_wrapper.optimizer.weight_decay = 0
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    with_mask = stem.startswith('cascade-mask')
    data = demo_mm_inputs(batch_size=1, image_shapes=(3, 96, 96), num_items=[2],
                          num_classes=NUM_CLASSES, with_mask=with_mask)
    model.train()
    with DefaultScope.overwrite_default_scope('mmdet'):
        log_vars = model.train_step(data, optim_wrapper)

    assert all(math.isfinite(value) for value in log_vars.values()), log_vars
    if stem.startswith('retinanet'):
        assert {'loss_cls', 'loss_bbox'} <= log_vars.keys()
    else:
        last_stage = 's2.' if stem.startswith('cascade') else ''
        assert {'loss_rpn_cls', f'{last_stage}loss_cls', f'{last_stage}loss_bbox'} <= (
            log_vars.keys())
        assert (f'{last_stage}loss_mask' in log_vars) == with_mask
    unchanged = [name for name, parameter in watched.items()
                 if torch.equal(parameter.detach(), before[name])]
    assert not unchanged
