"""dk_mmdet/results/seed_statistics.py and study.py: Student t quantiles against printed tables and
closed forms; means, standard deviations and paired intervals of studies of seed<k>/ work_dirs
(work_dir_fixtures.py), worked out by hand.
"""
import glob
import math
import os
import os.path as osp
import shutil

import pytest

from dk_mmdet.results import seed_statistics
from tools.analysis_tools import collect_results
from work_dir_fixtures import REPO_ROOT, read_csv, write_seeds

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


# ------------------------------------------------------- summaries recomputed from every run

STUDY_DOCS = osp.join(REPO_ROOT, 'docs', 'study')
AP_KEY = ('split', 'task', 'metric', 'bin', 'model')


def plain_t_975(degrees_of_freedom):
    """t(0.975, df) in closed form (see test_t_quantile): neither scipy nor the package."""
    if degrees_of_freedom == 1:
        return math.tan(math.pi * 0.475)
    if degrees_of_freedom == 2:
        return 0.95 / math.sqrt(2 * 0.975 * 0.025)
    raise AssertionError(f'no closed form here for {degrees_of_freedom} degrees of freedom')


def plain_interval(values):
    """(mean, sd, low, high) from the textbook formulas; sd and interval None for one value."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None, None, None
    sd = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))
    half_width = plain_t_975(n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half_width, mean + half_width


def package_interval(values):
    spread, low, high = seed_statistics.mean_interval(values)
    return spread.mean, spread.sd, low, high


def package_difference(model, baseline):
    difference = seed_statistics.paired_difference(model, baseline)
    return difference.mean, difference.low, difference.high


def plain_difference(model, baseline):
    mean, _, low, high = plain_interval([model[k] - baseline[k]
                                         for k in sorted(model.keys() & baseline.keys())])
    return mean, low, high


def assert_same(package, plain):
    assert [x is None for x in package] == [x is None for x in plain]
    assert [x for x in package if x is not None] == pytest.approx(
        [x for x in plain if x is not None], rel=1e-12, abs=1e-12)


def check_ap_summary(runs_path, summary_path):
    """Every line of a summary CSV (collect_results.py --csv) holds the numbers that the
    per-run CSV (--runs-csv) gives, computed by the package and by plain formulas alike."""
    values = {}
    for row in read_csv(runs_path):
        key = tuple(row[column] for column in AP_KEY)
        values.setdefault(key, {})[int(row['seed'])] = float(row['value'])
    summary = read_csv(summary_path)
    assert len(summary) == len(values)

    def text(value):
        return '' if value is None else f'{value:.1f}'

    for line in summary:
        by_seed = values[tuple(line[column] for column in AP_KEY)]
        numbers = package_interval(list(by_seed.values()))
        assert_same(numbers, plain_interval(list(by_seed.values())))
        assert [line['seeds'], line['mean'], line['sd']] == [
            str(len(by_seed)), text(numbers[0]), text(numbers[1])]
        if not line['baseline']:
            assert line['difference'] == line['ci95_low'] == ''
            continue
        baseline = values[tuple(line[column] for column in AP_KEY[:-1]) + (line['baseline'], )]
        difference = package_difference(by_seed, baseline)
        assert_same(difference, plain_difference(by_seed, baseline))
        assert [line['pairs'], line['difference'], line['ci95_low'], line['ci95_high']] == [
            str(len(by_seed.keys() & baseline.keys())), *map(text, difference)]


def test_the_summary_follows_from_the_values_of_every_run(tmp_path):
    rigid, dk = str(tmp_path / 'rigid'), str(tmp_path / 'dk')
    write_seeds(rigid, [0.403, 0.417, 0.398], hard_aps=[0.201, 0.236, 0.219])
    write_seeds(dk, [0.441, 0.405, 0.422], hard_aps=[0.25, 0.247, 0.281])
    shutil.rmtree(osp.join(dk, 'seed1'))  # a missing seed: two pairs, one degree of freedom
    summary_path, runs_path = str(tmp_path / 'study.csv'), str(tmp_path / 'runs.csv')
    collect_results.main([rigid, dk, '--out', str(tmp_path / 's.md'), '--csv', summary_path,
                          '--runs-csv', runs_path, '--no-complexity', '--baseline', 'rigid'])
    runs = read_csv(runs_path)
    assert len(runs) == 2 * 6 * (3 + 2)  # splits x metrics x seeds of the models
    # every value in full: 0.403 * 100 is 40.300000000000004 in floating point
    assert {'split': 'val', 'task': 'bbox', 'metric': 'AP', 'bin': '', 'model': 'rigid',
            'seed': '0', 'value': repr(0.403 * 100)} in runs
    check_ap_summary(runs_path, summary_path)


@pytest.mark.parametrize('protocol', ['finetune', 'scratch'])
def test_committed_study_summary_follows_from_every_run(protocol):
    """docs/study/<protocol>.csv, a protocol's summary, is what docs/study/<protocol>_runs.csv,
    every seed's values in full, gives: the same means, sds and paired intervals."""
    check_ap_summary(osp.join(STUDY_DOCS, f'{protocol}_runs.csv'),
                     osp.join(STUDY_DOCS, f'{protocol}.csv'))


