"""Paper-style results table from mmdet work_dirs: COCO AP, parameters, MACs, training time;
over several seeds, means, standard deviations and paired differences with 95% intervals.

    python tools/analysis_tools/collect_results.py WORK_DIR [WORK_DIR ...] --out results.md \\
        [--csv results.csv] [--input-size H W] [--baseline NAME ...] [--bins N]

One row per work_dir (the model; named after the work_dir) and evaluation split, read from
what mmengine writes for every run of tools/train.py and tools/test.py (model_results.py says
what is read, and how a split is named). AP values are mmdet's CocoMetric (pycocotools)
results, times 100, written with one decimal.

Columns besides AP: parameters; MACs of one test forward at the stated input size (see
tools/analysis_tools/model_complexity.py for what is counted, DK and DCN layers included);
training time per iteration, the median of the logged values.

Seeds. A WORK_DIR whose sub-folders are ``seed<k>/`` (k = 0, 1, ...) is one model trained
once per seed; given such WORK_DIRs (all seeded, or none), the tables report each metric's
mean and standard deviation over the seeds and, with ``--baseline``, each model's difference
to its baseline paired by seed index, with a 95% t-interval (seed_statistics.py). Where test
runs wrote their detections on tools/data/make_shapes.py ground truth, they also report the
AP per bin of deformation (deformation_bins.py).

This file holds the command line, the parameters and MACs, and the single-run table.
"""
import argparse
import csv
import importlib.util
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple

TOOLS_DIR = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(osp.dirname(TOOLS_DIR))
sys.path.insert(0, TOOLS_DIR)  # the modules next to this one, also when it is loaded by path
if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: configs import the repository's dk_mmdet.
    sys.path.insert(0, REPO_ROOT)

from mmengine.config import Config  # noqa: E402

from model_results import (AP_COLUMNS, TASKS, ModelResults, column_notes,  # noqa: E402
                           complexity_columns, format_cell, markdown_table, read_seeded_work_dir,
                           read_work_dir, seed_folders)
from seed_statistics import (baselines_of, study_markdown, study_rows,  # noqa: E402
                             write_study_csv)


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


# ------------------------------------------------------------------------ single-run tables


def metric_columns(models: Sequence[ModelResults]) -> List[str]:
    present = {key for model in models for evaluation in model.evaluations.values()
               for key in evaluation.metrics}
    return [f'{task} {column}' for task in TASKS for column, _ in AP_COLUMNS
            if f'{task} {column}' in present]


def splits_of(models: Sequence[ModelResults]) -> List[str]:
    return list(dict.fromkeys(split for model in models for split in model.evaluations))


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
        row = {'model': model.name, 'split': split}
        row.update({column: evaluation.metrics.get(column) if evaluation else None
                    for column in metrics})
        row.update(complexity_columns(model, model.train_time_per_iter()))
        rows.append(row)
    return header, rows


def markdown(models: Sequence[ModelResults], header: List[str], rows: List[Dict]) -> str:
    lines = []
    columns = [column for column in header if column != 'split']
    for split in dict.fromkeys(row['split'] for row in rows):
        lines += [f'### {split}' if split else '### (not evaluated)', '']
        lines += markdown_table(columns, [[format_cell(row[c], c) for c in columns]
                                          for row in rows if row['split'] == split])
    lines += column_notes(models)
    return '\n'.join(lines) + '\n'


def write_csv(path: str, header: List[str], rows: List[Dict],
              models: Sequence[ModelResults]) -> None:
    work_dirs = {model.name: model.work_dir for model in models}
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header + ['work_dir'])
        for row in rows:
            writer.writerow(['' if row[c] is None else format_cell(row[c], c) for c in header] +
                            [work_dirs[row['model']]])


# ------------------------------------------------------------------------------ command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR',
                        help='work_dirs of tools/train.py and tools/test.py runs, one per model, '
                        'or folders of seed<k>/ work_dirs, one per model')
    parser.add_argument('--out', required=True, help='Markdown file to write')
    parser.add_argument('--csv', help='CSV file to write as well')
    parser.add_argument('--input-size', nargs=2, type=int, metavar=('H', 'W'),
                        help='image size for the MACs (default: the test pipeline\'s Resize '
                        'scale, e.g. 800x1333 for mmdet\'s COCO configs)')
    parser.add_argument('--no-complexity', action='store_true',
                        help='skip parameters and MACs (which build and trace each model)')
    parser.add_argument('--baseline', nargs='+', default=[], metavar='NAME',
                        help='seeded work_dirs: the model(s) the others are compared with, '
                        'paired by seed index, one per detector type (e.g. '
                        'faster-rcnn_r50_fpn_shapes mask-rcnn_r50_fpn_shapes)')
    parser.add_argument('--bins', type=int, default=3,
                        help='seeded work_dirs: quantile bins per deformation attribute for the '
                        'AP per bin, from test runs that wrote their detections (0: none)')
    args = parser.parse_args(argv)
    if args.bins < 0:
        parser.error(f'--bins must be >= 0, got {args.bins}')
    return args


def write_single_runs(args) -> str:
    if args.baseline:
        raise ValueError('--baseline pairs models by seed: it needs work_dirs of seed<k>/ '
                         'folders')
    models = [read_work_dir(work_dir) for work_dir in args.work_dirs]
    if not args.no_complexity:
        for model in models:
            measure_complexity(model, args.input_size)
    header, rows = table_rows(models)
    text = markdown(models, header, rows)
    if args.csv:
        write_csv(args.csv, header, rows, models)
    return text


def write_study(args) -> str:
    models = [read_seeded_work_dir(work_dir, args.bins) for work_dir in args.work_dirs]
    names = [model.name for model in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f'work_dirs with the same name ({", ".join(repeated)}): one call per '
                         f'protocol')
    baselines = baselines_of(models, args.baseline)
    # baselines first, the others in the order given
    models = sorted(models, key=lambda model: model.name not in args.baseline)
    if not args.no_complexity:
        for model in models:
            measure_complexity(model.first, args.input_size)
    rows = study_rows(models, baselines)
    if args.csv:
        write_study_csv(args.csv, rows)
    return study_markdown(models, rows, baselines)


def main(argv=None) -> str:
    args = parse_args(argv)
    seeded = [work_dir for work_dir in args.work_dirs if seed_folders(work_dir)]
    if seeded and len(seeded) < len(args.work_dirs):
        raise ValueError(f'some work_dirs hold seed<k>/ folders ({", ".join(seeded)}) and '
                         f'others do not: give either kind, not both')
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    text = write_study(args) if seeded else write_single_runs(args)
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)
    return text


if __name__ == '__main__':
    main()
