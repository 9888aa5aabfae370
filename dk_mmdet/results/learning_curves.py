"""Learning curves: a run's val metrics at the iterations where it evaluated during training,
and whether the schedule ran long enough for them to stop rising.

mmengine's logger writes every evaluation during training to ``<work_dir>/<timestamp>/
vis_data/scalars.json``, one JSON line per logging step; an evaluation's line holds the COCO
metrics (``coco/bbox_mAP``, ...) and, with ``log_metric_by_epoch=False``, the training
iteration as ``step``. A run resumed after a kill has one timestamp directory per start; the
curve joins them, the later start winning where both evaluated at the same iteration.

A schedule has *plateaued* when the metric gained less than a threshold over its last fifth:
the last evaluation minus the last one at or before 80% of the schedule.
"""
import csv
import glob
import json
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List

BOX_AP = 'coco/bbox_mAP'
TAIL = 0.2  # the last fifth of the schedule
PLATEAU_GAIN = 0.5  # AP x 100: what the last fifth may gain at most


@dataclass(frozen=True)
class Evaluation:
    """A run's val metrics at one training iteration (AP as mmdet logs it, in [0, 1])."""
    iteration: int
    metrics: Dict[str, float]


def read_curve(work_dir: str) -> List[Evaluation]:
    """Every evaluation of the run in ``work_dir``, in order of iteration."""
    by_iteration = {}
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if BOX_AP in record:
                    iteration = record.pop('step')
                    by_iteration[iteration] = Evaluation(iteration, record)
    return [by_iteration[iteration] for iteration in sorted(by_iteration)]


@dataclass(frozen=True)
class Plateau:
    """The gain of the last fifth of a schedule, in AP x 100, and its verdict."""
    iterations: int  # the schedule's length
    start: Evaluation  # the last evaluation at or before 80% of it
    end: Evaluation  # the last evaluation
    gain: float
    plateaued: bool


def plateau(curve: List[Evaluation], iterations: int, metric: str = BOX_AP) -> Plateau:
    """Whether ``curve`` (of a schedule of ``iterations``) gained less than PLATEAU_GAIN over
    its last fifth. The run must have finished and evaluated before its last fifth began."""
    if not curve or curve[-1].iteration != iterations:
        last = curve[-1].iteration if curve else None
        raise ValueError(f'the curve must end at the schedule\'s last iteration {iterations}, '
                         f'its last evaluation is at {last}')
    boundary = iterations * (1 - TAIL)
    before = [evaluation for evaluation in curve if evaluation.iteration <= boundary]
    if not before:
        raise ValueError(f'no evaluation at or before iteration {boundary:g}, 80% of '
                         f'{iterations}: the curve cannot show the last fifth')
    start, end = before[-1], curve[-1]
    gain = 100 * (end.metrics[metric] - start.metrics[metric])
    return Plateau(iterations, start, end, gain, gain < PLATEAU_GAIN)


def write_curve_csv(path: str, curves: Dict[str, List[Evaluation]],
                    metric: str = BOX_AP) -> None:
    """One row per run and evaluation: run, iteration, the metric in AP x 100."""
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['run', 'iteration', metric])
        for name, curve in curves.items():
            for evaluation in curve:
                writer.writerow([name, evaluation.iteration,
                                 f'{100 * evaluation.metrics[metric]:.1f}'])
