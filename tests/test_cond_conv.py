"""CondConv: the mixture formula, its start, rigid-weight loading, mmcv/mmdet integration."""
import glob
import math
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_conv_layer
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict
from torch import nn

from dk_mmdet.cond_conv import CondConv2d

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def reference_cond_conv(layer, x):
    """Per example: routing from the paper's formula, mixed kernel, plain F.conv2d."""
    outputs = []
    for example in x:
        routing = torch.sigmoid(example.mean((1, 2)) @ layer.routing.fc.weight.T +
                                layer.routing.fc.bias)
        kernel = sum(r * w for r, w in zip(routing, layer.weight))
        bias = None if layer.bias is None else sum(r * b for r, b in zip(routing, layer.bias))
        outputs.append(F.conv2d(example[None], kernel, bias, layer.stride, layer.padding,
                                layer.dilation, layer.groups))
    return torch.cat(outputs)


def randomise_routing(layer, scale=0.5):
    with torch.no_grad():
        layer.routing.fc.weight.normal_(std=scale)
        layer.routing.fc.bias.normal_(std=scale)


@pytest.mark.parametrize('options', [
    dict(),
    dict(stride=2, padding=1, bias=True),
    dict(padding=2, dilation=2, groups=2, bias=True),
    dict(kernel_size=(1, 3), padding=(0, 1), groups=4),
])
def test_output_is_the_per_example_mixture(options):
    torch.manual_seed(0)
    options = {'kernel_size': 3, **options}
    layer = CondConv2d(8, 12, num_experts=4, **options).double()
    randomise_routing(layer)
    x = torch.randn(3, 8, 9, 10, dtype=torch.float64)
    expected = reference_cond_conv(layer, x)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    # Examples really get different kernels.
    routing = layer.routing(x)
    assert (routing[0] - routing[1]).abs().max() > 1e-3


