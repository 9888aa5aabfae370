"""A seeded study: every model trained once per seed, compared over its seeds.

A study is laid out as

    work_dirs/study/<protocol>/<config>/seed<k>/<timestamp>/...

(:mod:`dk_mmdet.results.work_dirs` reads it, docs/statistics.md shows how to make one). Each
test run gives one value per quantity (a COCO metric of a task on a split, or a task's AP on
one deformation bin); :func:`run_values` lists them, one :class:`RunValue` per model, seed,
split and quantity, and :func:`study_rows` summarises them per model: mean and sd over its
seeds and, where the model has a baseline (the model of ``--baseline`` with the same detector,
``model.type`` in the config), the difference paired by seed index
(:mod:`dk_mmdet.results.seed_statistics`).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from dk_mmdet.results.deformation_bins import ATTRIBUTES, Bin
from dk_mmdet.results.seed_statistics import (MeanSd, PairedDifference, mean_and_sd,
                                              paired_difference)
from dk_mmdet.results.work_dirs import (AP_COLUMNS, TASKS, Evaluation, ResultsPerSeed,
                                        read_seed_work_dirs)


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


@dataclass(frozen=True)
class RunValue:
    """What one test run (a model's seed) measured of one quantity on one split."""
    split: str
    quantity: Quantity
    model: str
    seed: int
    value: float


def seed_values(model: ResultsPerSeed, split: str, quantity: Quantity) -> Dict[int, float]:
    """{seed index: value} over the seeds that measured ``quantity`` on ``split``."""
    values = {}
    for k, results in model.seeds.items():
        evaluation = results.evaluations.get(split)
        value = quantity.value(evaluation) if evaluation else None
        if value is not None:
            values[k] = value
    return values


def quantities_of(models: Sequence[ResultsPerSeed], split: str) -> List[Quantity]:
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


def run_values(models: Sequence[ResultsPerSeed]) -> List[RunValue]:
    """Every value of every seed of ``models``: by split, quantity, model, then seed."""
    splits = dict.fromkeys(split for model in models for results in model.seeds.values()
                           for split in results.evaluations)
    return [RunValue(split, quantity, model.name, seed, value)
            for split in splits for quantity in quantities_of(models, split)
            for model in models
            for seed, value in seed_values(model, split, quantity).items()]


def baselines_of(models: Sequence[ResultsPerSeed],
                 names: Sequence[str]) -> Dict[str, ResultsPerSeed]:
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


def read_study(work_dirs: Sequence[str], baseline_names: Sequence[str],
               num_bins: int) -> Tuple[List[ResultsPerSeed], Dict[str, ResultsPerSeed]]:
    """The models of ``work_dirs`` (folders of ``seed<k>/`` work_dirs), the baselines first,
    and {model name: its baseline} (:func:`baselines_of`); ``num_bins`` as in
    :func:`~dk_mmdet.results.work_dirs.read_run`."""
    models = [read_seed_work_dirs(work_dir, num_bins) for work_dir in work_dirs]
    names = [model.name for model in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f'work_dirs with the same name ({", ".join(repeated)}): one call per '
                         f'protocol')
    baselines = baselines_of(models, baseline_names)
    models.sort(key=lambda model: model.name not in baseline_names)  # stable: in given order
    return models, baselines


@dataclass
class StudyRow:
    """One quantity of one model on one split, over its seeds."""
    split: str
    quantity: Quantity
    model: str
    spread: MeanSd
    baseline: Optional[str] = None
    difference: Optional[PairedDifference] = None


def study_rows(values: Sequence[RunValue], baselines: Dict[str, str]) -> List[StudyRow]:
    """A row per split, quantity and model of ``values``, in their order; ``baselines``: {model
    name: its baseline's name}."""
    by_seed: Dict[tuple, Dict[int, float]] = {}
    for run in values:
        by_seed.setdefault((run.split, run.quantity, run.model), {})[run.seed] = run.value
    rows = []
    for (split, quantity, model), seeds in by_seed.items():
        row = StudyRow(split, quantity, model, mean_and_sd(list(seeds.values())))
        baseline = baselines.get(model)
        if baseline is not None:
            row.baseline = baseline
            row.difference = paired_difference(seeds, by_seed.get((split, quantity, baseline),
                                                                   {}))
        rows.append(row)
    return rows
