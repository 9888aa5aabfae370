"""ERF tool: known answers on tiny networks, the spread measures, and the command line."""
import csv
import json
import math
import os.path as osp

import matplotlib
import numpy as np
import pytest
import torch
from mmcv.ops import DeformConv2dPack
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from PIL import Image
from torch import nn

import dk_ops
from dk_mmdet import erf, erf_figures
from dk_mmdet.results import erf_slopes
from dk_mmdet.analysis import AnnotatedImage, GroundTruthObject, unit_index
from tools.analysis_tools import erf as erf_tool
from tools.analysis_tools import erf_seeds
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
    erf_tool.main(models[:2] + ['--images', shapes['images'], '--ann', shapes['ann'], '--layer',
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
    summary = erf_tool.main(models + ['--images', shapes['images'], '--ann', shapes['ann'],
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
        erf_tool.parse_args(models[:3] + common + ['--layer', 'backbone.layer3'])
    with pytest.raises(KeyError, match="no module 'backbone.layer9'"):
        erf_tool.main(models[:2] + common + ['--layer', 'backbone.layer9'])
    with pytest.raises(TypeError, match='backbone returns tuple, not a feature map'):
        erf_tool.main(models[:2] + common + ['--layer', 'backbone'])
    with pytest.raises(ValueError, match='--channel 9999 is not a channel'):
        erf_tool.main(models[:2] + common + ['--layer', 'backbone.conv1', '--channel', '9999'])
    with pytest.raises(ValueError, match='is not listed in'):
        erf_tool.main(models[:2] + common[2:] + ['--images', __file__, '--layer', 'backbone.conv1'])


# --- the figures: display scale, half-mass circle, gallery ------------------------------------


def gaussian(size, centre_xy, sigma):
    """exp(-d^2 / (2 sigma^2)) at the pixel centres (col + 0.5, row + 0.5)."""
    rows, cols = np.indices((size, size))
    distance2 = (cols + 0.5 - centre_xy[0])**2 + (rows + 0.5 - centre_xy[1])**2
    return np.exp(-distance2 / (2 * sigma**2))


def test_half_mass_radius_and_levels_of_a_gaussian_and_a_disc():
    sigma = 8.0
    bump = gaussian(121, (60.5, 60.5), sigma)
    assert erf.centroid(bump) == pytest.approx((60.5, 60.5), abs=1e-9)
    # A 2-d Gaussian holds 1 - exp(-r^2 / (2 sigma^2)) within r: half at sigma sqrt(2 ln 2).
    assert erf.erf_radius(bump, 0.5) == pytest.approx(sigma * math.sqrt(2 * math.log(2)),
                                                      abs=0.15)
    assert erf.erf_radius(bump, 0.9) == pytest.approx(sigma * math.sqrt(2 * math.log(10)),
                                                      abs=0.15)
    # The smallest region holding mass m is that circle, on whose edge the Gaussian is 1 - m
    # of its peak.
    for mass in (0.1, 0.5, 0.95):
        assert erf_figures.mass_level(bump, mass) == pytest.approx(1 - mass, abs=0.01)
    # A uniform disc of radius R holds half its mass within R / sqrt(2).
    disc = (gaussian(121, (60.5, 60.5), 1.0) >= math.exp(-30**2 / 2)).astype(float)
    assert erf.erf_radius(disc, 0.5) == pytest.approx(30 / math.sqrt(2), abs=0.15)
    assert erf_figures.mass_level(disc, 0.5) == 1.0


def test_overlay_colours_the_erf_over_the_dimmed_image():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    dimmed = np.repeat(rgb.mean(-1, keepdims=True) / 255 * erf_figures.IMAGE_DIMMING, 3, axis=-1)
    bump = erf.normalise(gaussian(64, (20.0, 40.0), 4.0))
    shown = erf_figures.erf_overlay(rgb, bump)
    assert shown.shape == (64, 64, 3) and 0 <= shown.min() and shown.max() <= 1
    # The hottest 10% of the mass saturates: the top colour of the map, opaque.
    top = np.array(matplotlib.colormaps[erf_figures.COLOUR_MAP](1.0)[:3])
    assert np.allclose(shown[39, 19], top)
    # Inside the half-mass circle every pixel is coloured; beyond the 95% level, none.
    rows, cols = np.indices(bump.shape)
    inside = np.hypot(cols + 0.5 - 20, rows + 0.5 - 40) <= erf.erf_radius(bump, 0.5)
    assert inside.sum() > 20
    assert np.abs(shown - dimmed).sum(-1)[inside].min() > 0.05
    outside = bump < erf_figures.mass_level(bump, erf_figures.DISPLAY_MASS[1])
    assert outside.sum() > 3000 and np.array_equal(shown[outside], dimmed[outside])
    # Nothing to colour: the dimmed image.
    assert np.array_equal(erf_figures.erf_overlay(rgb, np.zeros((64, 64))), dimmed)


def test_gallery_picks_objects_from_small_to_large():
    def image(*sizes):
        return AnnotatedImage('x.png', 0, [GroundTruthObject(i, 'ring', (0, 0, w, h), w * h)
                                           for i, (w, h) in enumerate(sizes)])
    images = [image((10, 10), (90, 90)), image((40, 40), (20, 20), (60, 60))]
    assert erf.gallery_picks(images, 3) == [(0, 0), (1, 0), (0, 1)]
    assert erf.gallery_picks(images, 9) == [(0, 0), (1, 1), (1, 0), (1, 2), (0, 1)]
    assert erf.gallery_picks(images, 1) == [(0, 0)]


def test_gallery_figure_is_small_and_shows_the_erfs(tmp_path):
    rng = np.random.default_rng(1)
    columns = []
    for size, (x, y) in ((12, (30, 30)), (80, (70, 60))):
        rgb = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        box = (x - size / 2, y - size / 2, x + size / 2, y + size / 2)
        items = {}
        for name, sigma in (('narrow', 2.0), ('wide', 6.0)):
            bump = erf.normalise(gaussian(128, (x, y), sigma)).astype(np.float32)
            items[name] = erf.ObjectERF(GroundTruthObject(1, 'ring', (0, 0, 1, 1), 1.0), box,
                                        (0, 0), (x, y), bump, erf.erf_radius(bump, 0.5))
        columns.append(erf_figures.GalleryColumn('x.png', {'narrow': rgb, 'wide': rgb}, items))
    # The crop holds the box and 2.5 times the widest radius, and stays in the image.
    x1, y1, x2, y2 = erf_figures.crop_window(list(columns[0].items.values()), (128, 128))
    assert x2 - x1 == y2 - y1 == pytest.approx(2 * 2.5 * columns[0].items['wide'].radius)
    assert (x1 + x2) / 2 == pytest.approx(30) and (y1 + y2) / 2 == pytest.approx(30)
    x1, y1, x2, y2 = erf_figures.crop_window(list(columns[1].items.values()), (128, 128))
    assert x2 - x1 == pytest.approx(1.2 * 80) and x2 <= 128 and y1 >= 0
    path = str(tmp_path / 'gallery.png')
    erf_figures.draw_erf_grid(path, 'test', columns, 0.5)
    assert 0 < osp.getsize(path) < 300_000
    pixels = np.asarray(Image.open(path).convert('RGB')).astype(int)
    # The saturated top of the colour map shows (up to the 256-colour palette).
    top = np.array(matplotlib.colormaps[erf_figures.COLOUR_MAP](1.0)[:3]) * 255
    assert (np.abs(pixels - top).max(-1) < 12).sum() > 50


# --- the slope over seeds ---------------------------------------------------------------------


def test_slope_per_seed_from_the_objects():
    size = np.array([10.0, 20.0, 40.0, 80.0])
    rows = [dict(model='DK', seed=seed, box_size=s, erf_radius=scale * s**slope)
            for seed, scale, slope in ((0, 2.0, 0.3), (1, 3.0, 0.5)) for s in size]
    rows += [dict(model='rigid', seed=0, box_size=s, erf_radius=4.0) for s in size]
    fits = erf_slopes.slopes_by_seed(rows)
    assert fits['DK'][0]['slope'] == pytest.approx(0.3)
    assert fits['DK'][1]['slope'] == pytest.approx(0.5)
    assert fits['rigid'][0]['slope'] == pytest.approx(0.0, abs=1e-12)


def test_slope_mean_sd_t_interval_and_paired_difference():
    slopes = {'rigid': {0: 0.1, 1: 0.3, 2: 0.2}, 'DK': {0: 0.2, 1: 0.4, 2: 0.6},
              'DCN': {0: 0.5, 1: None, 2: 0.1}, 'broken': {0: None}}
    rigid, dk, dcn = erf_slopes.variant_slopes(slopes, 'rigid')
    # DK: mean 0.4, sd 0.2, 95% interval 0.4 +- t(0.975, 2) 0.2 / sqrt(3), t = 4.303 in tables.
    assert (dk.variant, dk.spread.count) == ('DK', 3)
    assert dk.spread.mean == pytest.approx(0.4) and dk.spread.sd == pytest.approx(0.2)
    half_width = 4.303 * 0.2 / math.sqrt(3)
    assert (dk.low, dk.high) == pytest.approx((0.4 - half_width, 0.4 + half_width), abs=5e-4)
    # Paired by seed: 0.1, 0.1, 0.4, mean 0.2, sd sqrt((0.01 + 0.01 + 0.04) / 2) = sqrt(0.03).
    assert dk.baseline == 'rigid' and dk.difference.pairs == 3
    assert dk.difference.mean == pytest.approx(0.2)
    half_width = 4.303 * math.sqrt(0.03) / math.sqrt(3)
    assert (dk.difference.low, dk.difference.high) == pytest.approx(
        (0.2 - half_width, 0.2 + half_width), abs=5e-4)
    assert rigid.baseline is None and rigid.difference is None
    # A seed without a slope drops out of the summary and of the pairs: 0.4, -0.1.
    assert dcn.spread.count == 2 and dcn.slopes == {0: 0.5, 2: 0.1}
    assert dcn.difference.pairs == 2 and dcn.difference.mean == pytest.approx(0.15)
    # One seed: a mean and nothing else.
    single, = erf_slopes.variant_slopes({'DK': {3: 0.25}})
    assert (single.spread.mean, single.spread.sd, single.low) == (0.25, None, None)
    with pytest.raises(ValueError, match='--baseline rigid: not a --model NAME'):
        erf_slopes.variant_slopes({'DK': {0: 0.1}}, 'rigid')


def test_seeds_pair_by_seed_folder_else_by_order():
    by_folder = erf_slopes.seed_checkpoints([('DK', 'dk.py', 'study/dk/seed2/iter_8.pth'),
                                            ('DK', 'dk.py', 'study/dk/seed0/iter_8.pth'),
                                            ('rigid', 'r.py', 'study/r/seed0/iter_8.pth')])
    assert [(model.variant, model.seed) for model in by_folder] == [('DK', 2), ('DK', 0),
                                                                    ('rigid', 0)]
    by_order = erf_slopes.seed_checkpoints([('DK', 'dk.py', 'a.pth'), ('rigid', 'r.py', 'b.pth'),
                                           ('DK', 'dk.py', 'study/dk/seed7/c.pth')])
    assert [model.seed for model in by_order] == [0, 0, 1]
    with pytest.raises(ValueError, match='are both seed 1'):
        erf_slopes.seed_checkpoints([('DK', 'dk.py', 'x/seed1/a.pth'),
                                    ('DK', 'dk.py', 'y/seed1/b.pth')])


def test_seeds_command_line(shapes, same_function_models, tmp_path):
    models, _ = same_function_models
    rigid, dk = models[:2], models[2:4]
    out = str(tmp_path / 'seeds')
    arguments = ['--images', shapes['images'], '--ann', shapes['ann'], '--layer',
                 'backbone.layer2', '--out', out, '--max-objects', '3', '--gallery-objects', '2']
    results = erf_seeds.main(['--model', 'rigid', *rigid, '--model', 'dk', *dk,
                              '--model', 'rigid', *rigid, '--model', 'dk', *dk,
                              '--baseline', 'rigid'] + arguments)
    rows = read_rows(out)
    assert len(rows) == 4 * 3
    assert {(row['model'], row['seed']) for row in rows} == {
        ('rigid', '0'), ('rigid', '1'), ('dk', '0'), ('dk', '1')}
    # Each seed's slope is the fit of its objects' rows, as the CSV has them.
    by_variant = {result.variant: result for result in results}
    for (variant, seed) in (('rigid', 0), ('dk', 1)):
        mine = [row for row in rows if row['model'] == variant and row['seed'] == str(seed)]
        fit = erf.fit_log_log(np.array([float(row['box_size']) for row in mine]),
                              np.array([float(row['erf_radius']) for row in mine]))
        assert by_variant[variant].slopes[seed] == pytest.approx(fit['slope'])
    # The same checkpoint as both seeds: no spread; the zero-offset DK computes the rigid
    # function, so its difference is close to zero.
    assert by_variant['rigid'].spread.sd == 0 and by_variant['rigid'].low == by_variant[
        'rigid'].high
    assert by_variant['dk'].difference.pairs == 2
    assert abs(by_variant['dk'].difference.mean) < 0.05
    with open(osp.join(out, 'erf_seeds.csv')) as f:
        table = {row['variant']: row for row in csv.DictReader(f)}
    assert table['dk']['baseline'] == 'rigid' and table['dk']['pairs'] == '2'
    assert table['rigid']['mean'] == f'{by_variant["rigid"].spread.mean:.3f}'
    with open(osp.join(out, 'erf_seeds.md')) as f:
        markdown = f.read()
    assert '| dk | 2 |' in markdown and 'minus rigid, paired' in markdown
    assert osp.getsize(osp.join(out, 'erf_gallery.png')) > 0
    with open(osp.join(out, 'erf_seed_slopes.csv')) as f:
        seed_slopes = list(csv.DictReader(f))
    assert len(seed_slopes) == 4
    # in full: the very values the means, sds and intervals are computed from
    for row in seed_slopes:
        assert float(row['slope']) == by_variant[row['variant']].slopes[int(row['seed'])]
    with pytest.raises(SystemExit):
        erf_seeds.parse_args(['--model', 'dk', *dk, '--baseline', 'rigid'] + arguments)