def test_gradients_match_the_reference():
    torch.manual_seed(1)
    layer = CondConv2d(4, 6, 3, padding=1, bias=True, num_experts=3).double()
    randomise_routing(layer)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    params = [x, layer.weight, layer.bias, layer.routing.fc.weight, layer.routing.fc.bias]
    ours = torch.autograd.grad((layer(x) * upstream).sum(), params)
    theirs = torch.autograd.grad((reference_cond_conv(layer, x) * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-10)


def test_starts_as_the_convolution_with_the_mean_expert():
    torch.manual_seed(2)
    layer = CondConv2d(6, 5, 3, padding=1, bias=True, num_experts=8)
    x = torch.randn(4, 6, 7, 7) * 3
    # Routing 1/E for any input: sigmoid(-log(E - 1)).
    assert torch.allclose(layer.routing(x), torch.full((4, 8), 1 / 8))
    expected = F.conv2d(x, layer.weight.mean(0), layer.bias.mean(0), padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # The experts differ (by expert_spread of the kernel's RMS), so they can specialise.
    deviation = layer.weight - layer.weight.mean(0)
    relative = deviation.pow(2).mean().sqrt() / layer.weight.mean(0).pow(2).mean().sqrt()
    assert 0.05 < relative < 0.2


def test_rigid_weights_load_into_every_expert():
    torch.manual_seed(3)
    layer = CondConv2d(8, 6, 3, stride=2, padding=1, groups=2, bias=True, num_experts=4)
    rigid = torch.randn(6, 4, 3, 3)
    rigid[0] *= 100  # a filter far larger than the others keeps a relative spread
    bias = torch.randn(6)
    layer.load_state_dict({'weight': rigid, 'bias': bias}, strict=False)
    assert layer.weight.shape == (4, 6, 4, 3, 3)
    assert torch.allclose(layer.weight.mean(0), rigid, rtol=1e-5, atol=1e-4)
    assert torch.equal(layer.bias, bias.expand(4, 6))
    spread = (layer.weight - rigid).pow(2).mean((0, 2, 3, 4)).sqrt()
    filter_rms = rigid.pow(2).mean((1, 2, 3)).sqrt()
    assert torch.allclose(spread / filter_rms, torch.full((6, ), layer.expert_spread),
                          rtol=1e-4)
    x = torch.randn(2, 8, 9, 9)
    expected = F.conv2d(x, rigid, bias, stride=2, padding=1, groups=2)
    assert torch.allclose(layer(x), expected, rtol=1e-4, atol=1e-3)


def test_a_cond_conv_state_dict_loads_unchanged():
    torch.manual_seed(4)
    source = CondConv2d(4, 4, 3, num_experts=3, bias=True)
    randomise_routing(source)
    target = CondConv2d(4, 4, 3, num_experts=3, bias=True)
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def routing_row_gradients(layer):
    x = torch.randn(3, layer.in_channels, 8, 8)
    layer(x).pow(2).sum().backward()
    return layer.routing.fc.weight.grad


def test_spread_experts_break_the_symmetry_that_identical_ones_keep():
    torch.manual_seed(5)
    layer = CondConv2d(4, 4, 3, padding=1, num_experts=4)
    gradients = routing_row_gradients(layer)
    assert (gradients - gradients[0]).abs().max() > 1e-4 * gradients.abs().max()
    # The trap the spread avoids: identical experts, constant routing, identical gradients.
    with torch.no_grad():
        layer.weight.copy_(layer.weight.mean(0).expand_as(layer.weight))
    layer.zero_grad()
    gradients = routing_row_gradients(layer)
    assert torch.allclose(gradients, gradients[0].expand_as(gradients), rtol=1e-5, atol=1e-7)
    assert gradients.abs().max() > 0
    expert_gradients = layer.weight.grad
    assert torch.allclose(expert_gradients, expert_gradients[0].expand_as(expert_gradients))


def test_empty_batch():
    layer = CondConv2d(4, 6, 3, stride=2, padding=1, num_experts=2)
    assert layer(torch.randn(0, 4, 9, 9)).shape == (0, 6, 5, 5)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_experts=1), r'num_experts=1 must be at least 2'),
    (dict(expert_spread=0.0), r'expert_spread=0.0 must be positive'),
    (dict(groups=3), r'in_channels=4 must be divisible by groups=3'),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CondConv2d(4, 6, 3, **kwargs)


def test_bad_input_shape_is_refused():
    layer = CondConv2d(4, 6, 3, num_experts=2)
    with pytest.raises(ValueError, match=r'expects input \(N, 4, H, W\), got \(2, 5, 8, 8\)'):
        layer(torch.randn(2, 5, 8, 8))


@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_registered_with_mmcv_signature(scope):
    with DefaultScope.overwrite_default_scope(scope):
        layer = build_conv_layer(dict(type='CondConv', num_experts=3), 8, 16, 3, stride=2,
                                 padding=1)
        assert MODELS.get('CondConv') is CondConv2d
    assert type(layer) is CondConv2d
    assert layer.bias is None  # mmcv's default
    assert layer.weight.shape == (3, 16, 8, 3, 3)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups) == (8, 16, (3, 3), (2, 2), (1, 1),
                                                             (1, 1), 1)
    module = ConvModule(8, 16, 3, padding=1, conv_cfg=dict(type='CondConv', num_experts=3),
                        norm_cfg=dict(type='BN'))
    assert type(module.conv) is CondConv2d and module.conv.bias is None
    assert module(torch.randn(2, 8, 6, 6)).shape == (2, 16, 6, 6)
    # ConvModule's init leaves the experts close to their mean (a Kaiming init of the 5-d
    # weight would make them independent) and the routing constant.
    experts = module.conv.weight
    relative_spread = (experts - experts.mean(0)).norm() / experts.mean(0).norm() / math.sqrt(3)
    assert relative_spread < 2 * module.conv.expert_spread
    assert torch.allclose(module.conv.routing(torch.randn(1, 8, 4, 4)),
                          torch.full((1, 3), 1 / 3))


