"""ERF tool: known answers on tiny networks, the spread measures, and the command line."""
import csv
import json
import math
import os.path as osp

import numpy as np
import pytest
import torch
from mmcv.ops import DeformConv2dPack
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

import dk_ops
from dk_mmdet.analysis import unit_index
from tools.analysis_tools import erf
from tools.data.make_shapes import generate

SHAPES_CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'shapes')


def kernel_erf(kernel, image_size, top_left, channel=None):
    """Expected ERF of one conv unit: |sum over output channels of the kernel| summed over the
    input channels, placed with tap (0, 0) at ``top_left`` (rows, cols), dilation 1."""
    taps = kernel.sum(0) if channel is None else kernel[channel]
    magnitude = taps.abs().sum(0)
    expected = torch.zeros(image_size, dtype=kernel.dtype)
    row, col = top_left
    for i in range(kernel.shape[-2]):
        for j in range(kernel.shape[-1]):
            if 0 <= row + i < image_size[0] and 0 <= col + j < image_size[1]:
                expected[row + i, col + j] = magnitude[i, j]
    return expected


def one_layer(module):
    return lambda pixels: module(pixels[None])


@pytest.mark.parametrize('channel', [None, 2])
def test_single_rigid_conv_erf_is_its_kernel(channel):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    pixels = torch.rand(3, 9, 10, dtype=torch.float64) * 255
    units = [(4, 5), (0, 0), (8, 9)]  # inside, and two corners where taps fall in the padding
    maps = erf.erf_maps(one_layer(conv), pixels, units, channel)
    for (row, col), got in zip(units, maps):
        expected = kernel_erf(conv.weight.detach(), (9, 10), (row - 1, col - 1), channel)
        assert torch.allclose(got, expected, atol=1e-12)


def test_strided_dilated_conv_erf_is_its_spread_kernel():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=2, dilation=2).double()
    pixels = torch.rand(3, 15, 15, dtype=torch.float64)
    got, = erf.erf_maps(one_layer(conv), pixels, [(3, 4)])
    magnitude = conv.weight.detach().sum(0).abs().sum(0)
    expected = torch.zeros(15, 15, dtype=torch.float64)
    expected[3 * 2 - 2:3 * 2 - 2 + 5:2, 4 * 2 - 2:4 * 2 - 2 + 5:2] = magnitude
    assert torch.allclose(got, expected, atol=1e-12)


def dk_layer(rigid, scope_size, offset=(0.0, 0.0)):
    """Local DK with the scope ``rigid_to_scope(rigid)`` and the same kernel offset
    (dy, dx) at every tap and location."""
    out_channels, in_channels, k, _ = rigid.shape
    layer = dk_ops.DeformKernel2d(in_channels, out_channels, k, padding=k // 2,
                                  scope_size=scope_size).double()
    with torch.no_grad():
        layer.weight.copy_(dk_ops.rigid_to_scope(rigid, (scope_size, scope_size)))
        layer.kernel_offset_conv.bias.copy_(torch.tensor(offset).repeat(k * k))
    return layer


def test_zero_offset_dk_erf_equals_the_rigid_one():
    torch.manual_seed(2)
    rigid = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    pixels = torch.rand(3, 8, 8, dtype=torch.float64)
    units = [(3, 4), (0, 7)]
    expected = torch.stack([kernel_erf(rigid, (8, 8), (r - 1, c - 1)) for r, c in units])
    for scope_size in (3, 4, 5):
        got = erf.erf_maps(one_layer(dk_layer(rigid, scope_size)), pixels, units)
        assert torch.allclose(got, expected, atol=1e-10), scope_size


def test_integer_kernel_offset_changes_magnitudes_not_support():
    # A 3x3 kernel in a 5x5 scope: tap (i, j) reads scope (i + 1 + dy, j + 1 + dx). The data
    # grid is rigid, so the ERF stays on the same 3x3 pixels; only its values change.
    torch.manual_seed(3)
    scope = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    pixels = torch.rand(3, 9, 9, dtype=torch.float64)
    unit = (4, 4)
    for (dy, dx), window in (((1, 0), scope[..., 2:5, 1:4]), ((-1, 1), scope[..., 0:3, 2:5])):
        layer = dk_layer(torch.zeros(4, 3, 3, 3, dtype=torch.float64), 5, (dy, dx))
        with torch.no_grad():
            layer.weight.copy_(scope)
        got, = erf.erf_maps(one_layer(layer), pixels, [unit])
        assert torch.allclose(got, kernel_erf(window, (9, 9), (3, 3)), atol=1e-10)
    # Taps moved out of the scope read zeros: with dy = 2 the bottom row of taps reads scope
    # row 5, past the last one, and that row of the ERF vanishes.
    layer = dk_layer(torch.zeros(4, 3, 3, 3, dtype=torch.float64), 5, (2, 0))
    with torch.no_grad():
        layer.weight.copy_(scope)
    got, = erf.erf_maps(one_layer(layer), pixels, [unit])
    window = torch.zeros(4, 3, 3, 3, dtype=torch.float64)
    window[..., :2, :] = scope[..., 3:5, 1:4]
    assert torch.allclose(got, kernel_erf(window, (9, 9), (3, 3)), atol=1e-10)
    assert got[5].abs().max() == 0 and got[3:5, 3:6].min() > 0


