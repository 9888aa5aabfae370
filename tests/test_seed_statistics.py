"""tools/analysis_tools/seed_statistics.py: Student t quantiles against printed tables and
closed forms; means, standard deviations and paired intervals of studies of seed<k>/ work_dirs
(work_dir_fixtures.py), worked out by hand.
"""
import glob
import math
import os
import os.path as osp
import shutil

import pytest

from tool_modules import load_tool
from work_dir_fixtures import read_csv, write_seeds

collect_results = load_tool('analysis_tools/collect_results.py')
seed_statistics = load_tool('analysis_tools/seed_statistics.py')

# Two-sided 95% critical value of Student's t with 2 degrees of freedom, as printed in t tables
# (e.g. NIST/SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.2, "Critical values of
# the Student's t distribution": 4.303 in the column for 0.975, row 2).
T_975_DF2 = 4.303


def test_t_quantile():
    t_quantile = seed_statistics.t_quantile
    assert t_quantile(0.975, 2) == pytest.approx(T_975_DF2, abs=5e-4)
    # closed forms: 1 degree of freedom is Cauchy, tan(pi (p - 1/2)); 2 degrees of freedom
    # invert F(t) = 1/2 + t / (2 sqrt(t^2 + 2)): t = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    # the same tables, 4, 9 and 29 degrees of freedom
    for df, table in ((4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


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