def thin_resnet(dcn=None):
    stage_with_dcn = (False, True, True, True) if dcn else (False, ) * 4
    return MODELS.build(dict(type='mmdet.ResNet', depth=50, base_channels=8, dcn=dcn,
                             stage_with_dcn=stage_with_dcn, norm_eval=False))


def torch_loader(module, state_dict):
    result = module.load_state_dict(state_dict, strict=False)
    return result.missing_keys, result.unexpected_keys


def mmengine_loader(module, state_dict):
    # The path of init_cfg=dict(type='Pretrained', ...), which has its own recursion.
    mmengine_load_state_dict(module, state_dict, strict=False, logger='silent')
    keys = set(module.state_dict())
    return sorted(keys - set(state_dict)), sorted(set(state_dict) - keys)


@pytest.mark.parametrize('load', [torch_loader, mmengine_loader])
def test_resnet_from_a_rigid_checkpoint_computes_the_rigid_outputs(load):
    torch.manual_seed(6)
    rigid = thin_resnet()
    rigid.init_weights()
    with torch.no_grad():  # non-trivial residual branches and BN statistics
        for module in rigid.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.normal_(std=0.1)
    cond = thin_resnet(dict(type='CondConv', num_experts=4, fallback_on_stride=False))
    conv2 = cond.layer3[1].conv2
    assert type(conv2) is CondConv2d and conv2.weight.shape == (4, 32, 32, 3, 3)
    missing, unexpected = load(cond, rigid.state_dict())
    # Only the routing is new.
    assert unexpected == []
    assert all('.routing.' in key for key in missing)
    assert len(missing) == 2 * (4 + 6 + 3)
    rigid.eval()
    cond.eval()
    x = torch.randn(2, 3, 64, 64)
    for ours, theirs in zip(cond(x), rigid(x)):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_spread_scales_with_the_kernel():
    # expert_spread is relative: a kernel of all zeros gets identical (zero) experts.
    layer = CondConv2d(2, 2, 1, num_experts=2, expert_spread=0.3)
    experts = layer.experts_around(torch.zeros(2, 2, 1, 1))
    assert torch.equal(experts, torch.zeros(2, 2, 2, 1, 1))
    experts = layer.experts_around(torch.full((2, 2, 1, 1), 2.0))
    # Two experts: the deviations are +d and -d, with RMS 0.3 * 2 per filter.
    assert torch.allclose(experts[0] - 2.0, 2.0 - experts[1])
    assert math.isclose(float((experts[0] - 2.0).pow(2).mean().sqrt()), 0.6, rel_tol=1e-5)


CONDCONV_CONFIGS = sorted(glob.glob(osp.join(REPO_ROOT, 'configs', '*', '*condconv*.py')))


def test_there_are_condconv_configs_for_coco_and_the_quickstart():
    names = {osp.relpath(path, REPO_ROOT) for path in CONDCONV_CONFIGS}
    assert {f'configs/dk/{detector}-rcnn_r{depth}-condconv-c3-c5_fpn_1x_coco.py'
            for detector in ('faster', 'mask') for depth in (50, 101)} <= names
    assert 'configs/shapes/faster-rcnn_r50-condconv-c3-c5_fpn_shapes.py' in names


@pytest.mark.parametrize('config', CONDCONV_CONFIGS, ids=osp.basename)
def test_condconv_configs_put_condconv_in_c3_to_c5(config):
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MODELS.build(cfg.model).backbone
    for stage in range(4):
        expected = nn.Conv2d if stage == 0 else CondConv2d
        blocks = getattr(backbone, f'layer{stage + 1}')
        assert all(type(block.conv2) is expected for block in blocks)
        if stage:
            assert blocks[0].conv2.num_experts == 8