def test_committed_erf_slope_summaries_follow_from_every_seeds_slope():
    """docs/study/erf_seeds_runs.csv holds each seed's slope in full, and erf_seeds.csv prints
    the slopes, means, sds and intervals to 3 decimals: each recomputed number must lie within
    what rounding each slope by up to h = 0.0005 (and the printed number itself) can move it.
    With n values and t = t(0.975, n - 1): the mean moves by h at most, the sd by
    sqrt(n / (n - 1)) h (the norm of the centred rounding errors over sqrt(n - 1)), an interval
    end by h + t h / sqrt(n - 1); a difference of two slopes by 2h."""
    h = 0.0005
    slopes = {}
    for row in read_csv(osp.join(STUDY_DOCS, 'erf_seeds_runs.csv')):
        slopes.setdefault(row['variant'], {})[int(row['seed'])] = float(row['slope'])
    summary = read_csv(osp.join(STUDY_DOCS, 'erf_seeds.csv'))
    assert [line['variant'] for line in summary] == list(slopes)
    for line in summary:
        by_seed = slopes[line['variant']]
        assert line['slope_per_seed'] == ' '.join(f'{k}:{v:.3f}' for k, v in by_seed.items())
        n = len(by_seed)
        t = plain_t_975(n - 1)
        numbers = package_interval(list(by_seed.values()))
        assert_same(numbers, plain_interval(list(by_seed.values())))
        assert int(line['seeds']) == n
        committed = [float(line[key]) for key in ('mean', 'sd', 'ci95_low', 'ci95_high')]
        interval_tolerance = 2 * h + t * h / math.sqrt(n - 1)
        tolerances = [2 * h, h + math.sqrt(n / (n - 1)) * h, interval_tolerance,
                      interval_tolerance]
        for number, printed, tolerance in zip(numbers, committed, tolerances):
            assert abs(number - printed) <= tolerance, (line['variant'], number, printed)
        if not line['baseline']:
            continue
        baseline = slopes[line['baseline']]
        difference = package_difference(by_seed, baseline)
        assert_same(difference, plain_difference(by_seed, baseline))
        assert int(line['pairs']) == len(by_seed.keys() & baseline.keys())
        committed = [float(line[key]) for key in ('difference', 'difference_ci95_low',
                                                  'difference_ci95_high')]
        tolerances = [3 * h] + [3 * h + 2 * t * h / math.sqrt(n - 1)] * 2
        for number, printed, tolerance in zip(difference, committed, tolerances):
            assert abs(number - printed) <= tolerance, (line['variant'], number, printed)


def test_seeds_for_half_width_is_the_smallest_study_that_resolves_it():
    # t(0.975, 9) = 2.262 and t(0.975, 10) = 2.228 (the NIST table of test_t_quantile):
    # 10 seeds give 2.262 * 1.4 / sqrt(10) = 1.0016 > 1.0, 11 give 2.228 * 1.4 / sqrt(11) = 0.94
    assert seed_statistics.seeds_for_half_width(1.4, 1.0) == 11
    # 3 seeds: 4.303 * sd / sqrt(3) <= 1 holds up to sd = 0.4025, 2 seeds need sd <= 0.1109
    assert seed_statistics.seeds_for_half_width(0.40, 1.0) == 3
    assert seed_statistics.seeds_for_half_width(0.0, 1.0) == 2
    with pytest.raises(ValueError, match='half_width'):
        seed_statistics.seeds_for_half_width(1.4, 0.0)
