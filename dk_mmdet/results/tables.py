"""The cells every results table writes for a model, and the table of single runs: one row per
work_dir and split with its COCO AP, parameters, MACs and training time per iteration.

AP values are x 100 with one decimal; parameters (millions), GMACs and seconds per iteration
with two.
"""
import csv
from typing import Dict, List, Optional, Sequence, Tuple

from dk_mmdet.results.work_dirs import AP_COLUMNS, TASKS, WorkDirResults

COMPLEXITY_COLUMNS = ('params (M)', 'GMACs', 'input', 'train s/iter')


def complexity_columns(results: WorkDirResults, train_time: Optional[float]) -> Dict:
    complexity = results.complexity
    return {'params (M)': complexity['params'] / 1e6 if complexity else None,
            'GMACs': complexity['macs'] / 1e9 if complexity else None,
            'input': 'x'.join(map(str, results.input_shape)) if results.input_shape else None,
            'train s/iter': train_time}


def format_cell(value, column: str) -> str:
    if value is None:
        return 'n/a' if column in COMPLEXITY_COLUMNS else '-'
    if isinstance(value, float):
        return f'{value:.2f}' if column in ('params (M)', 'GMACs', 'train s/iter') else (
            f'{value:.1f}')
    return str(value)


def difference_text(mean: float, low: Optional[float], high: Optional[float]) -> str:
    """'+0.5 [-0.7, +1.7]': a signed difference and its interval, if it has one."""
    text = f'{mean:+.1f}'
    return text if low is None else f'{text} [{low:+.1f}, {high:+.1f}]'


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    """Lines of a Markdown table, the first column left-aligned, the others right; then ''."""
    return (['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|'] +
            ['| ' + ' | '.join(cells) + ' |' for cells in body] + [''])


def column_notes(models: Sequence[WorkDirResults]) -> List[str]:
    """What the AP, GMACs and train s/iter columns hold; the operators left out of the GMACs."""
    uncounted = sorted({op for model in models if model.complexity
                        for op in model.complexity['uncounted_ops']})
    lines = [
        'AP: COCO metrics (pycocotools, via mmdet\'s CocoMetric) x 100. '
        'GMACs: multiply-accumulates of one test forward of a single image of the input '
        'size shown (after padding), two-stage detectors with test_cfg.rpn.max_per_img '
        'proposals; DK and DCN layers counted as in dk_mmdet/results/complexity.py. '
        'train s/iter: median logged time of a training iteration (data loading included).',
    ]
    if uncounted:
        lines.append('Not counted in GMACs: ' + ', '.join(f'`{op}`' for op in uncounted) + '.')
    return lines


# ------------------------------------------------------------------------ single-run table


def metric_columns(models: Sequence[WorkDirResults]) -> List[str]:
    present = {key for model in models for evaluation in model.evaluations.values()
               for key in evaluation.metrics}
    return [f'{task} {column}' for task in TASKS for column, _ in AP_COLUMNS
            if f'{task} {column}' in present]


def splits_of(models: Sequence[WorkDirResults]) -> List[str]:
    return list(dict.fromkeys(split for model in models for split in model.evaluations))


def table_rows(models: Sequence[WorkDirResults]) -> Tuple[List[str], List[Dict]]:
    """Header and rows (one per model and split, split None if never evaluated), None where
    a value is unknown."""
    metrics = metric_columns(models)
    header = ['model', 'split', *metrics, *COMPLEXITY_COLUMNS]
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


def single_runs_markdown(models: Sequence[WorkDirResults], header: List[str],
                         rows: List[Dict]) -> str:
    lines = []
    columns = [column for column in header if column != 'split']
    for split in dict.fromkeys(row['split'] for row in rows):
        lines += [f'### {split}' if split else '### (not evaluated)', '']
        lines += markdown_table(columns, [[format_cell(row[c], c) for c in columns]
                                          for row in rows if row['split'] == split])
    lines += column_notes(models)
    return '\n'.join(lines) + '\n'


def write_single_runs_csv(path: str, header: List[str], rows: List[Dict],
                          models: Sequence[WorkDirResults]) -> None:
    work_dirs = {model.name: model.work_dir for model in models}
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header + ['work_dir'])
        for row in rows:
            writer.writerow(['' if row[c] is None else format_cell(row[c], c) for c in header] +
                            [work_dirs[row['model']]])
