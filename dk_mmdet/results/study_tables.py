"""The tables of a seeded study (:mod:`dk_mmdet.results.study`): Markdown, the summary CSV (one
line per model, split and quantity: mean, sd, paired difference and interval) and the CSV of
every run's value, from which the summary can be recomputed.
"""
import csv
from typing import Dict, List, Optional, Sequence, Tuple

from dk_mmdet.results.seed_statistics import CONFIDENCE, MeanSd, PairedDifference
from dk_mmdet.results.study import Quantity, RunValue, StudyRow
from dk_mmdet.results.tables import (column_notes, complexity_columns, difference_text,
                                     format_cell, markdown_table)
from dk_mmdet.results.work_dirs import TASKS, ResultsPerSeed

CONFIDENCE_COLUMN = f'ci{CONFIDENCE * 100:.0f}'  # ci95
SUMMARY_CSV_HEADER = ('split', 'task', 'metric', 'bin', 'ground_truths', 'model', 'seeds',
                      'mean', 'sd', 'baseline', 'pairs', 'difference',
                      f'{CONFIDENCE_COLUMN}_low', f'{CONFIDENCE_COLUMN}_high')
RUN_VALUES_CSV_HEADER = ('split', 'task', 'metric', 'bin', 'model', 'seed', 'value')


def _mean_sd_cell(spread: Optional[MeanSd], usual_seeds: int) -> str:
    """'mean ± sd', with the number of seeds when some are missing."""
    if spread is None:
        return '-'
    text = f'{spread.mean:.1f}' + (f' ± {spread.sd:.1f}' if spread.sd is not None else '')
    return text if spread.count == usual_seeds else f'{text} (n={spread.count})'


def _difference_cell(difference: Optional[PairedDifference], usual_pairs: int) -> str:
    """'+mean [low, high]', with the number of pairs when some are missing."""
    if difference is None:
        return '-'
    text = difference_text(difference.mean, difference.low, difference.high)
    return text if difference.pairs == usual_pairs else f'{text} (n={difference.pairs})'


def study_markdown(models: Sequence[ResultsPerSeed], rows: Sequence[StudyRow],
                   baselines: Dict[str, ResultsPerSeed]) -> str:
    seeds = {model.name: len(model.seeds) for model in models}
    pairs = {model.name: len(model.seeds.keys() & baselines[model.name].seeds.keys())
             for model in models if model.name in baselines}
    lines = ['## Models', '']
    lines += markdown_table(['model', 'seeds', 'params (M)', 'GMACs', 'input', 'train s/iter'], [
        [model.name, ', '.join(map(str, model.seeds))] +
        [format_cell(value, column) for column, value in
         complexity_columns(model.first, model.train_time_per_iter()).items()]
        for model in models])
    for split in dict.fromkeys(row.split for row in rows):
        lines += [f'## {split}', '']
        for task in TASKS:
            task_rows = {(row.model, row.quantity): row for row in rows
                         if row.split == split and row.quantity.task == task}
            if task_rows:
                lines += task_tables(task, task_rows, seeds, pairs, baselines)
    for note in study_notes(models):  # paragraphs
        lines += [note, '']
    return '\n'.join(lines)


