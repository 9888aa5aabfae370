"""dk_mmdet/results/learning_curves.py and tools/analysis_tools/learning_curves.py: val AP during
training read from mmengine's scalars, joined over a resumed run's starts, and the plateau
verdict on a schedule's last fifth."""
import os.path as osp

import pytest

from dk_mmdet.results.learning_curves import plateau, read_curve
from tool_modules import load_tool
from work_dir_fixtures import coco_logged, read_csv, train_lines, write_run

learning_curves = load_tool('analysis_tools/learning_curves.py')


def val_line(iteration, ap):
    return dict(coco_logged(first=ap), step=iteration)


def write_resumed_run(work_dir, aps, iterations=1000):
    """A run evaluated every 100 iterations (AP aps[k] at 100 (k + 1)), killed after 500 and
    resumed from 400: the second start evaluates 500 again."""
    config = f'train_cfg = dict(type="IterBasedTrainLoop", max_iters={iterations})\n'
    first = [*train_lines([0.3] * 5)]
    first += [val_line(100 * (k + 1), 0.5) for k in range(5)]  # overwritten at 500 below
    first[5:9] = [val_line(100 * (k + 1), aps[k]) for k in range(4)]
    write_run(work_dir, '20260101_000000', config, scalars=first)
    second = [*train_lines([0.3] * 3, start_iter=410)]
    second += [val_line(100 * (k + 1), aps[k]) for k in range(4, len(aps))]
    write_run(work_dir, '20260101_050000', config, scalars=second)


def test_the_curve_joins_a_resumed_runs_starts_the_later_one_winning(tmp_path):
    aps = [0.10, 0.20, 0.25, 0.28, 0.30, 0.31, 0.32, 0.33, 0.332, 0.334]
    write_resumed_run(str(tmp_path), aps)
    curve = read_curve(str(tmp_path))
    assert [e.iteration for e in curve] == list(range(100, 1001, 100))
    assert [e.metrics['coco/bbox_mAP'] for e in curve] == aps  # 500: 0.30, not 0.5
    assert all('loss' not in e.metrics for e in curve)


@pytest.mark.parametrize('aps, gain, plateaued', [
    ([0.10, 0.20, 0.25, 0.28, 0.30, 0.31, 0.32, 0.33, 0.332, 0.334], 0.4, True),
    ([0.10, 0.20, 0.25, 0.28, 0.30, 0.31, 0.32, 0.33, 0.34, 0.36], 3.0, False),
    ([0.10, 0.20, 0.25, 0.28, 0.30, 0.31, 0.32, 0.33, 0.33, 0.325], -0.5, True),
])
def test_plateau_is_the_gain_from_80_percent_to_the_end(tmp_path, aps, gain, plateaued):
    write_resumed_run(str(tmp_path), aps)
    verdict = plateau(read_curve(str(tmp_path)), 1000)
    assert (verdict.start.iteration, verdict.end.iteration) == (800, 1000)
    assert verdict.gain == pytest.approx(gain)
    assert verdict.plateaued is plateaued


def test_plateau_refuses_a_curve_that_cannot_show_the_last_fifth(tmp_path):
    aps = [0.1, 0.2, 0.25, 0.28, 0.30, 0.31, 0.32, 0.33, 0.332, 0.334]
    write_resumed_run(str(tmp_path), aps)
    curve = read_curve(str(tmp_path))
    with pytest.raises(ValueError, match='last iteration 2000'):
        plateau(curve, 2000)  # unfinished
    with pytest.raises(ValueError, match='80% of 1000'):
        plateau(curve[-1:], 1000)  # one evaluation, at the end


def test_the_tool_writes_the_curves_and_the_verdicts(tmp_path):
    write_resumed_run(str(tmp_path / 'rigid'),
                      [0.10, 0.20, 0.25, 0.28, 0.30, 0.31, 0.32, 0.33, 0.332, 0.334])
    write_resumed_run(str(tmp_path / 'dk'),
                      [0.10, 0.20, 0.25, 0.28, 0.30, 0.31, 0.32, 0.33, 0.34, 0.36])
    out = str(tmp_path / 'out')
    table = learning_curves.main([str(tmp_path / 'rigid'), str(tmp_path / 'dk'),
                                  '--names', 'rigid', 'DK', '--out', out])
    assert '| rigid | 1000 | 33.0 (iteration 800) | 33.4 | +0.4 | yes |' in table
    assert '| DK | 1000 | 33.0 (iteration 800) | 36.0 | +3.0 | **no** |' in table
    rows = read_csv(osp.join(out, 'curves.csv'))
    assert len(rows) == 20 and rows[4] == {'run': 'rigid', 'iteration': '500',
                                           'coco/bbox_mAP': '30.0'}
    assert osp.getsize(osp.join(out, 'curves.png')) > 0
