"""Statistics over seeds for tools/analysis_tools/collect_results.py, and the study tables
(Markdown, CSV) that report them.

A study is laid out as

    work_dirs/study/<protocol>/<config>/seed<k>/<timestamp>/...

with ``tools/train.py CONFIG --work-dir .../seed<k> --cfg-options randomness.seed=<k>`` and the
tests of that checkpoint in the same folder; one call of collect_results.py per protocol, given
every ``<config>/`` of it. Each metric is reported as the mean and the standard deviation
(n - 1 denominator) over the model's seeds. ``--baseline NAME`` (a work_dir's name, e.g. the
rigid ``faster-rcnn_r50_fpn_shapes``; one per detector) adds each model's difference to the
baseline with the same detector (same ``model.type`` in the config), paired by seed index:
d_k = model_k - baseline_k over the seeds both have, reported as the mean of d and its 95%
Student t interval, mean +- t(0.975, n - 1) * sd(d) / sqrt(n). The metrics include the AP per
deformation bin where test runs wrote their detections (see deformation_bins.py).
"""
import csv
import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from scipy.stats import t as student_t

from deformation_bins import ATTRIBUTES, Bin
from model_results import (AP_COLUMNS, TASKS, Evaluation, SeededModel, column_notes,
                           complexity_columns, format_cell, markdown_table)

CONFIDENCE = 0.95  # of the paired-difference intervals


@dataclass(frozen=True)
class Summary:
    """Mean and standard deviation (n - 1 denominator) of one quantity over seeds."""
    seeds: int
    mean: float
    sd: Optional[float]  # None for a single seed


def summarize(values: Sequence[float]) -> Summary:
    return Summary(len(values), statistics.mean(values),
                   statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of model - baseline over the seed indices both have, with its CONFIDENCE interval."""
    pairs: int
    mean: float
    low: Optional[float]  # None for a single pair
    high: Optional[float]


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """Quantile of Student's t distribution (scipy, which mmdet requires)."""
    return float(student_t.ppf(probability, degrees_of_freedom))


def paired_difference(model: Dict[int, float],
                      baseline: Dict[int, float]) -> Optional[PairedDifference]:
    """From {seed index: value} of a model and of its baseline; None if no seed is in both."""
    seeds = sorted(model.keys() & baseline.keys())
    if not seeds:
        return None
    differences = [model[k] - baseline[k] for k in seeds]
    mean = statistics.mean(differences)
    if len(differences) == 1:
        return PairedDifference(1, mean, None, None)
    half_width = (t_quantile((1 + CONFIDENCE) / 2, len(differences) - 1) *
                  statistics.stdev(differences) / math.sqrt(len(differences)))
    return PairedDifference(len(differences), mean, mean - half_width, mean + half_width)


@dataclass(frozen=True)
class Quantity:
    """One number per test run: a COCO metric of a task, or a task's AP on one bin."""
    task: str
    metric: str  # 'AP', 'AP50', ...; 'AP' for a bin
    bin: Optional[Bin] = None

    def value(self, evaluation: Evaluation) -> Optional[float]:
        value = (evaluation.metrics.get(f'{self.task} {self.metric}') if self.bin is None
                 else evaluation.bin_aps.get((self.task, self.bin)))
        return value if value is not None and value >= 0 else None  # COCO's -1: no objects


def seed_values(model: SeededModel, split: str, quantity: Quantity) -> Dict[int, float]:
    """{seed index: value} over the seeds that measured ``quantity`` on ``split``."""
    values = {}
    for k, results in model.seeds.items():
        evaluation = results.evaluations.get(split)
        value = quantity.value(evaluation) if evaluation else None
        if value is not None:
            values[k] = value
    return values


def quantities_of(models: Sequence[SeededModel], split: str) -> List[Quantity]:
    """The quantities some seed measured on ``split``: per task, COCO metrics then bins."""
    evaluations = [results.evaluations[split] for model in models
                   for results in model.seeds.values() if split in results.evaluations]
    metrics = {key for evaluation in evaluations for key in evaluation.metrics}
    bins = {key for evaluation in evaluations for key in evaluation.bin_aps}
    order = list(ATTRIBUTES)
    quantities = []
    for task in TASKS:
        quantities += [Quantity(task, column) for column, _ in AP_COLUMNS
                       if f'{task} {column}' in metrics]
        quantities += [Quantity(task, 'AP', bin) for bin in sorted(
            (bin for bin_task, bin in bins if bin_task == task),
            key=lambda bin: (order.index(bin.attribute), bin.index))]
    return quantities


def baselines_of(models: Sequence[SeededModel], names: Sequence[str]) -> Dict[str, SeededModel]:
    """{model name: its baseline}: the named model with the same detector (config model.type)."""
    by_name = {model.name: model for model in models}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f'--baseline {" ".join(unknown)}: not the name of a work_dir given '
                         f'(names: {", ".join(by_name)})')
    baselines = [by_name[name] for name in names]
    paired = {}
    for model in models:
        if model.name in names:
            continue
        detector = model.first.config.model.type
        same = [baseline for baseline in baselines
                if baseline.first.config.model.type == detector]
        if len(same) > 1:
            raise ValueError(f'{model.name}: more than one --baseline is a {detector} '
                             f'({", ".join(baseline.name for baseline in same)})')
        if same:
            paired[model.name] = same[0]
    return paired


