"""DK in the depthwise convs of mmdet's real-time detectors: RTMDet (CSPNeXt) and SSDLite
(MobileNetV2), through ``conv_cfg`` and the layer types of dk_mmdet/depthwise.py.

- The layer types build DK exactly where the conv is depthwise with a kernel larger than 1,
  a plain nn.Conv2d everywhere else, and in mmcv's ConvModule start as the rigid conv.
- Each config is mmdet's with one ``conv_cfg`` line; at full size (on the meta device) its DK
  layers sit at exactly the rigid model's depthwise convs of the backbone.
- One training step on a small image moves every parameter of every DK layer.
- A rigid RTMDet checkpoint, loaded by the config's own ``init_cfg`` from a torch hub cache,
  gives the DK backbone the rigid backbone's features.
"""
import math
import os.path as osp

import mmdet
import pytest
import torch
from mmcv.cnn import DepthwiseSeparableConvModule, build_conv_layer
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from torch import nn

import dk_mmdet
from dk_ops.weight_mapping import scope_to_rigid
from mmdet_fixtures import CONFIG_DIR, differing_keys, write_hub_checkpoint

LAYER_TYPES = {
    'DKDepthwise': dk_mmdet.DepthwiseDKConv2d,
    'DKGlobalDepthwise': dk_mmdet.DepthwiseDKGlobalConv2d,
    'DKDCNDepthwise': dk_mmdet.DepthwiseDKDCNConv2d,
}
# config file -> (mmdet's config it changes, conv_cfg type or None for the rigid baseline)
CONFIGS = {
    **{f'rtmdet_{size}{tag}_8xb32-300e_coco.py': (f'rtmdet/rtmdet_{size}_8xb32-300e_coco.py',
                                                  layer_type)
       for size in ('tiny', 's')
       for tag, layer_type in (('', None), ('-dk-dw', 'DKDepthwise'),
                               ('-dk-global-dw', 'DKGlobalDepthwise'),
                               ('-dk-dconv-dw', 'DKDCNDepthwise'))},
    'ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py':
        ('ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py', None),
    'ssdlite_mobilenetv2-dk-dw-scratch_8xb24-600e_coco.py':
        ('ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py', 'DKDepthwise'),
}
DK_CONFIGS = sorted(name for name, (_, layer_type) in CONFIGS.items() if layer_type)
# depthwise convs with a spatial kernel in the full-size backbone: one per CSPNeXt block
# (RTMDet-tiny 1+1+1+1 blocks, -s 1+2+2+1), one per MobileNetV2 inverted residual
DEPTHWISE_CONVS = {'rtmdet_tiny': 4, 'rtmdet_s': 6, 'ssdlite_mobilenetv2': 17}
CSPNEXT_TINY_URL = ('https://download.openmmlab.com/mmdetection/v3.0/rtmdet/'
                    'cspnext_rsb_pretrain/cspnext-tiny_imagenet_600e.pth')


def load(config_file):
    return Config.fromfile(osp.join(CONFIG_DIR, config_file))


def load_mmdet(config_path):
    return Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', config_path))


def build(model_cfg):
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(model_cfg)


def is_spatial_depthwise(conv):
    return (conv.groups == conv.in_channels == conv.out_channels
            and max(conv.kernel_size) > 1)


# ------------------------------------------------------------------------------ the layers
@pytest.mark.parametrize('layer_type', LAYER_TYPES)
def test_dk_exactly_where_the_conv_is_depthwise_with_a_spatial_kernel(layer_type):
    cfg = dict(type=layer_type, scope_size=6)
    depthwise = build_conv_layer(cfg, 8, 8, 5, padding=2, groups=8, bias=False)
    assert type(depthwise) is LAYER_TYPES[layer_type]
    assert depthwise.scope_size == (6, 6) and depthwise.groups == 8
    for args, kwargs in (((8, 8, 1), dict(groups=8)),           # depthwise 1x1
                         ((8, 16, 3), dict(groups=8)),          # depthwise with multiplier 2
                         ((8, 8, 3), dict(groups=2)),           # grouped
                         ((8, 8, 3), dict(stride=2, bias=True))):  # dense
        conv = build_conv_layer(cfg, *args, padding=1, **kwargs)
        assert type(conv) is nn.Conv2d, (args, kwargs)
        reference = nn.Conv2d(*args, padding=1, **kwargs)
        assert repr(conv) == repr(reference)


