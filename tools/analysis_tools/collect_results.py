"""Paper-style results table from mmdet work_dirs: COCO AP, parameters, MACs, training time.

    python tools/analysis_tools/collect_results.py WORK_DIR [WORK_DIR ...] --out results.md \\
        [--csv results.csv] [--input-size H W]

One row per work_dir (the model; named after the work_dir) and evaluation split. What is read
is what mmengine writes under each WORK_DIR for every run of tools/train.py and tools/test.py,
in a ``<timestamp>/`` folder:

- ``vis_data/config.py``: the run's config (models are built from the newest one);
- ``vis_data/scalars.json``: one JSON line per logged training iteration (``time``: seconds
  per iteration, data loading included) and per validation during training (metrics);
- ``<timestamp>.json``: the metrics of a test run.

A result's split is named after its evaluator's annotation file (``instances_val2017.json`` ->
``val2017``, ``instances_test_hard.json`` -> ``test_hard``); when a split was evaluated more
than once (validation during training, then tests), the newest evaluation counts. AP values
are mmdet's CocoMetric (pycocotools) results, times 100.

Columns besides AP: parameters; MACs of one test forward at the stated input size (see
tools/analysis_tools/model_complexity.py for what is counted, DK and DCN layers included);
training time per iteration, the median of the logged values.
"""
import argparse
import csv
import glob
import importlib.util
import json
import os
import os.path as osp
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

TOOLS_DIR = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(osp.dirname(TOOLS_DIR))
sys.path.insert(0, TOOLS_DIR)
if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: configs import the repository's dk_mmdet.
    sys.path.insert(0, REPO_ROOT)

from mmengine.config import Config  # noqa: E402

# (column name, CocoMetric key suffix) of the COCO summary, for each task CocoMetric reports.
AP_COLUMNS = (('AP', 'mAP'), ('AP50', 'mAP_50'), ('AP75', 'mAP_75'), ('APs', 'mAP_s'),
              ('APm', 'mAP_m'), ('APl', 'mAP_l'))
TASKS = ('bbox', 'segm')
RUN_FOLDER = re.compile(r'^\d{8}_\d{6}$')  # mmengine's timestamp, e.g. 20261125_140255


@dataclass
class Evaluation:
    """The COCO metrics of one split, from one run."""
    split: str
    timestamp: str
    metrics: Dict[str, float]  # 'bbox AP', 'bbox AP50', ..., 'segm APl' -> value x 100


@dataclass
class ModelResults:
    """Everything one work_dir says about its model."""
    name: str
    work_dir: str
    config: Config
    evaluations: Dict[str, Evaluation] = field(default_factory=dict)  # split -> newest
    iteration_times: List[float] = field(default_factory=list)
    complexity: Optional[Dict] = None
    input_shape: Optional[Tuple[int, int]] = None

    def train_time_per_iter(self) -> Optional[float]:
        return statistics.median(self.iteration_times) if self.iteration_times else None


# ---------------------------------------------------------------------------------- reading


def split_name(evaluator_cfg) -> Optional[str]:
    """The split an evaluator scores: its annotation file's name, less 'instances_' and '.json'."""
    if isinstance(evaluator_cfg, (list, tuple)):
        evaluator_cfg = evaluator_cfg[0] if len(evaluator_cfg) == 1 else None
    if not evaluator_cfg or not evaluator_cfg.get('ann_file'):
        return None
    name = osp.splitext(osp.basename(evaluator_cfg['ann_file']))[0]
    return name[len('instances_'):] if name.startswith('instances_') else name


def coco_metrics(logged: Dict) -> Dict[str, float]:
    """'bbox AP', 'segm AP50', ... (x100) from CocoMetric's logged keys, any prefix."""
    metrics = {}
    for task in TASKS:
        for column, suffix in AP_COLUMNS:
            for key, value in logged.items():
                if key.split('/')[-1] == f'{task}_{suffix}' and isinstance(value, (int, float)):
                    metrics[f'{task} {column}'] = 100.0 * value
    return metrics


