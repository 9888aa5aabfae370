"""What the work_dirs of tools/train.py and tools/test.py runs say about each model.

What is read is what mmengine writes under a work_dir for every run of tools/train.py and
tools/test.py, in a ``<timestamp>/`` folder:

- ``vis_data/config.py``: the run's config (models are built from the newest one);
- ``vis_data/scalars.json``: one JSON line per logged training iteration (``time``: seconds
  per iteration, data loading included) and per validation during training (metrics);
- ``<timestamp>.json``: the metrics of a test run.

A result's split is named after its evaluator's annotation file (``instances_val2017.json`` ->
``val2017``, ``instances_test_hard.json`` -> ``test_hard``); when a split was evaluated more
than once (validation during training, then tests), the newest evaluation counts. AP values
are mmdet's CocoMetric (pycocotools) results, times 100.

A work_dir whose sub-folders are ``seed<k>/`` (k = 0, 1, ...) is one model trained once per
seed, each ``seed<k>/`` a work_dir as above (docs/statistics.md shows the layout of a study).
"""
import glob
import json
import os.path as osp
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from mmengine.config import Config

from dk_mmdet.results.deformation_bins import Bin, bin_aps_of_test_run

# (column name, CocoMetric key suffix) of the COCO summary, for each task CocoMetric reports.
AP_COLUMNS = (('AP', 'mAP'), ('AP50', 'mAP_50'), ('AP75', 'mAP_75'), ('APs', 'mAP_s'),
              ('APm', 'mAP_m'), ('APl', 'mAP_l'))
TASKS = ('bbox', 'segm')
RUN_FOLDER = re.compile(r'^\d{8}_\d{6}$')  # mmengine's timestamp, e.g. 20261125_140255
SEED_FOLDER = re.compile(r'^seed(\d+)$')


@dataclass
class Evaluation:
    """The COCO metrics of one split, from one run."""
    split: str
    timestamp: str
    metrics: Dict[str, float]  # 'bbox AP', 'bbox AP50', ..., 'segm APl' -> value x 100
    bin_aps: Dict[Tuple[str, Bin], Optional[float]] = field(default_factory=dict)  # x 100


@dataclass
class WorkDirResults:
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


@dataclass
class ResultsPerSeed:
    """One model trained once per seed: the results of each of its ``seed<k>/`` work_dirs."""
    name: str
    seeds: Dict[int, WorkDirResults]  # seed index -> that seed's results

    @property
    def first(self) -> WorkDirResults:
        """The lowest seed's results, for what all seeds share: config, complexity."""
        return self.seeds[min(self.seeds)]

    def train_time_per_iter(self) -> Optional[float]:
        times = [time for seed in self.seeds.values() for time in seed.iteration_times]
        return statistics.median(times) if times else None


def single_evaluator(evaluator_cfg):
    """The evaluator config, if it is one (a list of one counts); None otherwise."""
    if isinstance(evaluator_cfg, (list, tuple)):
        evaluator_cfg = evaluator_cfg[0] if len(evaluator_cfg) == 1 else None
    return evaluator_cfg or None


def split_name(evaluator_cfg) -> Optional[str]:
    """The split an evaluator scores: its annotation file's name, less 'instances_' and '.json'."""
    evaluator_cfg = single_evaluator(evaluator_cfg)
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


def read_run(run_dir: str, results: WorkDirResults, num_bins: int = 0) -> None:
    """Add what one ``<timestamp>/`` run folder holds to ``results``; with ``num_bins``, the AP
    per deformation bin of the detections a test run wrote, if it wrote them."""
    timestamp = osp.basename(run_dir)
    config_path = osp.join(run_dir, 'vis_data', 'config.py')
    config = Config.fromfile(config_path) if osp.isfile(config_path) else None

    test_path = osp.join(run_dir, f'{timestamp}.json')
    if osp.isfile(test_path):  # tools/test.py: one JSON object with the test metrics
        with open(test_path) as f:
            metrics = coco_metrics(json.load(f))
        evaluator_cfg = single_evaluator(config.get('test_evaluator')) if config else None
        split = split_name(evaluator_cfg)
        if metrics and split:
            evaluation = Evaluation(split, timestamp, metrics)
            if num_bins and evaluator_cfg.get('outfile_prefix'):
                reported = [task for task in TASKS if f'{task} AP' in metrics]
                evaluation.bin_aps = bin_aps_of_test_run(evaluator_cfg, reported, num_bins)
            _keep_newest(results, evaluation)

    scalars_path = osp.join(run_dir, 'vis_data', 'scalars.json')
    if osp.isfile(scalars_path):  # tools/train.py: training iterations and validations
        val_split = split_name(config.get('val_evaluator')) if config else None
        for line in read_json_lines(scalars_path):
            if 'loss' in line and 'time' in line:
                results.iteration_times.append(float(line['time']))
            metrics = coco_metrics(line)
            if metrics and val_split:
                _keep_newest(results, Evaluation(val_split, timestamp, metrics))


def _keep_newest(results: WorkDirResults, evaluation: Evaluation) -> None:
    known = results.evaluations.get(evaluation.split)
    if known is None or known.timestamp <= evaluation.timestamp:
        results.evaluations[evaluation.split] = evaluation


def work_dir_name(work_dir: str) -> str:
    """A model is named after its work_dir: the folder's own name."""
    return osp.basename(osp.normpath(work_dir))


def read_work_dir(work_dir: str, num_bins: int = 0) -> WorkDirResults:
    """The results of every run in ``work_dir``; raises if it holds no mmengine run."""
    runs = sorted(path for path in glob.glob(osp.join(work_dir, '*'))
                  if osp.isdir(path) and RUN_FOLDER.match(osp.basename(path)))
    configs = [path for path in (osp.join(run, 'vis_data', 'config.py') for run in runs)
               if osp.isfile(path)]
    if not configs:
        raise FileNotFoundError(
            f'{work_dir}: no run of tools/train.py or tools/test.py found (expected '
            f'<timestamp>/vis_data/config.py folders, as mmengine writes them)')
    results = WorkDirResults(name=work_dir_name(work_dir), work_dir=work_dir,
                           config=Config.fromfile(configs[-1]))
    for run in runs:
        read_run(run, results, num_bins)
    return results


def seed_folders(work_dir: str) -> Dict[int, str]:
    """{k: path} of the ``seed<k>/`` folders of ``work_dir``, by k."""
    found = {}
    for path in glob.glob(osp.join(work_dir, 'seed*')):
        match = SEED_FOLDER.match(osp.basename(path))
        if match and osp.isdir(path):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_seed_work_dirs(work_dir: str, num_bins: int) -> ResultsPerSeed:
    """The results of each ``seed<k>/`` work_dir of ``work_dir``, one model."""
    seeds = {k: read_work_dir(path, num_bins) for k, path in seed_folders(work_dir).items()}
    return ResultsPerSeed(name=work_dir_name(work_dir), seeds=seeds)
