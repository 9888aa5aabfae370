"""Synthetic mmengine work_dirs for the tests of tools/analysis_tools/collect_results.py and
the modules it uses: a config dump, JSON-lines scalars and a test-metrics JSON per run, as
mmengine writes them; the tools parse them for real.
"""
import csv
import json
import os
import os.path as osp

TESTS_DIR = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(TESTS_DIR)


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
