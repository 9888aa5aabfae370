"""tools/analysis_tools/collect_results.py (single-run tables, the command line),
model_results.py (reading work_dirs) and model_complexity.py.

The work_dirs here are written by the tests in mmengine's layout (work_dir_fixtures.py), then
parsed for real; the MAC handles are checked against counts worked out by hand from their
formulas, and mmengine's own conv count.
"""
import os.path as osp

import pytest
import torch
from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
from mmengine.config import Config
from torch import nn

import dk_mmdet
from tool_modules import load_tool
from work_dir_fixtures import (COCO_VAL, REPO_ROOT, SHAPES_HARD, SHAPES_VAL, coco_logged,
                               evaluator_config, model_config, read_csv, train_lines, write_run,
                               write_seeds)

collect_results = load_tool('analysis_tools/collect_results.py')
model_complexity = load_tool('analysis_tools/model_complexity.py')
model_results = load_tool('analysis_tools/model_results.py')


# ---------------------------------------------------------------------------- single runs


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
    assert model_results.split_name(dict(ann_file=COCO_VAL)) == 'val2017'
    assert model_results.split_name(dict(ann_file=SHAPES_HARD)) == 'test_hard'
    assert model_results.split_name(dict(ann_file='ann/my_split.json')) == 'my_split'
    assert model_results.split_name(dict(type='CocoMetric')) is None


def test_default_input_size_is_the_test_resize():
    coco = Config.fromfile(osp.join(REPO_ROOT, 'configs/dk/faster-rcnn_r50_fpn_1x_coco.py'))
    assert collect_results.test_input_size(coco) == (800, 1333)
    assert model_complexity.padded_input_shape(coco.model, 800, 1333) == (800, 1344)
    shapes = Config.fromfile(osp.join(REPO_ROOT, 'configs/shapes/faster-rcnn_r50_fpn_shapes.py'))
    assert collect_results.test_input_size(shapes) == (256, 256)


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