@dataclass
class StudyRow:
    """One quantity of one model on one split, over its seeds."""
    split: str
    quantity: Quantity
    model: str
    summary: Summary
    baseline: Optional[str] = None
    difference: Optional[PairedDifference] = None


def study_rows(models: Sequence[SeededModel],
               baselines: Dict[str, SeededModel]) -> List[StudyRow]:
    splits = dict.fromkeys(split for model in models for results in model.seeds.values()
                           for split in results.evaluations)
    rows = []
    for split in splits:
        for quantity in quantities_of(models, split):
            for model in models:
                values = seed_values(model, split, quantity)
                if not values:
                    continue
                row = StudyRow(split, quantity, model.name, summarize(list(values.values())))
                baseline = baselines.get(model.name)
                if baseline is not None:
                    row.baseline = baseline.name
                    row.difference = paired_difference(
                        values, seed_values(baseline, split, quantity))
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- tables


def _summary_cell(summary: Optional[Summary], usual_seeds: int) -> str:
    """'mean ± sd', with the number of seeds when some are missing."""
    if summary is None:
        return '-'
    text = f'{summary.mean:.1f}' + (f' ± {summary.sd:.1f}' if summary.sd is not None else '')
    return text if summary.seeds == usual_seeds else f'{text} (n={summary.seeds})'


def _difference_cell(difference: Optional[PairedDifference], usual_pairs: int) -> str:
    """'+mean [low, high]', with the number of pairs when some are missing."""
    if difference is None:
        return '-'
    text = f'{difference.mean:+.1f}'
    if difference.low is not None:
        text += f' [{difference.low:+.1f}, {difference.high:+.1f}]'
    return text if difference.pairs == usual_pairs else f'{text} (n={difference.pairs})'


def study_markdown(models: Sequence[SeededModel], rows: Sequence[StudyRow],
                   baselines: Dict[str, SeededModel]) -> str:
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
                pairs: Dict[str, int], baselines: Dict[str, SeededModel]) -> List[str]:
    """The tables of one task on one split: COCO metrics (a row per model), then AP per bin (a
    row per bin), each as mean ± sd over seeds and as paired differences to the baseline.
    ``seeds`` and ``pairs``: per model, the usual number (cells with fewer say so)."""
    def summary(name, quantity):
        row = rows.get((name, quantity))
        return _summary_cell(row.summary if row else None, seeds[name])

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
        [name, str(seeds[name])] + [summary(name, quantity) for quantity in metrics]
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
            [summary(name, quantity) for name in seeds] for quantity in bins])
    if bins and pairs:
        lines += [f'### {task} AP per deformation bin: {paired}', '']
        lines += markdown_table(['bin'] + list(pairs), [
            [quantity.bin.label()] + [difference(name, quantity) for name in pairs]
            for quantity in bins])
    return lines


def study_notes(models: Sequence[SeededModel]) -> List[str]:
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


STUDY_CSV_HEADER = ('split', 'task', 'metric', 'bin', 'ground_truths', 'model', 'seeds',
                    'mean', 'sd', 'baseline', 'pairs', 'difference',
                    f'ci{CONFIDENCE:.0%}_low'.replace('%', ''),
                    f'ci{CONFIDENCE:.0%}_high'.replace('%', ''))


def write_study_csv(path: str, rows: Sequence[StudyRow]) -> None:
    """One line per model, split and quantity; AP values x 100 with one decimal."""
    def number(value):
        return '' if value is None else f'{value:.1f}'

    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(STUDY_CSV_HEADER)
        for row in rows:
            bin, difference = row.quantity.bin, row.difference
            writer.writerow([
                row.split, row.quantity.task, row.quantity.metric,
                bin.label() if bin else '', bin.ground_truths if bin else '',
                row.model, row.summary.seeds, number(row.summary.mean), number(row.summary.sd),
                row.baseline or '', difference.pairs if difference else '',
                number(difference and difference.mean), number(difference and difference.low),
                number(difference and difference.high)])