@pytest.mark.parametrize('implementation', ['dk_ops', 'mmcv'])
def test_integer_data_offset_moves_the_erf(implementation):
    # DCN samples the input at p + (dy, dx): the same kernel magnitudes, moved.
    torch.manual_seed(4)
    rigid = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    dy, dx = 2, -1
    if implementation == 'dk_ops':
        layer = dk_ops.DeformKernelConv2d(3, 4, 3, padding=1, scope_size=3).double()
        generator = layer.data_offset_conv
    else:
        layer = DeformConv2dPack(3, 4, 3, padding=1).double()
        generator = layer.conv_offset
    with torch.no_grad():
        layer.weight.copy_(rigid)
        generator.bias.copy_(torch.tensor([dy, dx], dtype=torch.float64).repeat(9))
    pixels = torch.rand(3, 10, 10, dtype=torch.float64)
    got, = erf.erf_maps(one_layer(layer), pixels, [(4, 5)])
    assert torch.allclose(got, kernel_erf(rigid, (10, 10), (3 + dy, 4 + dx)), atol=1e-10)


def test_normalised_spread_measures():
    single = np.zeros((7, 7))
    single[2, 3] = 5.0
    assert erf.erf_radius(erf.normalise(single), 0.5) == 0.0
    assert erf.centroid(single) == (3.5, 2.5)
    square = np.zeros((7, 7))
    square[1:4, 2:5] = 1.0
    # Centre 1/9, then the four neighbours at distance 1 (5/9), then the corners at sqrt(2).
    assert erf.erf_radius(square, 0.5) == 1.0
    assert erf.erf_radius(square, 5 / 9) == 1.0
    assert math.isclose(erf.erf_radius(square, 0.6), math.sqrt(2))
    assert math.isclose(erf.mass_in_box(square, (2, 1, 5, 3)), 6 / 9)
    assert np.isnan(erf.erf_radius(np.zeros((3, 3)), 0.5))
    assert math.isclose(erf.normalise(square).sum(), 1.0)
    with pytest.raises(ValueError, match='mass=1.5'):
        erf.erf_radius(square, 1.5)


def test_log_log_fit_recovers_a_power_law():
    size = np.array([10.0, 20.0, 40.0, 80.0])
    fit = erf.fit_log_log(size, 3 * size**0.7)
    assert math.isclose(fit['slope'], 0.7) and math.isclose(fit['correlation'], 1.0)
    fit = erf.fit_log_log(size, np.full(4, 5.0))
    assert math.isclose(fit['slope'], 0.0, abs_tol=1e-12) and fit['correlation'] is None
    assert erf.fit_log_log(size, np.array([1.0, np.nan, 0.0, 2.0]))['slope'] is None


def test_unit_index_is_the_nearest_unit():
    # 64x48 input, stride 8: unit i sits at 8i.
    assert unit_index((15.9, 16.0), (8, 6), (64, 48)) == (2, 2)
    assert unit_index((11.9, 12.0), (8, 6), (64, 48)) == (2, 1)
    assert unit_index((47.9, 63.99), (8, 6), (64, 48)) == (7, 5)
    assert unit_index((100.0, -3.0), (8, 6), (64, 48)) == (0, 5)


# --- the command line on thin Faster R-CNNs of configs/shapes ---------------------------------


def build_detector(config_file):
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(SHAPES_CONFIGS, config_file))
    return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    generate(str(root), num_train=1, num_val=3, num_hard=0, img_size=64, seed=0,
             min_objects=1, max_objects=2)
    return dict(images=str(root / 'val'), ann=str(root / 'annotations' / 'instances_val.json'))


