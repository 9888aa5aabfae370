"""DK layers inside mmdet's ResNet/ResNeXt: which convs they replace, and rigid weights."""
import pytest
import torch
from mmdet.models.backbones import ResNet, ResNeXt
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint, save_checkpoint
from torch import nn

from dk_mmdet.config_loading import check_model_config
from dk_mmdet.layers import DKConv2d, DKDCNConv2d, DKDCNv2Conv2d, DKGlobalConv2d
from mmdet_fixtures import CONFIG_DIR

LAYER_TYPES = {
    'DK': DKConv2d,
    'DKGlobal': DKGlobalConv2d,
    'DKDCN': DKDCNConv2d,
    'DKDCNv2': DKDCNv2Conv2d,
}
# Types whose zero-offset output is the rigid convolution (DKDCNv2's initial mask halves it).
RIGID_AT_INIT = ('DK', 'DKGlobal', 'DKDCN')
RES_LAYERS = ('layer1', 'layer2', 'layer3', 'layer4')


def randomise_batch_norm_statistics(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


@pytest.mark.parametrize('layer_type', LAYER_TYPES)
def test_stage_with_dcn_replaces_exactly_the_bottleneck_conv2(layer_type):
    stage_with_dcn = (False, True, False, True)
    model = ResNet(depth=50, base_channels=16,
                   dcn=dict(type=layer_type, fallback_on_stride=False),
                   stage_with_dcn=stage_with_dcn)
    expected = {f'{layer}.{index}.conv2'
                for layer, with_dcn, blocks in zip(RES_LAYERS, stage_with_dcn, (3, 4, 6, 3))
                if with_dcn for index in range(blocks)}
    replaced = {name for name, module in model.named_modules()
                if isinstance(module, LAYER_TYPES[layer_type])}
    assert replaced == expected
    # Everything else (outside the replaced layers, whose offset generators are convs of their
    # own) stays a rigid conv; the first block of a stage keeps its stride.
    for name, module in model.named_modules():
        inside_replaced = name.rsplit('.', 1)[0] in expected
        if name not in expected and not inside_replaced and 'conv' in name.split('.')[-1]:
            assert type(module) is nn.Conv2d, name
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer4[1].conv2.stride == (1, 1)
    assert model.layer2[0].conv2.weight.shape == (32, 32, 4, 4)

    rigid = ResNet(depth=50, base_channels=16)
    x = torch.randn(1, 3, 64, 64)
    assert [f.shape for f in model(x)] == [f.shape for f in rigid(x)]


def test_resnext_groups_reach_the_dk_layer():
    model = ResNeXt(depth=50, groups=8, base_width=4, base_channels=32,
                    dcn=dict(type='DK', fallback_on_stride=False),
                    stage_with_dcn=(False, False, True, False))
    conv2 = model.layer3[0].conv2
    assert type(conv2) is DKConv2d and conv2.groups == 8
    assert conv2.weight.shape == (conv2.out_channels, conv2.in_channels // 8, 4, 4)
    assert type(model.layer2[0].conv2) is nn.Conv2d and model.layer2[0].conv2.groups == 8
    rigid = ResNeXt(depth=50, groups=8, base_width=4, base_channels=32)
    x = torch.randn(1, 3, 64, 64)
    assert [f.shape for f in model(x)] == [f.shape for f in rigid(x)]


def test_conv_cfg_makes_every_conv_a_dk_layer():
    model = ResNet(depth=50, base_channels=16, conv_cfg=dict(type='DK'))
    convs = [module for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, DKConv2d)) and 'offset' not in name]
    # stem 7x7, and per block conv1, conv2, conv3 (+ the downsample 1x1 of the first block)
    assert len(convs) == 1 + 3 * 16 + 4
    assert all(type(conv) is DKConv2d for conv in convs)
    assert model.conv1.weight.shape[-2:] == (8, 8)
    assert model(torch.randn(1, 3, 64, 64))[-1].shape == (1, 512, 2, 2)