def read_json_lines(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run(run_dir: str, results: ModelResults) -> None:
    """Add what one ``<timestamp>/`` run folder holds to ``results``."""
    timestamp = osp.basename(run_dir)
    config_path = osp.join(run_dir, 'vis_data', 'config.py')
    config = Config.fromfile(config_path) if osp.isfile(config_path) else None

    test_path = osp.join(run_dir, f'{timestamp}.json')
    if osp.isfile(test_path):  # tools/test.py: one JSON object with the test metrics
        with open(test_path) as f:
            metrics = coco_metrics(json.load(f))
        split = split_name(config.get('test_evaluator')) if config else None
        if metrics and split:
            _keep_newest(results, Evaluation(split, timestamp, metrics))

    scalars_path = osp.join(run_dir, 'vis_data', 'scalars.json')
    if osp.isfile(scalars_path):  # tools/train.py: training iterations and validations
        val_split = split_name(config.get('val_evaluator')) if config else None
        for line in read_json_lines(scalars_path):
            if 'loss' in line and 'time' in line:
                results.iteration_times.append(float(line['time']))
            metrics = coco_metrics(line)
            if metrics and val_split:
                _keep_newest(results, Evaluation(val_split, timestamp, metrics))


def _keep_newest(results: ModelResults, evaluation: Evaluation) -> None:
    known = results.evaluations.get(evaluation.split)
    if known is None or known.timestamp <= evaluation.timestamp:
        results.evaluations[evaluation.split] = evaluation


def read_work_dir(work_dir: str) -> ModelResults:
    """The results of every run in ``work_dir``; raises if it holds no mmengine run."""
    runs = sorted(path for path in glob.glob(osp.join(work_dir, '*'))
                  if osp.isdir(path) and RUN_FOLDER.match(osp.basename(path)))
    configs = [path for path in (osp.join(run, 'vis_data', 'config.py') for run in runs)
               if osp.isfile(path)]
    if not configs:
        raise FileNotFoundError(
            f'{work_dir}: no run of tools/train.py or tools/test.py found (expected '
            f'<timestamp>/vis_data/config.py folders, as mmengine writes them)')
    results = ModelResults(name=osp.basename(osp.normpath(work_dir)), work_dir=work_dir,
                           config=Config.fromfile(configs[-1]))
    for run in runs:
        read_run(run, results)
    return results


# ------------------------------------------------------------------------------- complexity


def test_input_size(config: Config) -> Tuple[int, int]:
    """(height, width) the test pipeline resizes to: Resize's scale, read as (long, short) side."""
    for step in config.test_dataloader.dataset.pipeline:
        if step['type'].split('.')[-1] == 'Resize' and 'scale' in step:
            scale = step['scale']
            scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
            return (min(scale), max(scale))
    raise ValueError('the test pipeline has no Resize with a scale; pass --input-size H W')


def measure_complexity(results: ModelResults, input_size: Optional[Sequence[int]]) -> None:
    from mmengine.registry import MODELS, init_default_scope
    from model_complexity import model_complexity, padded_input_shape

    config = results.config
    init_default_scope(config.get('default_scope', 'mmdet'))
    model_cfg = config.model.copy()
    if model_cfg.get('backbone', {}).get('init_cfg'):
        model_cfg.backbone.init_cfg = None  # the count needs the shapes, not the weights
    detector = MODELS.build(model_cfg)
    height, width = input_size if input_size else test_input_size(config)
    results.input_shape = padded_input_shape(model_cfg, height, width)
    rpn_test_cfg = (model_cfg.get('test_cfg') or {}).get('rpn') or {}
    results.complexity = model_complexity(detector, *results.input_shape,
                                          num_proposals=rpn_test_cfg.get('max_per_img', 1000))


# ----------------------------------------------------------------------------------- tables


def metric_columns(models: Sequence[ModelResults]) -> List[str]:
    present = {key for model in models for evaluation in model.evaluations.values()
               for key in evaluation.metrics}
    return [f'{task} {column}' for task in TASKS for column, _ in AP_COLUMNS
            if f'{task} {column}' in present]


def splits_of(models: Sequence[ModelResults]) -> List[str]:
    seen = []
    for model in models:
        for split in model.evaluations:
            if split not in seen:
                seen.append(split)
    return seen


def table_rows(models: Sequence[ModelResults]) -> Tuple[List[str], List[Dict]]:
    """Header and rows (one per model and split, split None if never evaluated), None where
    a value is unknown."""
    metrics = metric_columns(models)
    header = ['model', 'split', *metrics, 'params (M)', 'GMACs', 'input', 'train s/iter']
    pairs = [(model, split) for split in splits_of(models) for model in models
             if split in model.evaluations]
    pairs += [(model, None) for model in models if not model.evaluations]
    rows = []
    for model, split in pairs:
        evaluation = model.evaluations.get(split)
        complexity = model.complexity
        row = {'model': model.name, 'split': split}
        row.update({column: evaluation.metrics.get(column) if evaluation else None
                    for column in metrics})
        row['params (M)'] = complexity['params'] / 1e6 if complexity else None
        row['GMACs'] = complexity['macs'] / 1e9 if complexity else None
        row['input'] = 'x'.join(map(str, model.input_shape)) if model.input_shape else None
        row['train s/iter'] = model.train_time_per_iter()
        rows.append(row)
    return header, rows


def _format(value, column: str) -> str:
    if value is None:
        return 'n/a' if column in ('params (M)', 'GMACs', 'train s/iter', 'input') else '-'
    if isinstance(value, float):
        return f'{value:.2f}' if column in ('params (M)', 'GMACs', 'train s/iter') else (
            f'{value:.1f}')
    return str(value)


def markdown(models: Sequence[ModelResults], header: List[str], rows: List[Dict]) -> str:
    lines = []
    columns = [column for column in header if column != 'split']
    for split in dict.fromkeys(row['split'] for row in rows):
        lines += [f'### {split}' if split else '### (not evaluated)', '',
                  '| ' + ' | '.join(columns) + ' |',
                  '|' + '|'.join(['---'] + ['---:'] * (len(columns) - 1)) + '|']
        for row in rows:
            if row['split'] == split:
                lines.append('| ' + ' | '.join(_format(row[c], c) for c in columns) + ' |')
        lines.append('')
    lines += notes(models)
    return '\n'.join(lines) + '\n'


def notes(models: Sequence[ModelResults]) -> List[str]:
    uncounted = sorted({op for model in models if model.complexity
                        for op in model.complexity['uncounted_ops']})
    lines = [
        'AP: COCO metrics (pycocotools, via mmdet\'s CocoMetric) x 100. '
        'GMACs: multiply-accumulates of one test forward of a single image of the input '
        'size shown (after padding), two-stage detectors with test_cfg.rpn.max_per_img '
        'proposals; DK and DCN layers counted as in tools/analysis_tools/model_complexity.py. '
        'train s/iter: median logged time of a training iteration (data loading included).',
    ]
    if uncounted:
        lines.append('Not counted in GMACs: ' + ', '.join(f'`{op}`' for op in uncounted) + '.')
    return lines


def write_csv(path: str, header: List[str], rows: List[Dict], models) -> None:
    work_dirs = {model.name: model.work_dir for model in models}
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header + ['work_dir'])
        for row in rows:
            writer.writerow(['' if row[c] is None else row[c] for c in header] +
                            [work_dirs[row['model']]])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR',
                        help='work_dirs of tools/train.py and tools/test.py runs, one per model')
    parser.add_argument('--out', required=True, help='Markdown file to write')
    parser.add_argument('--csv', help='CSV file to write as well')
    parser.add_argument('--input-size', nargs=2, type=int, metavar=('H', 'W'),
                        help='image size for the MACs (default: the test pipeline\'s Resize '
                        'scale, e.g. 800x1333 for mmdet\'s COCO configs)')
    parser.add_argument('--no-complexity', action='store_true',
                        help='skip parameters and MACs (which build and trace each model)')
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    models = [read_work_dir(work_dir) for work_dir in args.work_dirs]
    if not args.no_complexity:
        for model in models:
            measure_complexity(model, args.input_size)
    header, rows = table_rows(models)
    text = markdown(models, header, rows)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    if args.csv:
        write_csv(args.csv, header, rows, models)
    print(text)
    return text


if __name__ == '__main__':
    main()