def task_tables(task: str, rows: Dict[Tuple[str, Quantity], StudyRow], seeds: Dict[str, int],
                pairs: Dict[str, int], baselines: Dict[str, ResultsPerSeed]) -> List[str]:
    """The tables of one task on one split: COCO metrics (a row per model), then AP per bin (a
    row per bin), each as mean ± sd over seeds and as paired differences to the baseline.
    ``seeds`` and ``pairs``: per model, the usual number (cells with fewer say so)."""
    def mean_sd(name, quantity):
        row = rows.get((name, quantity))
        return _mean_sd_cell(row.spread if row else None, seeds[name])

    def difference(name, quantity):
        row = rows.get((name, quantity))
        return _difference_cell(row.difference if row else None, pairs[name])

    quantities = list(dict.fromkeys(quantity for _, quantity in rows))
    metrics = [quantity for quantity in quantities if quantity.bin is None]
    bins = [quantity for quantity in quantities if quantity.bin is not None]
    paired = (f'difference to the baseline, paired by seed index: mean '
              f'[{CONFIDENCE:.0%} t-interval]')
    lines = [f'### {task}: mean ± sd over seeds', '']
    lines += markdown_table(['model', 'seeds'] + [quantity.metric for quantity in metrics], [
        [name, str(seeds[name])] + [mean_sd(name, quantity) for quantity in metrics]
        for name in seeds])
    if pairs:
        lines += [f'### {task}: {paired}', '']
        lines += markdown_table(['model', 'baseline', 'pairs'] +
                                [quantity.metric for quantity in metrics], [
            [name, baselines[name].name, str(pairs[name])] +
            [difference(name, quantity) for quantity in metrics] for name in pairs])
    if bins:
        lines += [f'### {task} AP per deformation bin: mean ± sd over seeds', '']
        lines += markdown_table(['bin', 'GTs'] + list(seeds), [
            [quantity.bin.label(), str(quantity.bin.ground_truths)] +
            [mean_sd(name, quantity) for name in seeds] for quantity in bins])
    if bins and pairs:
        lines += [f'### {task} AP per deformation bin: {paired}', '']
        lines += markdown_table(['bin'] + list(pairs), [
            [quantity.bin.label()] + [difference(name, quantity) for name in pairs]
            for quantity in bins])
    return lines


def study_notes(models: Sequence[ResultsPerSeed]) -> List[str]:
    return column_notes([model.first for model in models]) + [
        'Seeds: the seed<k>/ folders of each work_dir; mean ± sd: over the seeds of a model '
        '(sample standard deviation, n - 1), a cell with fewer seeds says (n=...). Difference: '
        'model minus baseline on the same seed index k, averaged over the seeds both have, '
        f'with its {CONFIDENCE:.0%} Student t interval over those pairs (n - 1 degrees of '
        'freedom); none for a single pair. It measures seed-to-seed variation only: the '
        'test images are the same for every seed.',
        'AP per deformation bin (when test runs wrote their detections): bins of equal '
        'ground-truth counts (GTs) per attribute of make_shapes\' "deformation" record: size '
        '(pixels, square root of the unoccluded area), stretch (max(aspect, 1/aspect)), '
        '|shear|, warp. A bin\'s AP is COCO\'s AP (IoU 0.50:0.95) with the ground truths of the '
        'other bins ignored, as COCO ignores those outside an area range: detections matched '
        'to them are left out, detections that match nothing count as false positives in every '
        'bin.',
    ]


def _bin_label(quantity: Quantity) -> str:
    return quantity.bin.label() if quantity.bin else ''


def write_summary_csv(path: str, rows: Sequence[StudyRow]) -> None:
    """One line per model, split and quantity; AP values x 100 with one decimal."""
    def number(value):
        return '' if value is None else f'{value:.1f}'

    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_CSV_HEADER)
        for row in rows:
            bin, difference = row.quantity.bin, row.difference
            writer.writerow([
                row.split, row.quantity.task, row.quantity.metric, _bin_label(row.quantity),
                bin.ground_truths if bin else '', row.model, row.spread.count,
                number(row.spread.mean), number(row.spread.sd), row.baseline or '',
                difference.pairs if difference else '', number(difference and difference.mean),
                number(difference and difference.low), number(difference and difference.high)])


def write_run_values_csv(path: str, values: Sequence[RunValue]) -> None:
    """One line per model, seed, split and quantity, the value (x 100) as Python writes a float
    in full: the summary CSV's numbers are computed from exactly these."""
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(RUN_VALUES_CSV_HEADER)
        for run in values:
            writer.writerow([run.split, run.quantity.task, run.quantity.metric,
                             _bin_label(run.quantity), run.model, run.seed,
                             repr(float(run.value))])