@pytest.fixture(scope='module')
def same_function_models(tmp_path_factory):
    """Rigid, DK and CondConv detectors, the last two loaded from the rigid weights."""
    folder = tmp_path_factory.mktemp('models')
    torch.manual_seed(0)
    rigid = build_detector('faster-rcnn_r50_fpn_shapes.py')
    rigid.init_weights()
    with torch.no_grad():  # wake the zero-initialised residual branches, vary the BNs
        for module in rigid.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.normal_(std=0.1)
    models = []
    for name, config in (('rigid', 'faster-rcnn_r50_fpn_shapes.py'),
                         ('dk', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes.py'),
                         ('condconv', 'faster-rcnn_r50-condconv-c3-c5_fpn_shapes.py')):
        model = build_detector(config)
        model.load_state_dict(rigid.state_dict(), strict=False)
        path = str(folder / f'{name}.pth')
        torch.save({'state_dict': model.state_dict()}, path)
        models += [osp.join(SHAPES_CONFIGS, config), path]
    return models, rigid


def read_rows(out):
    with open(osp.join(out, 'erf_objects.csv')) as f:
        return list(csv.DictReader(f))


def test_stem_erf_of_a_detector_is_its_first_kernel(shapes, same_function_models, tmp_path):
    models, rigid = same_function_models
    out = str(tmp_path / 'erf')
    erf.main(models[:2] + ['--images', shapes['images'], '--ann', shapes['ann'], '--layer',
                           'backbone.conv1', '--out', out, '--names', 'rigid'])
    rows = read_rows(out)
    with open(shapes['ann']) as f:
        coco = json.load(f)
    assert len(rows) == len(coco['annotations']) > 0
    # The gradient reaches the raw pixels through the preprocessor: BGR -> RGB, then / std.
    preprocessor = rigid.data_preprocessor
    kernel = rigid.backbone.conv1.weight.detach().double()
    kernel = kernel / preprocessor.std.double().view(1, 3, 1, 1)
    boxes = {ann['id']: ann['bbox'] for ann in coco['annotations']}
    for row in rows:
        maps = np.load(osp.join(out, row['array']))
        got = maps[int(row['array_index'])]
        scale = maps.shape[-1] / 64  # the test pipeline resized the 64x64 image
        x, y, w, h = boxes[int(row['ann_id'])]
        assert math.isclose(float(row['box_x1']), x * scale, rel_tol=1e-5)
        assert math.isclose(float(row['box_y2']), (y + h) * scale, rel_tol=1e-5)
        # The stem (7x7, stride 2, padding 3): the unit nearest to the centre (unit i at 2i),
        # its 7x7 window.
        unit_row = min(math.floor((y + h / 2) * scale / 2 + 0.5), got.shape[0] // 2 - 1)
        unit_col = min(math.floor((x + w / 2) * scale / 2 + 0.5), got.shape[1] // 2 - 1)
        assert (int(row['unit_row']), int(row['unit_col'])) == (unit_row, unit_col)
        expected = kernel_erf(kernel, got.shape, (2 * unit_row - 3, 2 * unit_col - 3)).numpy()
        assert np.allclose(got, expected / expected.sum(), rtol=1e-4, atol=1e-7)
        assert float(row['box_size']) == pytest.approx(math.sqrt(w * h) * scale, rel=1e-5)


def test_zero_offset_dk_and_fresh_condconv_detectors_share_the_rigid_erf(
        shapes, same_function_models, tmp_path):
    models, _ = same_function_models
    out = str(tmp_path / 'erf')
    summary = erf.main(models + ['--images', shapes['images'], '--ann', shapes['ann'],
                                 '--layer', 'backbone.layer3', '--out', out, '--names',
                                 'rigid', 'dk', 'condconv'])
    rows = read_rows(out)
    by_model = {name: [r for r in rows if r['model'] == name] for name in summary['models']}
    assert len(by_model['rigid']) == len(by_model['dk']) == len(by_model['condconv']) > 0
    for reference, dk, cond in zip(by_model['rigid'], by_model['dk'], by_model['condconv']):
        rigid_map = np.load(osp.join(out, reference['array']))[int(reference['array_index'])]
        # The ERF of a layer3 unit reaches beyond one 3x3 window: the DK and CondConv layers
        # of c3 (and the first of c4) are on its path.
        assert (rigid_map > 0).sum() > 100
        for other in (dk, cond):
            other_map = np.load(osp.join(out, other['array']))[int(other['array_index'])]
            # Normalised maps; float32 rounding can flip a ReLU that sits at its threshold,
            # which moves a little of the mass.
            assert np.abs(other_map - rigid_map).sum() < 2e-3
            assert float(other['erf_radius']) == pytest.approx(float(reference['erf_radius']),
                                                               abs=1.5)
    for name in ('rigid', 'dk', 'condconv'):
        entry = summary['models'][name]
        assert entry['objects'] == len(by_model[name])
        assert 0 <= entry['mean_mass_in_box'] <= 1
    for file_name in ('erf_summary.json', 'erf_scale.png', '000000.png'):
        assert osp.isfile(osp.join(out, file_name))


def test_command_line_errors(shapes, same_function_models, tmp_path):
    models, _ = same_function_models
    common = ['--images', shapes['images'], '--ann', shapes['ann'], '--out', str(tmp_path)]
    with pytest.raises(SystemExit):  # odd number of paths
        erf.parse_args(models[:3] + common + ['--layer', 'backbone.layer3'])
    with pytest.raises(KeyError, match="no module 'backbone.layer9'"):
        erf.main(models[:2] + common + ['--layer', 'backbone.layer9'])
    with pytest.raises(TypeError, match='backbone returns tuple, not a feature map'):
        erf.main(models[:2] + common + ['--layer', 'backbone'])
    with pytest.raises(ValueError, match='--channel 9999 is not a channel'):
        erf.main(models[:2] + common + ['--layer', 'backbone.conv1', '--channel', '9999'])
    with pytest.raises(ValueError, match='is not listed in'):
        erf.main(models[:2] + common[2:] + ['--images', __file__, '--layer', 'backbone.conv1'])
