"""tools/analysis_tools/collect_results.py and model_complexity.py.

The work_dirs here are written by the tests in mmengine's layout (a config dump, JSON-lines
scalars, a test-metrics JSON per run), then parsed for real; the MAC handles are checked
against counts worked out by hand from their formulas, and mmengine's own conv count.
"""
import contextlib
import csv
import glob
import importlib.util
import io
import json
import math
import os
import os.path as osp
import shutil
import sys

import numpy as np
import pytest
import torch
from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
from mmengine.config import Config
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

import dk_mmdet

TESTS_DIR = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(TESTS_DIR)
ANALYSIS_DIR = osp.join(REPO_ROOT, 'tools', 'analysis_tools')


def load_tool(name):
    sys.path.insert(0, ANALYSIS_DIR)  # collect_results imports model_complexity by name
    spec = importlib.util.spec_from_file_location(name, osp.join(ANALYSIS_DIR, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


collect_results = load_tool('collect_results')
model_complexity = load_tool('model_complexity')

SHAPES_VAL = 'data/shapes/annotations/instances_val.json'
SHAPES_HARD = 'data/shapes/annotations/instances_test_hard.json'
COCO_VAL = 'data/coco/annotations/instances_val2017.json'


def coco_logged(prefix='coco', task='bbox', first=0.1):
    """CocoMetric's logged keys with values first, first + 0.01, ... (fractions, not %)."""
    suffixes = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')
    logged = {f'{prefix}/{task}_{suffix}': round(first + 0.01 * i, 3)
              for i, suffix in enumerate(suffixes)}
    logged[f'{prefix}/{task}_mAP_copypaste'] = ' '.join(str(v) for v in logged.values())
    return logged


def write_run(work_dir, timestamp, config_text, scalars=(), test_metrics=None):
    """One mmengine run folder: vis_data/config.py, vis_data/scalars.json, <timestamp>.json."""
    run_dir = osp.join(work_dir, timestamp)
    os.makedirs(osp.join(run_dir, 'vis_data'))
    with open(osp.join(run_dir, 'vis_data', 'config.py'), 'w') as f:
        f.write(config_text)
    if scalars:
        with open(osp.join(run_dir, 'vis_data', 'scalars.json'), 'w') as f:
            f.writelines(json.dumps(line) + '\n' for line in scalars)
    if test_metrics is not None:
        with open(osp.join(run_dir, f'{timestamp}.json'), 'w') as f:
            json.dump(test_metrics, f)


def evaluator_config(val_ann=None, test_ann=None):
    lines = []
    if val_ann:
        lines.append(f"val_evaluator = dict(type='CocoMetric', ann_file={val_ann!r})")
    if test_ann:
        lines.append(f"test_evaluator = dict(type='CocoMetric', ann_file={test_ann!r})")
    return '\n'.join(lines) + '\n'


def train_lines(times, start_iter=10):
    return [dict(lr=0.02, loss=1.0, time=t, data_time=0.01, iter=start_iter + 10 * i,
                 step=start_iter + 10 * i) for i, t in enumerate(times)]


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------ reading work_dirs


def test_train_then_tests_on_two_splits(tmp_path):
    work_dir = str(tmp_path / 'faster-rcnn_r50-dk-c3-c5_fpn_shapes')
    # Training with a validation at its end (an older val result), then tests on two splits.
    write_run(work_dir, '20260101_100000', evaluator_config(SHAPES_VAL, SHAPES_VAL),
              scalars=train_lines([3.0, 1.0, 2.0, 5.0, 1.5]) + [
                  dict(coco_logged(first=0.05), step=50)])
    write_run(work_dir, '20260101_110000', evaluator_config(SHAPES_VAL, SHAPES_VAL),
              test_metrics=dict(coco_logged(first=0.2), time=0.1, data_time=0.01))
    write_run(work_dir, '20260101_120000', evaluator_config(SHAPES_VAL, SHAPES_HARD),
              test_metrics=coco_logged(first=0.3))

    out, csv_path = str(tmp_path / 'results.md'), str(tmp_path / 'results.csv')
    text = collect_results.main([work_dir, '--out', out, '--csv', csv_path, '--no-complexity'])

    rows = read_csv(csv_path)
    assert [(row['model'], row['split']) for row in rows] == [
        ('faster-rcnn_r50-dk-c3-c5_fpn_shapes', 'val'),
        ('faster-rcnn_r50-dk-c3-c5_fpn_shapes', 'test_hard')]
    # The newer test result replaces the validation during training; values in %.
    assert [float(rows[0][f'bbox {c}']) for c in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
            ] == pytest.approx([20, 21, 22, 23, 24, 25])
    assert float(rows[1]['bbox AP']) == pytest.approx(30)
    assert float(rows[0]['train s/iter']) == pytest.approx(2.0)  # median of 3, 1, 2, 5, 1.5
    assert rows[0]['params (M)'] == '' and 'segm AP' not in rows[0]
    assert open(out).read() == text
    assert '### val' in text and '### test_hard' in text
    assert '| faster-rcnn_r50-dk-c3-c5_fpn_shapes | 20.0 | 21.0 | 22.0 | 23.0 | 24.0 | 25.0 |' \
        ' n/a | n/a | n/a | 2.00 |' in text


def test_coco_layout_validation_every_epoch_with_masks(tmp_path):
    """A COCO training run as mmdet's 1x configs log it: validation after each epoch."""
    work_dir = str(tmp_path / 'mask-rcnn_r50-dk-c3-c5_fpn_1x_coco')
    scalars = []
    for epoch in (1, 2, 3):
        scalars += train_lines([0.5, 0.7], start_iter=epoch * 1000)
        scalars.append(dict(coco_logged(task='bbox', first=0.1 * epoch),
                            **coco_logged(task='segm', first=0.1 * epoch - 0.05), step=epoch))
    write_run(work_dir, '20260102_000000', evaluator_config(COCO_VAL, COCO_VAL), scalars=scalars)

    csv_path = str(tmp_path / 'results.csv')
    collect_results.main([work_dir, '--out', str(tmp_path / 'r.md'), '--csv', csv_path,
                          '--no-complexity'])
    (row, ) = read_csv(csv_path)
    assert row['split'] == 'val2017'
    assert float(row['bbox AP']) == pytest.approx(30)  # the last epoch's
    assert float(row['segm AP']) == pytest.approx(25)
    assert float(row['segm APl']) == pytest.approx(30)
    assert float(row['train s/iter']) == pytest.approx(0.6)


def test_models_without_an_evaluation_still_get_a_row(tmp_path):
    trained = str(tmp_path / 'trained_only')
    write_run(trained, '20260103_000000', evaluator_config(test_ann=SHAPES_VAL),
              scalars=train_lines([1.0, 3.0]))
    tested = str(tmp_path / 'tested')
    write_run(tested, '20260103_000000', evaluator_config(test_ann=SHAPES_VAL),
              test_metrics=coco_logged())
    csv_path = str(tmp_path / 'results.csv')
    text = collect_results.main([trained, tested, '--out', str(tmp_path / 'r.md'), '--csv',
                                 csv_path, '--no-complexity'])
    rows = read_csv(csv_path)
    assert [(row['model'], row['split']) for row in rows] == [('tested', 'val'),
                                                              ('trained_only', '')]
    assert float(rows[1]['train s/iter']) == pytest.approx(2.0)
    assert rows[1]['bbox AP'] == ''
    assert '### (not evaluated)' in text


def test_a_folder_without_runs_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match='no run of tools/train.py'):
        collect_results.main([str(tmp_path), '--out', str(tmp_path / 'r.md')])


def test_split_names():
    assert collect_results.split_name(dict(ann_file=COCO_VAL)) == 'val2017'
    assert collect_results.split_name(dict(ann_file=SHAPES_HARD)) == 'test_hard'
    assert collect_results.split_name(dict(ann_file='ann/my_split.json')) == 'my_split'
    assert collect_results.split_name(dict(type='CocoMetric')) is None


def test_default_input_size_is_the_test_resize():
    coco = Config.fromfile(osp.join(REPO_ROOT, 'configs/dk/faster-rcnn_r50_fpn_1x_coco.py'))
    assert collect_results.test_input_size(coco) == (800, 1333)
    assert model_complexity.padded_input_shape(coco.model, 800, 1333) == (800, 1344)
    shapes = Config.fromfile(osp.join(REPO_ROOT, 'configs/shapes/faster-rcnn_r50_fpn_shapes.py'))
    assert collect_results.test_input_size(shapes) == (256, 256)


# ------------------------------------------------------------------------------------ MACs


def macs_of(module, x):
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(module.eval(), (x, ))
    analyzer.set_op_handle(**model_complexity.DEFORM_CONV_HANDLES)
    analyzer.unsupported_ops_warnings(False)
    with torch.no_grad():
        total = analyzer.total()
    return total, analyzer.unsupported_ops()


# Geometry of every layer below: 4 -> 8 channels, 3x3 kernel, 6x6 input, padding 1, stride 1,
# batch 1: 36 output locations, 9 taps, scope 4x4 = 16 cells.
LOCATIONS, TAPS, SCOPE, C_IN, C_OUT = 36, 9, 16, 4, 8
RIGID_CONV = LOCATIONS * C_OUT * C_IN * TAPS  # 10368: what mmengine counts for nn.Conv2d


def offset_conv(out_channels):
    """A 3x3 generator conv on the same geometry, counted by mmengine as a plain conv."""
    return LOCATIONS * out_channels * C_IN * TAPS


@pytest.mark.parametrize('layer, expected', [
    # scope-column GEMM + scope scatter (4 corners) + the 18-channel kernel offset conv
    (dk_mmdet.DKConv2d,
     LOCATIONS * C_OUT * C_IN * SCOPE + LOCATIONS * C_IN * TAPS * 4 + offset_conv(18)),
    # kernels from scopes (per image) + their convolution + the offset linear (4 -> 18)
    (dk_mmdet.DKGlobalConv2d, C_OUT * C_IN * TAPS * SCOPE + RIGID_CONV + C_IN * 18),
    # GEMM + 4 scope corners + 4 image corners + the kernel and data offset convs
    (dk_mmdet.DKDCNConv2d, LOCATIONS * C_OUT * C_IN * SCOPE + LOCATIONS * C_IN * TAPS * 8 +
     offset_conv(18) + offset_conv(18)),
    # as DKDCN plus one mask product per sample; the generator has 27 channels
    (dk_mmdet.DKDCNv2Conv2d, LOCATIONS * C_OUT * C_IN * SCOPE + LOCATIONS * C_IN * TAPS * 9 +
     offset_conv(18) + offset_conv(27)),
    # mmcv DCN: GEMM + bilinear im2col, plus its 18-channel offset conv
    (DeformConv2dPack, RIGID_CONV + LOCATIONS * C_IN * TAPS * 4 + offset_conv(18)),
    (ModulatedDeformConv2dPack, RIGID_CONV + LOCATIONS * C_IN * TAPS * 5 + offset_conv(27)),
])
def test_deformable_layer_macs(layer, expected):
    module = layer(C_IN, C_OUT, 3, padding=1)
    total, uncounted = macs_of(module, torch.randn(1, C_IN, 6, 6))
    assert total == expected
    assert not any('deform' in op.lower() for op in uncounted), uncounted


def test_rigid_conv_count_is_mmengines():
    total, _ = macs_of(nn.Conv2d(C_IN, C_OUT, 3, padding=1, bias=False),
                       torch.randn(1, C_IN, 6, 6))
    assert total == RIGID_CONV


def test_macs_scale_with_the_batch():
    total, _ = macs_of(dk_mmdet.DKConv2d(C_IN, C_OUT, 3, padding=1), torch.randn(3, C_IN, 6, 6))
    assert total == 3 * (LOCATIONS * C_OUT * C_IN * SCOPE + LOCATIONS * C_IN * TAPS * 4 +
                         offset_conv(18))


def test_detector_complexity_counts_every_proposal():
    """A real quickstart config: the RoI head's FCs run once per fixed proposal."""
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs/shapes/faster-rcnn_r50_fpn_shapes.py'))
    detector = MODELS.build(cfg.model)
    few = model_complexity.model_complexity(detector, 64, 64, num_proposals=10)
    more = model_complexity.model_complexity(detector, 64, 64, num_proposals=30)
    head = cfg.model.roi_head.bbox_head
    fc_per_roi = (head.in_channels * 7 * 7 * head.fc_out_channels +
                  head.fc_out_channels * head.fc_out_channels +
                  head.fc_out_channels * (head.num_classes + 1) +
                  head.fc_out_channels * head.num_classes * 4)
    assert more['macs'] - few['macs'] == 20 * fc_per_roi
    assert few['params'] == sum(p.numel() for p in detector.parameters())
    assert 'prim::PythonOp.RoIAlignFunction' in few['uncounted_ops']


def test_csv_numbers_have_one_decimal(tmp_path):
    """0.403 * 100 is 40.300000000000004 in floating point: the CSV says 40.3."""
    work_dir = str(tmp_path / 'model')
    write_run(work_dir, '20260104_000000', evaluator_config(test_ann=SHAPES_VAL),
              scalars=train_lines([1.0, 1.2345]), test_metrics=coco_logged(first=0.403))
    csv_path = str(tmp_path / 'results.csv')
    collect_results.main([work_dir, '--out', str(tmp_path / 'r.md'), '--csv', csv_path,
                          '--no-complexity'])
    (row, ) = read_csv(csv_path)
    assert [row[f'bbox {c}'] for c in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')] == [
        '40.3', '41.3', '42.3', '43.3', '44.3', '45.3']
    assert row['train s/iter'] == '1.12'  # median of 1.0 and 1.2345, as the Markdown has it


# -------------------------------------------------------------------------------- seeds

# Two-sided 95% critical value of Student's t with 2 degrees of freedom, as printed in t tables
# (e.g. NIST/SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.2, "Critical values of
# the Student's t distribution": 4.303 in the column for 0.975, row 2).
T_975_DF2 = 4.303


def test_t_quantile():
    t_quantile = collect_results.t_quantile
    assert t_quantile(0.975, 2) == pytest.approx(T_975_DF2, abs=5e-4)
    # closed forms: 1 degree of freedom is Cauchy, tan(pi (p - 1/2)); 2 degrees of freedom
    # invert F(t) = 1/2 + t / (2 sqrt(t^2 + 2)): t = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    # the same tables, 4, 9 and 29 degrees of freedom
    for df, table in ((4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


def model_config(detector='FasterRCNN', test_ann=SHAPES_VAL, outfile_prefix=None):
    evaluator = dict(type='CocoMetric', ann_file=test_ann)
    if outfile_prefix:
        evaluator['outfile_prefix'] = outfile_prefix
    return f"model = dict(type={detector!r})\ntest_evaluator = {evaluator!r}\n"


def write_seeds(model_dir, val_aps, hard_aps=None, detector='FasterRCNN'):
    """seed<k>/ work_dirs with a test run on val (bbox AP val_aps[k], as a fraction; AP50 and
    the rest 0.01, 0.02, ... above it) and, given hard_aps, a later one on test_hard."""
    for k, ap in enumerate(val_aps):
        seed_dir = osp.join(model_dir, f'seed{k}')
        write_run(seed_dir, '20260105_000000', model_config(detector),
                  test_metrics=coco_logged(first=ap))
        if hard_aps is not None:
            write_run(seed_dir, '20260105_010000', model_config(detector, SHAPES_HARD),
                      test_metrics=coco_logged(first=hard_aps[k]))


def test_seeds_give_means_sds_and_paired_intervals(tmp_path):
    rigid = str(tmp_path / 'faster-rcnn_r50_fpn_shapes')
    dk = str(tmp_path / 'faster-rcnn_r50-dk-c3-c5_fpn_shapes')
    # val AP over seeds 0, 1, 2: rigid 40, 41, 42 (mean 41, sd 1); DK 41, 43, 42 (mean 42,
    # sd 1). Paired differences 1, 2, 0: mean 1, sd 1, so the 95% interval is
    # 1 +- 4.303 * 1 / sqrt(3) = 1 +- 2.484 = [-1.484, 3.484], written [-1.5, +3.5].
    # Unpaired, the two means would differ by the same 1: the pairing is by seed index.
    write_seeds(rigid, [0.40, 0.41, 0.42], hard_aps=[0.20, 0.22, 0.24])
    # test_hard: rigid 20, 22, 24 (mean 22, sd 2); DK 25, 25, 28 (mean 26, sd sqrt(3) =
    # 1.732); differences 5, 3, 4: mean 4, sd 1, interval 4 +- 2.484 = [1.516, 6.484].
    write_seeds(dk, [0.41, 0.43, 0.42], hard_aps=[0.25, 0.25, 0.28])

    out, csv_path = str(tmp_path / 'study.md'), str(tmp_path / 'study.csv')
    text = collect_results.main([rigid, dk, '--out', out, '--csv', csv_path, '--no-complexity',
                                 '--baseline', 'faster-rcnn_r50_fpn_shapes'])

    rows = {(row['split'], row['task'], row['metric'], row['model']): row
            for row in read_csv(csv_path)}
    assert len(rows) == 2 * 6 * 2  # splits x metrics x models: bbox only
    val_rigid = rows['val', 'bbox', 'AP', 'faster-rcnn_r50_fpn_shapes']
    assert (val_rigid['seeds'], val_rigid['mean'], val_rigid['sd']) == ('3', '41.0', '1.0')
    assert val_rigid['baseline'] == val_rigid['difference'] == val_rigid['ci95_low'] == ''
    val_dk = rows['val', 'bbox', 'AP', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes']
    assert [val_dk[key] for key in ('seeds', 'mean', 'sd', 'baseline', 'pairs', 'difference',
                                    'ci95_low', 'ci95_high')] == [
        '3', '42.0', '1.0', 'faster-rcnn_r50_fpn_shapes', '3', '1.0', '-1.5', '3.5']
    # AP75 is AP + 2 in every run: the same differences
    assert rows['val', 'bbox', 'AP75', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes']['ci95_high'] == '3.5'
    hard_dk = rows['test_hard', 'bbox', 'AP', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes']
    assert [hard_dk[key] for key in ('mean', 'sd', 'difference', 'ci95_low', 'ci95_high')] == [
        '26.0', '1.7', '4.0', '1.5', '6.5']
    assert rows['test_hard', 'bbox', 'AP', 'faster-rcnn_r50_fpn_shapes']['sd'] == '2.0'

    assert open(out).read() == text
    assert '## val' in text and '## test_hard' in text
    assert 'paired by seed index' in text
    assert '| faster-rcnn_r50_fpn_shapes | 3 | 41.0 ± 1.0 | 42.0 ± 1.0 |' in text
    assert ('| faster-rcnn_r50-dk-c3-c5_fpn_shapes | faster-rcnn_r50_fpn_shapes | 3 | '
            '+1.0 [-1.5, +3.5] |') in text
    assert '| faster-rcnn_r50_fpn_shapes | 0, 1, 2 | n/a | n/a | n/a | n/a |' in text


def test_missing_seeds_are_left_out_of_the_pairs(tmp_path):
    """Seed 1 of the DK model never ran, the test of seed 2 of the baseline failed (no metrics):
    the pairs are the seeds both have (0 and 3), and cells with fewer values than the model's
    seeds say so."""
    rigid = str(tmp_path / 'rigid')
    dk = str(tmp_path / 'dk')
    write_seeds(rigid, [0.40, 0.41, 0.42, 0.43])
    write_seeds(dk, [0.45, 0.0, 0.46, 0.44])
    shutil.rmtree(osp.join(dk, 'seed1'))
    (metrics_file, ) = glob.glob(osp.join(rigid, 'seed2', '*', '*.json'))
    os.remove(metrics_file)
    csv_path = str(tmp_path / 'study.csv')
    text = collect_results.main([rigid, dk, '--out', str(tmp_path / 's.md'), '--csv', csv_path,
                                 '--no-complexity', '--baseline', 'rigid'])
    rows = {(row['metric'], row['model']): row for row in read_csv(csv_path)}
    # rigid seeds 0, 1, 3: 40, 41, 43; DK seeds 0, 2, 3: 45, 46, 44
    assert (rows['AP', 'rigid']['seeds'], rows['AP', 'rigid']['mean']) == ('3', '41.3')
    # pairs: seed 0 (45 - 40 = 5) and seed 3 (44 - 43 = 1): mean 3, sd 2 sqrt(2) = 2.828,
    # interval 3 +- 12.706 * 2.828 / sqrt(2) = 3 +- 25.41 (t quantile with 1 degree of freedom)
    assert [rows['AP', 'dk'][key] for key in ('pairs', 'difference', 'ci95_low', 'ci95_high')
            ] == ['2', '3.0', '-22.4', '28.4']
    assert '| rigid | 4 | 41.3 ± 1.5 (n=3) |' in text
    assert '| dk | rigid | 3 | +3.0 [-22.4, +28.4] (n=2) |' in text


def test_each_model_is_paired_with_the_baseline_of_its_detector(tmp_path):
    names = ('faster-rcnn_r50_fpn_shapes', 'faster-rcnn_dk', 'mask-rcnn_r50_fpn_shapes',
             'mask-rcnn_dk')
    for name in names:
        write_seeds(str(tmp_path / name), [0.3, 0.4],
                    detector='MaskRCNN' if name.startswith('mask') else 'FasterRCNN')
    work_dirs = [str(tmp_path / name) for name in names]
    csv_path = str(tmp_path / 'study.csv')
    collect_results.main(work_dirs + ['--out', str(tmp_path / 's.md'), '--csv', csv_path,
                                      '--no-complexity', '--baseline', names[0], names[2]])
    baselines = {row['model']: row['baseline'] for row in read_csv(csv_path)}
    assert baselines == {names[0]: '', names[1]: names[0], names[2]: '', names[3]: names[2]}

    write_seeds(str(tmp_path / 'faster-rcnn_dcn'), [0.3, 0.4])
    with pytest.raises(ValueError, match='faster-rcnn_dcn: more than one --baseline is a '
                       'FasterRCNN'):
        collect_results.main(work_dirs[:2] + [str(tmp_path / 'faster-rcnn_dcn'), '--out',
                                               str(tmp_path / 's.md'), '--no-complexity',
                                               '--baseline', names[0], names[1]])
    with pytest.raises(ValueError, match='--baseline rigid: not the name of a work_dir'):
        collect_results.main(work_dirs + ['--out', str(tmp_path / 's.md'), '--no-complexity',
                                          '--baseline', 'rigid'])


def test_seeded_and_single_run_work_dirs_do_not_mix(tmp_path):
    write_seeds(str(tmp_path / 'seeded'), [0.3])
    write_run(str(tmp_path / 'single'), '20260105_000000', model_config(),
              test_metrics=coco_logged())
    with pytest.raises(ValueError, match='others do not'):
        collect_results.main([str(tmp_path / 'seeded'), str(tmp_path / 'single'), '--out',
                              str(tmp_path / 's.md'), '--no-complexity'])
    with pytest.raises(ValueError, match='--baseline pairs models by seed'):
        collect_results.main([str(tmp_path / 'single'), '--out', str(tmp_path / 's.md'),
                              '--no-complexity', '--baseline', 'single'])


# ------------------------------------------------------------------------ AP per bin


def ground_truth_file(path, stretches, boxes, categories=1, image_ids=None):
    """A COCO file with one ground truth per box, "deformation" records of the given stretch
    (as aspect) and of arbitrary size, shear and warp."""
    image_ids = image_ids or [1] * len(boxes)
    annotations = [dict(id=i + 1, image_id=image_id, category_id=i % categories + 1, bbox=box,
                        area=box[2] * box[3], iscrowd=0,
                        deformation=dict(size=10.0 + i, aspect=stretch, rotation=0.0,
                                         shear=0.01 * i, warp=0.02 * i))
                   for i, (stretch, box, image_id) in enumerate(zip(stretches, boxes, image_ids))]
    dataset = dict(images=[dict(id=i, width=200, height=200, file_name=f'{i}.png')
                           for i in sorted(set(image_ids))],
                   annotations=annotations,
                   categories=[dict(id=i + 1, name=f'c{i}') for i in range(categories)])
    with open(path, 'w') as f:
        json.dump(dataset, f)
    return path


def detection(box, score, image_id=1, category_id=1):
    return dict(image_id=image_id, category_id=category_id, bbox=box, score=score)


def stretch_bins(ann_file, num_bins):
    return [(bin, members) for bin, members in collect_results.attribute_bins(ann_file, num_bins)
            if bin.attribute == 'stretch']


def test_bin_ap_by_hand(tmp_path):
    # Ground truth A (stretch 1.1) and B (stretch 1.9); two bins split at their median, 1.5.
    # Detections, best first: A's box (0.9), a box on nothing (0.8), B's box (0.7).
    # Bin of A: TP, FP, then B's detection ignored: precision 1 at recall 1, AP 100.
    # Bin of B: A's detection ignored, FP, TP: precision 1/2 at every recall, AP 50 (33.3 if A's
    # detection counted as a false positive, 100 if the unmatched one were ignored).
    # Every ground truth at once: precision 1 up to recall 1/2 (51 of COCO's 101 recall points)
    # and 2/3 beyond (50 points): AP = 100 (51 + 50 * 2/3) / 101 = 83.498.
    box_a, box_b = [10, 10, 20, 20], [100, 100, 20, 30]
    ann_file = ground_truth_file(str(tmp_path / 'gt.json'), [1.1, 1.9], [box_a, box_b])
    detections = [detection(box_a, 0.9), detection([150, 10, 20, 20], 0.8),
                  detection(box_b, 0.7)]
    bins = stretch_bins(ann_file, 2)
    assert [(bin.low, bin.high, bin.ground_truths) for bin, _ in bins] == [(None, 1.5, 1),
                                                                            (1.5, None, 1)]
    coco_gt = collect_results.load_ground_truth(ann_file)
    aps = collect_results.binned_ap(coco_gt, detections, 'bbox', bins)
    assert [aps[bin] for bin, _ in bins] == pytest.approx([100.0, 50.0])
    everything = collect_results.binned_ap(coco_gt, detections, 'bbox', stretch_bins(ann_file, 1))
    assert list(everything.values()) == pytest.approx([100 * (51 + 50 * 2 / 3) / 101])
    # no detections at all: AP 0, not an error from pycocotools
    assert set(collect_results.binned_ap(coco_gt, [], 'bbox', bins).values()) == {0.0}


def coco_ap_by_area_range(ann_file, detections, value_of_ann, low, high):
    """The bin's AP the way pycocotools scores an area range, run end to end: every ground
    truth's area replaced by its attribute value, every detection's by a value inside the
    range (so that unmatched ones still count), and areaRng [low, high] (COCO's is closed:
    high is nudged below the bin's open end)."""
    with open(ann_file) as f:
        dataset = json.load(f)
    for ann in dataset['annotations']:
        ann['area'] = value_of_ann(ann)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(det) for det in detections])
        for det in coco_dt.anns.values():
            det['area'] = low
        evaluator = COCOeval(coco_gt, coco_dt, 'bbox')
        evaluator.params.areaRng = [[low, np.nextafter(high, -np.inf)]]
        evaluator.params.areaRngLbl = ['bin']
        evaluator.params.maxDets = [100]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval['precision'][:, :, :, 0, -1]
    return 100 * precision[precision > -1].mean()


def test_bin_ap_matches_pycocotools_area_ranges(tmp_path):
    """Four images, two categories, 24 ground truths; detections: jittered copies of most
    ground truths with random scores, some duplicates and boxes on nothing."""
    rng = np.random.default_rng(0)
    num_gts = 24
    corners = rng.uniform(0, 150, size=(num_gts, 2))
    sides = rng.uniform(8, 40, size=(num_gts, 2))
    boxes = np.concatenate([corners, sides], axis=1).round(1).tolist()
    image_ids = rng.integers(1, 5, size=num_gts).tolist()
    stretches = np.exp(rng.uniform(0, 0.8, size=num_gts)).round(4).tolist()
    ann_file = ground_truth_file(str(tmp_path / 'gt.json'), stretches, boxes, categories=2,
                                 image_ids=image_ids)
    detections = []
    for i, (box, image_id) in enumerate(zip(boxes, image_ids)):
        for _ in range(int(rng.integers(0, 3))):  # missed, found, or found twice
            jittered = (np.array(box) + rng.normal(0, 2.5, size=4) * [1, 1, 0.5, 0.5]).tolist()
            detections.append(detection(jittered, float(rng.uniform()), image_id, i % 2 + 1))
    for _ in range(8):
        detections.append(detection(rng.uniform(0, 150, size=4).tolist(), float(rng.uniform()),
                                    int(rng.integers(1, 5)), int(rng.integers(1, 3))))

    coco_gt = collect_results.load_ground_truth(ann_file)
    bins = stretch_bins(ann_file, 3)
    assert [bin.ground_truths for bin, _ in bins] == [8, 8, 8]
    aps = collect_results.binned_ap(coco_gt, detections, 'bbox', bins)
    lowest, highest = min(stretches), max(stretches)
    for bin, _ in bins:
        expected = coco_ap_by_area_range(
            ann_file, detections, lambda ann: ann['deformation']['aspect'],
            lowest if bin.low is None else bin.low,
            np.nextafter(highest, np.inf) if bin.high is None else bin.high)
        assert aps[bin] == pytest.approx(expected, abs=1e-9)
    assert len(set(aps.values())) == 3  # the bins do differ

    # one bin holding every ground truth: COCO's own AP
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(det) for det in detections]), 'bbox')
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    (everything, ) = collect_results.binned_ap(coco_gt, detections, 'bbox',
                                               stretch_bins(ann_file, 1)).values()
    assert everything == pytest.approx(100 * evaluator.stats[0], abs=1e-9)


def test_study_reports_bin_aps_paired_over_seeds(tmp_path, monkeypatch):
    """A study as tools/test.py leaves it with test_evaluator.outfile_prefix set: paths relative
    to the directory the tools ran in, detections in <prefix>.bbox.json."""
    monkeypatch.chdir(tmp_path)
    # Ground truths of stretch 1.1, 1.2 (bin 0) and 1.8, 1.9 (bin 1), one image.
    boxes = [[10, 10, 20, 20], [60, 10, 20, 20], [10, 60, 30, 20], [60, 60, 20, 30]]
    ground_truth_file('gt.json', [1.1, 1.2, 1.8, 1.9], boxes)
    everything = [detection(box, 0.9 - 0.1 * i) for i, box in enumerate(boxes)]
    all_but_last = everything[:3]
    # Bin 1 of a run that misses the last ground truth: precision 1 up to recall 1/2, 51 of the
    # 101 recall points: AP 100 * 51 / 101 = 50.495; finding both: 100.
    # rigid seeds 0, 1, 2 miss, miss, find it: 50.495, 50.495, 100; DK finds it every time.
    # Differences a, a, 0 with a = 100 - 50.495 = 49.505: mean 2a/3 = 33.0, sd a / sqrt(3) =
    # 28.58, interval 33.0 +- 4.303 * a / 3 = 33.0 +- 71.0 = [-38.0, 104.0]. Bin 0: 100 always.
    found = {'rigid': [all_but_last, all_but_last, everything], 'dk': [everything] * 3}
    for name, runs in found.items():
        for k, detections in enumerate(runs):
            seed_dir = osp.join(name, f'seed{k}')
            prefix = osp.join(seed_dir, 'detections', 'val')
            write_run(seed_dir, '20260106_000000',
                      model_config(test_ann='gt.json', outfile_prefix=prefix),
                      test_metrics=coco_logged(first=0.5))
            os.makedirs(osp.dirname(prefix), exist_ok=True)
            with open(f'{prefix}.bbox.json', 'w') as f:
                json.dump(detections, f)

    text = collect_results.main(['rigid', 'dk', '--out', 'study.md', '--csv', 'study.csv',
                                 '--no-complexity', '--baseline', 'rigid', '--bins', '2'])
    rows = {(row['bin'], row['model']): row for row in read_csv('study.csv')
            if row['bin'].startswith('stretch')}
    assert [(row['mean'], row['sd']) for row in (rows['stretch >= 1.5', 'rigid'],
                                                 rows['stretch >= 1.5', 'dk'])] == [
        ('67.0', '28.6'), ('100.0', '0.0')]
    assert [rows['stretch >= 1.5', 'dk'][key]
            for key in ('ground_truths', 'pairs', 'difference', 'ci95_low', 'ci95_high')] == [
        '2', '3', '33.0', '-38.0', '104.0']
    assert rows['stretch < 1.5', 'dk']['difference'] == '0.0'
    assert '### bbox AP per deformation bin: difference to the baseline' in text
    assert '| stretch >= 1.5 | +33.0 [-38.0, +104.0] |' in text
    assert '| stretch < 1.5 | 2 | 100.0 ± 0.0 | 100.0 ± 0.0 |' in text


def test_bin_ap_needs_deformation_records_and_the_detections(tmp_path):
    ann_file = str(tmp_path / 'gt.json')
    ground_truth_file(ann_file, [1.1, 1.5], [[0, 0, 10, 10], [20, 20, 10, 10]])
    with open(ann_file) as f:
        dataset = json.load(f)
    del dataset['annotations'][1]['deformation']
    plain_file = str(tmp_path / 'coco_like.json')
    with open(plain_file, 'w') as f:
        json.dump(dataset, f)
    with pytest.raises(ValueError, match=r'coco_like.json: AP per deformation bin .* \[2\]'):
        collect_results.attribute_bins(plain_file, 3)

    seed_dir = str(tmp_path / 'model' / 'seed0')
    write_run(seed_dir, '20260106_000000',
              model_config(test_ann=ann_file, outfile_prefix=str(tmp_path / 'nowhere')),
              test_metrics=coco_logged())
    with pytest.raises(FileNotFoundError, match='nowhere.bbox.json: the test run reported bbox'):
        collect_results.main([str(tmp_path / 'model'), '--out', str(tmp_path / 's.md'),
                              '--no-complexity'])
    with open(tmp_path / 'nowhere.bbox.json', 'w') as f:  # from a split with more images
        json.dump([detection([0, 0, 10, 10], 0.5, image_id=1),
                   detection([0, 0, 10, 10], 0.5, image_id=7)], f)
    with pytest.raises(ValueError, match=r'nowhere.bbox.json: detections on images .* \[7\]'):
        collect_results.main([str(tmp_path / 'model'), '--out', str(tmp_path / 's.md'),
                              '--no-complexity'])


def test_bin_ap_reads_what_coco_metric_writes(tmp_path):
    """mmdet's CocoMetric, given an outfile_prefix (as tools/test.py's --cfg-options
    test_evaluator.outfile_prefix=... sets it), leaves <prefix>.bbox.json and <prefix>.segm.json;
    read back on shapes ground truth, one bin holding every object gives CocoMetric's AP (which
    it rounds to 3 decimals)."""
    from mmdet.evaluation import CocoMetric

    from tools.data.make_shapes import CLASSES, generate
    ann_file = generate(str(tmp_path / 'shapes'), num_train=0, num_val=4, num_hard=0,
                        img_size=96, seed=2)['val']
    coco = collect_results.load_ground_truth(ann_file)
    prefix = str(tmp_path / 'detections' / 'val')
    metric = CocoMetric(ann_file=ann_file, metric=['bbox', 'segm'], outfile_prefix=prefix)
    metric.dataset_meta = dict(classes=CLASSES)
    rng = np.random.default_rng(0)
    for image in coco.dataset['images']:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image['id']))[::2]  # half of them found
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)])
        predictions = dict(
            bboxes=(boxes + torch.from_numpy(rng.normal(0, 1.5, size=boxes.shape))).float(),
            scores=torch.from_numpy(rng.uniform(size=len(anns))).float(),
            labels=torch.tensor([ann['category_id'] - 1 for ann in anns]),
            masks=torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)))
        metric.process({}, [dict(img_id=image['id'], ori_shape=(96, 96),
                                 pred_instances=predictions)])
    with contextlib.redirect_stdout(io.StringIO()):
        results = metric.evaluate(size=len(coco.dataset['images']))
    for task in ('bbox', 'segm'):
        with open(f'{prefix}.{task}.json') as f:
            detections = json.load(f)
        (everything, ) = collect_results.binned_ap(coco, detections, task,
                                                   stretch_bins(ann_file, 1)).values()
        assert 0 < everything < 100
        assert everything == pytest.approx(100 * results[f'coco/{task}_mAP'], abs=0.05)