@pytest.mark.parametrize('layer_type', LAYER_TYPES)
def test_a_misspelt_option_fails_at_any_conv(layer_type):
    cfg = dict(type=layer_type, scope_sise=6)
    for args, kwargs in (((8, 8, 5), dict(groups=8)), ((8, 16, 1), {})):
        with pytest.raises(TypeError, match=rf"{layer_type} got unknown option\(s\) "
                                            r"\['scope_sise'\]"):
            build_conv_layer(cfg, *args, **kwargs)


@pytest.mark.parametrize('layer_type', LAYER_TYPES)
def test_in_a_conv_module_the_dk_layer_starts_as_the_rigid_conv(layer_type):
    """ConvModule Kaiming-initialises a rigid conv it builds, but not a conv with its own
    init_weights: the DK layer draws that init itself. A second module after it shows that
    the same random numbers were drawn."""
    models = []
    for conv_cfg in (None, dict(type=layer_type)):
        torch.manual_seed(0)
        models.append(nn.Sequential(
            DepthwiseSeparableConvModule(8, 12, 5, padding=2, conv_cfg=conv_cfg,
                                         norm_cfg=dict(type='BN'), act_cfg=dict(type='SiLU')),
            nn.Conv2d(12, 4, 3)).eval())
    rigid, variant = models
    rigid_depthwise = rigid[0].depthwise_conv.conv
    dk_depthwise = variant[0].depthwise_conv.conv
    assert type(dk_depthwise) is LAYER_TYPES[layer_type]
    torch.testing.assert_close(scope_to_rigid(dk_depthwise.weight.detach(), (5, 5)),
                               rigid_depthwise.weight.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(variant[0].pointwise_conv.conv.weight,
                               rigid[0].pointwise_conv.conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(variant[1].weight, rigid[1].weight, rtol=0, atol=0)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(variant(x), rigid(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ the configs
@pytest.mark.parametrize('config_file', sorted(CONFIGS))
def test_config_is_mmdets_with_one_conv_cfg_line(config_file):
    mmdet_config, layer_type = CONFIGS[config_file]
    cfg = load(config_file)
    assert cfg.custom_imports == dict(imports=['dk_mmdet'], allow_failed_imports=False)
    expected = {'custom_imports'} | ({'model.backbone.conv_cfg'} if layer_type else set())
    sections = {next((section for section in expected if key.startswith(section + '.')), key)
                for key in differing_keys(cfg, load_mmdet(mmdet_config))}
    assert sections == expected
    if layer_type:
        kernel_size = 3 if config_file.startswith('ssdlite') else 5
        options = dict(scope_size=kernel_size + 1, kernel_offset_groups=1)
        if layer_type == 'DKDCNDepthwise':
            options['deform_groups'] = 1
        assert cfg.model.backbone.conv_cfg == dict(type=layer_type, **options)


@pytest.mark.parametrize('config_file', DK_CONFIGS)
def test_full_size_model_has_dk_at_exactly_the_backbones_depthwise_convs(config_file):
    mmdet_config, layer_type = CONFIGS[config_file]
    models = []
    for cfg in (load_mmdet(mmdet_config), load(config_file)):
        cfg.model.backbone.init_cfg = None
        # On the meta device: the real shapes, without the memory and the random init.
        with torch.device('meta'):
            models.append(build(cfg.model))
    rigid, variant = models
    rigid_convs = {name: module for name, module in rigid.named_modules()
                   if isinstance(module, nn.Conv2d)}
    variant_convs = {name: module for name, module in variant.named_modules()
                     if isinstance(module, (nn.Conv2d, dk_mmdet.layers.MMCVConvMixin))
                     and not name.endswith('_offset_conv')}
    assert variant_convs.keys() == rigid_convs.keys()
    dk_names = []
    for name, rigid_conv in rigid_convs.items():
        conv = variant_convs[name]
        if name.startswith('backbone.') and is_spatial_depthwise(rigid_conv):
            assert type(conv) is LAYER_TYPES[layer_type], name
            assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == (
                rigid_conv.kernel_size, rigid_conv.stride, rigid_conv.padding, rigid_conv.groups)
            assert conv.scope_size == tuple(k + 1 for k in conv.kernel_size)
            dk_names.append(name)
        else:
            assert type(conv) is type(rigid_conv), name
    assert len(dk_names) == DEPTHWISE_CONVS[config_file.split('-')[0]]


def make_thin(cfg):
    """The model of ``cfg`` trainable in a test on the CPU, in place: batch norm instead of
    RTMDet's SyncBN (which needs a process group), from scratch."""
    model = cfg.model
    model.backbone.init_cfg = None
    for part in (model.backbone, model.neck, model.bbox_head):
        if part.get('norm_cfg', {}).get('type') == 'SyncBN':
            part.norm_cfg = dict(type='BN')


@pytest.mark.parametrize('config_file', DK_CONFIGS)
def test_one_training_step_moves_every_dk_parameter(config_file):
    cfg = load(config_file)
    make_thin(cfg)
    model = build(cfg.model)
    model.init_weights()
    dk_layers = {name: module for name, module in model.named_modules()
                 if isinstance(module, dk_mmdet.layers.MMCVConvMixin)}
    assert len(dk_layers) == DEPTHWISE_CONVS[config_file.split('-')[0]]
    watched = {f'{name}.{parameter_name}': parameter
               for name, layer in dk_layers.items()
               for parameter_name, parameter in layer.named_parameters()}
    # The scope and every offset generator (weights and biases).
    assert len(watched) >= 3 * len(dk_layers)
    before = {name: parameter.detach().clone() for name, parameter in watched.items()}

    # Without weight decay, a parameter changes only through its gradient.
    cfg.optim_wrapper.optimizer.weight_decay = 0
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    data = demo_mm_inputs(batch_size=2, image_shapes=(3, 96, 96), num_items=[3, 2],
                          num_classes=4)
    model.train()
    with DefaultScope.overwrite_default_scope('mmdet'):
        log_vars = model.train_step(data, optim_wrapper)
    assert all(math.isfinite(value) for value in log_vars.values()), log_vars
    assert 'loss_cls' in log_vars and 'loss_bbox' in log_vars
    unchanged = [name for name, parameter in watched.items()
                 if torch.equal(parameter.detach(), before[name])]
    assert not unchanged


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache in TORCH_HOME; a download raises."""
    def no_download(url, *args, **kwargs):
        raise AssertionError(f'tried to download {url}')

    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)
    return str(tmp_path)


@pytest.mark.parametrize('config_file', [name for name in DK_CONFIGS
                                         if name.startswith('rtmdet_tiny')])
def test_rigid_imagenet_checkpoint_gives_the_rigid_backbone(config_file, torch_home):
    cfg = load(config_file)
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', prefix='backbone.',
                                               checkpoint=CSPNEXT_TINY_URL)
    rigid_cfg = load('rtmdet_tiny_8xb32-300e_coco.py').model.backbone
    rigid_cfg.init_cfg = None
    torch.manual_seed(1)
    rigid = build(rigid_cfg)
    # Batch norms with statistics and affine parameters of their own, so that every layer
    # after a DK one sees features that a wrong kernel would change.
    for module in rigid.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    # The layout of mmdet's CSPNeXt ImageNet checkpoint: a detector-style state dict.
    write_hub_checkpoint(torch_home, CSPNEXT_TINY_URL, {'state_dict': {
        f'backbone.{key}': value for key, value in rigid.state_dict().items()}})

    variant = build(cfg.model.backbone)
    variant.init_weights()
    dk_layers = [module for module in variant.modules()
                 if isinstance(module, dk_mmdet.layers.MMCVConvMixin)]
    assert len(dk_layers) == DEPTHWISE_CONVS['rtmdet_tiny']
    for layer in dk_layers:
        for name in layer.offset_generator_names:
            assert all(not parameter.any() for parameter in getattr(layer, name).parameters())
    rigid.eval()
    variant.eval()
    image = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for level, (ours, theirs) in enumerate(zip(variant(image), rigid(image), strict=True)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * float(theirs.abs().max()),
                                       msg=lambda message: f'level {level}: {message}')
