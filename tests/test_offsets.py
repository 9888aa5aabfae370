"""dk_mmdet/offsets.py and tools/analysis_tools/offset_magnitudes.py: the offsets each layer type
generates, the length of a tap's move, and its mean per stage over a detector's images."""
import csv
import glob
import os.path as osp

import pytest
import torch
from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
from mmcv.transforms import Compose
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

import dk_ops
from dk_mmdet.layers import DKDCNv2Conv2d
from dk_mmdet.offsets import generated_offsets, offset_magnitudes, stage_of, tap_moves
from tool_modules import load_tool
from work_dir_fixtures import REPO_ROOT
from tools.data.make_shapes import generate

offset_tool = load_tool('analysis_tools/offset_magnitudes.py')
DK_CONFIG = osp.join(REPO_ROOT, 'configs', 'shapes', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes.py')


def set_generator(conv, dy, dx):
    """A generator whose every tap moves by (dy, dx), whatever the input (a DCNv2 mask, after
    the offsets, gets values too)."""
    channels = conv.bias.numel()
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([dy, dx]).repeat((channels + 1) // 2)[:channels])


def test_a_taps_move_is_the_length_of_its_dy_dx_pair():
    offsets = torch.zeros(1, 4, 2, 2)  # two taps
    offsets[0, 0:2, 0, 0] = torch.tensor([3.0, 4.0])
    offsets[0, 2:4, 1, 1] = torch.tensor([-0.6, 0.8])
    moves = tap_moves(offsets)
    assert moves.shape == (1, 2, 2, 2)
    assert moves[0, 0, 0, 0] == 5 and moves[0, 1, 1, 1] == pytest.approx(1.0)
    assert moves.sum() == pytest.approx(6.0)
    assert tap_moves(torch.tensor([[0.0, -2.0, 1.0, 0.0]])).tolist() == [[2.0, 1.0]]  # global


def test_each_layer_type_generates_its_own_kinds():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 7)
    dk = dk_ops.DeformKernel2d(8, 8, 3, padding=1, kernel_offset_groups=2)
    assert set(generated_offsets(dk, x)) == {'kernel'}
    assert generated_offsets(dk, x)['kernel'].shape == (2, 36, 7, 7)
    assert generated_offsets(dk_ops.GlobalDeformKernel2d(8, 8, 3, padding=1), x)[
        'kernel'].shape == (2, 18)
    dk_dcn = DKDCNv2Conv2d(8, 8, 3, padding=1, deform_groups=2)
    both = generated_offsets(dk_dcn, x)
    assert list(both) == ['kernel', 'data'] and both['data'].shape == (2, 36, 7, 7)  # no mask
    for dcn in (DeformConv2dPack(8, 8, 3, padding=1), ModulatedDeformConv2dPack(8, 8, 3,
                                                                                 padding=1)):
        assert generated_offsets(dcn, x)['data'].shape == (2, 18, 7, 7)
    with pytest.raises(TypeError, match='Conv2d generates no offsets'):
        generated_offsets(nn.Conv2d(8, 8, 3), x)


class TwoStageBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer2 = nn.Sequential(dk_ops.DeformKernel2d(4, 4, 3, padding=1))
        self.layer4 = nn.Sequential(DKDCNv2Conv2d(4, 4, 3, padding=1))


def test_magnitudes_are_means_per_stage_and_kind():
    model = nn.Module()
    model.backbone = TwoStageBackbone()
    set_generator(model.backbone.layer2[0].kernel_offset_conv, 0.3, 0.4)
    set_generator(model.backbone.layer4[0].kernel_offset_conv, 0.0, -2.0)
    set_generator(model.backbone.layer4[0].data_offset_conv, 6.0, 8.0)  # DCNv2: mask too
    magnitudes = offset_magnitudes(model, lambda image: model.backbone.layer4(
        model.backbone.layer2(image)), [torch.randn(1, 4, 5, 5), torch.randn(1, 4, 3, 3)])
    assert magnitudes == pytest.approx({('c3', 'kernel'): 0.5, ('c5', 'kernel'): 2.0,
                                        ('c5', 'data'): 10.0})
    with pytest.raises(ValueError, match='a rigid model has no offsets'):
        offset_magnitudes(nn.Module(), lambda image: None, [])
    assert stage_of('backbone.layer3.1.conv2') == 'c4'
    with pytest.raises(ValueError, match='neck.conv is in no ResNet stage'):
        stage_of('neck.conv')


def test_the_tool_averages_every_dk_layer_of_a_detector(tmp_path):
    generate(str(tmp_path / 'shapes'), num_train=1, num_val=2, num_hard=0, img_size=64,
             seed=1, min_objects=1, max_objects=2)
    images, ann = str(tmp_path / 'shapes' / 'val'), str(
        tmp_path / 'shapes' / 'annotations' / 'instances_val.json')
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DK_CONFIG).model).eval()
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, dk_ops.DeformKernel2d)}
    for module in layers.values():
        with torch.no_grad():
            module.kernel_offset_conv.weight.normal_(std=0.5)
    checkpoint = str(tmp_path / 'dk.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    rows = offset_tool.main([DK_CONFIG, checkpoint, '--images', images, '--ann', ann,
                             '--names', 'DK', '--out', str(tmp_path / 'offsets.csv')])

    # By hand: every DK layer's generator on what it received, (dy, dx) lengths averaged.
    sums, counts = {}, {}
    hooks = []
    for name, module in layers.items():
        def hook(layer, args, stage=name.split('.')[1]):
            offsets = layer.kernel_offset_conv(args[0])
            moves = (offsets[:, 0::2] ** 2 + offsets[:, 1::2] ** 2).sqrt()
            sums[stage] = sums.get(stage, 0) + moves.sum().item()
            counts[stage] = counts.get(stage, 0) + moves.numel()
        hooks.append(module.register_forward_pre_hook(hook))
    pipeline = Compose([step for step in Config.fromfile(DK_CONFIG).test_dataloader.dataset.pipeline
                        if step['type'] != 'LoadAnnotations'])  # the images alone
    for path in glob.glob(osp.join(images, '*.png')):
        data = pipeline(dict(img_path=path, img_id=0))
        with torch.no_grad():
            batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                                 data_samples=[data['data_samples']]), False)
            model.extract_feat(batch['inputs'])
    for handle in hooks:
        handle.remove()
    expected = {stage: sums[stage] / counts[stage] for stage in sums}
    assert [(row['stage'], row['kind']) for row in rows] == [
        ('c3', 'kernel'), ('c4', 'kernel'), ('c5', 'kernel')]
    for row, stage in zip(rows, ('layer2', 'layer3', 'layer4')):
        assert float(row['mean_move']) == pytest.approx(expected[stage], abs=1e-3)
        assert float(row['mean_move']) > 0.01 and row['images'] == 2
    with open(tmp_path / 'offsets.csv') as f:
        assert len(list(csv.DictReader(f))) == 3
