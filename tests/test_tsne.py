"""t-SNE tool: control units per operator, collection at object centres, the command line."""
import csv
import json
import math
import os.path as osp

import numpy as np
import pytest
import torch
from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
from mmcv.transforms import Compose
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

import dk_ops
from dk_mmdet.cond_conv import CondConv2d
from dk_mmdet.layers import DKDCNv2Conv2d
from tools.analysis_tools import tsne
from tools.data.make_shapes import generate

SHAPES_CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'shapes')


def randomise(module, std=0.1):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=std)


def test_control_units_of_each_operator():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    # Local DK: the kernel-offset conv's output, 2*G*K*K channels per location.
    layer = dk_ops.DeformKernel2d(8, 8, 3, padding=1, kernel_offset_groups=2)
    randomise(layer.kernel_offset_conv)
    units, description = tsne.control_units(layer, x)
    assert description == 'kernel offsets' and units.shape == (2, 36, 9, 9)
    assert torch.equal(units, nn.functional.conv2d(x, layer.kernel_offset_conv.weight,
                                                   layer.kernel_offset_conv.bias, padding=1))
    # Global DK: one clamped offset vector per image.
    layer = dk_ops.GlobalDeformKernel2d(8, 8, 3, padding=1)
    randomise(layer.kernel_offset_fc, std=2.0)
    units, _ = tsne.control_units(layer, x)
    assert units.shape == (2, 18)
    positions = torch.tensor([0.5, 1.5, 2.5]).repeat_interleave(3), \
        torch.tensor([0.5, 1.5, 2.5]).repeat(3)
    coordinates = units.view(2, 9, 2) + torch.stack(positions, -1)
    assert coordinates.min() >= 0 and coordinates.max() <= 3  # clamped to the 4x4 scope
    # DK + DCNv2: kernel offsets, then the data offsets without the mask.
    layer = DKDCNv2Conv2d(8, 8, 3, padding=1, deform_groups=2)
    randomise(layer)
    units, description = tsne.control_units(layer, x)
    assert description == 'kernel offsets + data offsets' and units.shape == (2, 18 + 36, 9, 9)
    assert torch.equal(units[:, :18], layer.kernel_offset_conv(x))
    assert torch.equal(units[:, 18:], layer.data_offset_conv(x)[:, :36])
    # mmcv's DCNv2 generator holds (o1, o2, mask) thirds; its offsets are cat(o1, o2).
    layer = ModulatedDeformConv2dPack(8, 8, 3, padding=1)
    randomise(layer.conv_offset)
    units, description = tsne.control_units(layer, x)
    o1, o2, _ = torch.chunk(layer.conv_offset(x), 3, dim=1)
    assert description == 'data offsets' and torch.equal(units, torch.cat([o1, o2], 1))
    layer = DeformConv2dPack(8, 8, 3, padding=1)
    randomise(layer.conv_offset)
    assert torch.equal(tsne.control_units(layer, x)[0], layer.conv_offset(x))
    # CondConv: sigmoid(Linear(mean over the image)).
    layer = CondConv2d(8, 8, 3, num_experts=4)
    randomise(layer.routing)
    units, description = tsne.control_units(layer, x)
    fc = layer.routing.fc
    assert description == 'routing weights (per image)'
    assert torch.allclose(units, torch.sigmoid(x.mean((2, 3)) @ fc.weight.T + fc.bias))
    with pytest.raises(TypeError, match='Conv2d has no control units; supported layers'):
        tsne.control_units(nn.Conv2d(8, 8, 3), x)


def test_neighbour_agreement_on_clustered_units():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    cluster = np.repeat(np.arange(3), 6)
    units = centres[cluster] + rng.normal(scale=0.1, size=(18, 2))
    classes = [['star', 'ring', 'heart'][c] for c in cluster]
    log_size = np.array([2.0, 3.0, 4.0])[cluster]
    stats = tsne.neighbour_agreement(units, classes, log_size, neighbours=5)
    assert stats['knn_class_accuracy'] == 1.0
    assert stats['knn_log_size_r2'] == pytest.approx(1.0)
    assert stats['majority_class_rate'] == pytest.approx(1 / 3)
    # Classes that the units do not separate: each point's 5 neighbours hold 2 or 3 of its
    # cluster mates, whose labels alternate.
    mixed = [['star', 'ring'][i % 2] for i in range(18)]
    assert tsne.neighbour_agreement(units, mixed, log_size, 5)['knn_class_accuracy'] < 0.7


# --- collection in a detector, against the generators called directly --------------------


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    generate(str(root), num_train=1, num_val=4, num_hard=0, img_size=64, seed=1,
             min_objects=2, max_objects=3)
    return dict(images=str(root / 'val'), ann=str(root / 'annotations' / 'instances_val.json'))