@pytest.mark.parametrize('layer_type', RIGID_AT_INIT)
def test_dk_resnet_from_a_rigid_state_dict_computes_the_same_features(layer_type):
    torch.manual_seed(0)
    rigid = ResNet(depth=50, base_channels=16)
    rigid.init_weights()
    randomise_batch_norm_statistics(rigid)
    dk = ResNet(depth=50, base_channels=16, dcn=dict(type=layer_type),
                stage_with_dcn=(False, True, True, True))
    incompatible = dk.load_state_dict(rigid.state_dict(), strict=False)
    assert not incompatible.unexpected_keys
    assert all('offset' in key for key in incompatible.missing_keys)

    x = torch.randn(2, 3, 64, 64)
    rigid.eval()
    dk.eval()
    with torch.no_grad():
        for dk_features, rigid_features in zip(dk(x), rigid(x)):
            torch.testing.assert_close(dk_features, rigid_features, rtol=1e-4, atol=1e-4)


def test_pretrained_init_cfg_maps_rigid_weights(tmp_path):
    torch.manual_seed(0)
    rigid = ResNet(depth=50, base_channels=16)
    rigid.init_weights()
    randomise_batch_norm_statistics(rigid)
    checkpoint = str(tmp_path / 'rigid_resnet.pth')
    torch.save(rigid.state_dict(), checkpoint)
    dk = ResNet(depth=50, base_channels=16, dcn=dict(type='DK'),
                stage_with_dcn=(False, True, True, True),
                init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    dk.init_weights()

    x = torch.randn(1, 3, 64, 64)
    rigid.eval()
    dk.eval()
    with torch.no_grad():
        torch.testing.assert_close(dk(x)[-1], rigid(x)[-1], rtol=1e-4, atol=1e-4)


def test_dk_detector_loaded_from_a_rigid_checkpoint_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        models = {}
        for name in ('faster-rcnn_r50_fpn_1x_coco.py', 'faster-rcnn_r50-dk-c3-c5_fpn_1x_coco.py'):
            cfg = Config.fromfile(f'{CONFIG_DIR}/{name}')
            cfg.model.backbone.init_cfg = None
            # An untrained head scores about 1/81 per class: keep every detection.
            cfg.model.test_cfg.rcnn.score_thr = 0.0
            models[name] = MMDET_MODELS.build(cfg.model)
            models[name].init_weights()
        rigid, dk = models.values()
        randomise_batch_norm_statistics(rigid)
        checkpoint = str(tmp_path / 'rigid_detector.pth')
        save_checkpoint(rigid.state_dict(), checkpoint)
        load_checkpoint(dk, checkpoint)  # what load_from does

        rigid.eval()
        dk.eval()
        data = rigid.data_preprocessor(demo_mm_inputs(batch_size=1, image_shapes=(3, 96, 96)))
        with torch.no_grad():
            for dk_level, rigid_level in zip(dk.extract_feat(data['inputs']),
                                             rigid.extract_feat(data['inputs'])):
                torch.testing.assert_close(dk_level, rigid_level, rtol=1e-4, atol=1e-4)
            rigid_result = rigid.predict(data['inputs'], data['data_samples'])[0].pred_instances
            dk_result = dk.predict(data['inputs'], data['data_samples'])[0].pred_instances
    assert len(rigid_result) > 0
    torch.testing.assert_close(dk_result.bboxes, rigid_result.bboxes, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dk_result.scores, rigid_result.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(dk_result.labels, rigid_result.labels)


def test_dcn_on_basic_block_resnet_is_a_clear_error():
    model_cfg = dict(type='FasterRCNN',
                     backbone=dict(type='ResNet', depth=18, dcn=dict(type='DK'),
                                   stage_with_dcn=(False, True, True, True)))
    with pytest.raises(ValueError, match=r'model\.backbone: dcn=.*DK.*ResNet depth=18 is built '
                       r'from BasicBlocks, which take no dcn'):
        check_model_config(model_cfg)
    # Without stages that use it, or on a Bottleneck ResNet, the same dcn is fine.
    check_model_config(dict(backbone=dict(type='ResNet', depth=18, dcn=dict(type='DK'))))
    check_model_config(dict(backbone=dict(type='ResNet', depth=50, dcn=dict(type='DK'),
                                          stage_with_dcn=(False, True, True, True))))