@pytest.fixture(scope='module')
def dynamic_models(tmp_path_factory):
    """DK and CondConv detectors with random (non-zero) generators."""
    folder = tmp_path_factory.mktemp('models')
    init_default_scope('mmdet')
    torch.manual_seed(0)
    models = {}
    for name, config in (('dk', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes.py'),
                         ('condconv', 'faster-rcnn_r50-condconv-c3-c5_fpn_shapes.py')):
        config = osp.join(SHAPES_CONFIGS, config)
        model = MODELS.build(Config.fromfile(config).model)
        for module in model.modules():
            if isinstance(module, dk_ops.DeformKernel2d):
                randomise(module.kernel_offset_conv, std=0.05)
            elif isinstance(module, CondConv2d):
                randomise(module.routing, std=0.5)
        path = str(folder / f'{name}.pth')
        torch.save({'state_dict': model.state_dict()}, path)
        models[name] = (config, path, model.eval())
    return models


def expected_units(model, layer_name, generator, image_path, boxes_xywh):
    """Runs the detector by hand and calls the generator on what the layer received."""
    layer = dict(model.named_modules())[layer_name]
    received = []
    handle = layer.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    data = Compose(TEST_PIPELINE)(dict(img_path=image_path, img_id=0))
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                             data_samples=[data['data_samples']]), False)
        model.extract_feat(batch['inputs'])
        units = generator(layer, received[0])
    handle.remove()
    scale_x, scale_y = data['data_samples'].scale_factor
    rows = []
    for x, y, w, h in boxes_xywh:
        if units.dim() == 2:
            rows.append(units[0])
            continue
        stride = batch['inputs'].shape[-1] / units.shape[-1]
        # unit i sits at i * stride
        row = min(math.floor((y + h / 2) * scale_y / stride + 0.5), units.shape[-2] - 1)
        col = min(math.floor((x + w / 2) * scale_x / stride + 0.5), units.shape[-1] - 1)
        rows.append(units[0, :, row, col])
    return torch.stack(rows).numpy()


TEST_PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 256), keep_ratio=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


@pytest.mark.parametrize('name, layer_name, generator', [
    # a stride-2 DK layer (c4's first block, stride 16) and the last one (stride 32)
    ('dk', 'backbone.layer3.0.conv2', lambda layer, x: layer.kernel_offset_conv(x)),
    ('dk', None, lambda layer, x: layer.kernel_offset_conv(x)),
    ('condconv', 'backbone.layer2.1.conv2',
     lambda layer, x: torch.sigmoid(layer.routing.fc(x.mean((2, 3))))),
])
def test_collected_units_are_the_generator_outputs_at_object_centres(
        shapes, dynamic_models, tmp_path, name, layer_name, generator):
    config, checkpoint, model = dynamic_models[name]
    assert Config.fromfile(config).test_dataloader.dataset.pipeline[1]['scale'] == (256, 256)
    out = str(tmp_path / 'tsne')
    args = [config, checkpoint, '--images', shapes['images'], '--ann', shapes['ann'], '--out',
            out, '--names', name, '--perplexity', '3']
    summary = tsne.main(args + (['--layer', layer_name] if layer_name else []))
    layer_name = layer_name or 'backbone.layer4.2.conv2'
    assert summary['models'][name]['layer'] == layer_name
    with open(osp.join(out, 'objects.csv')) as f:
        objects = list(csv.DictReader(f))
    with open(shapes['ann']) as f:
        coco = json.load(f)
    assert len(objects) == len(coco['annotations']) == summary['objects']
    units = np.load(osp.join(out, f'{name}_units.npy'))
    assert units.shape[0] == len(objects)
    expected = []
    for image in coco['images']:
        anns = [ann for ann in coco['annotations'] if ann['image_id'] == image['id']]
        if anns:
            expected.append(expected_units(model, layer_name, generator,
                                           osp.join(shapes['images'], image['file_name']),
                                           [ann['bbox'] for ann in anns]))
    expected = np.concatenate(expected)
    assert np.allclose(units, expected, rtol=1e-4, atol=1e-6)
    assert summary['models'][name]['mean_abs_unit'] == pytest.approx(np.abs(expected).mean(),
                                                                    rel=1e-4)
    # Object centres fall on different cells, so a location-dependent unit varies.
    assert np.ptp(units, axis=0).max() > 1e-3
    embedding = np.load(osp.join(out, f'{name}_tsne.npy'))
    assert embedding.shape == (len(objects), 2) and np.isfinite(embedding).all()
    assert osp.isfile(osp.join(out, 'tsne.png'))


def test_rigid_model_is_refused(shapes, tmp_path):
    init_default_scope('mmdet')
    config = osp.join(SHAPES_CONFIGS, 'faster-rcnn_r50_fpn_shapes.py')
    model = MODELS.build(Config.fromfile(config).model)
    checkpoint = str(tmp_path / 'rigid.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    with pytest.raises(ValueError, match='a rigid model has no control units'):
        tsne.main([config, checkpoint, '--images', shapes['images'], '--ann', shapes['ann'],
                   '--out', str(tmp_path / 'out')])
