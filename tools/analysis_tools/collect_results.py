"""Paper-style results table from mmdet work_dirs: COCO AP, parameters, MACs, training time;
over several seeds, means, standard deviations and paired differences with 95% intervals.

    python tools/analysis_tools/collect_results.py WORK_DIR [WORK_DIR ...] --out results.md \\
        [--csv results.csv] [--input-size H W] [--baseline NAME ...] [--bins N]

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
are mmdet's CocoMetric (pycocotools) results, times 100, written with one decimal.

Columns besides AP: parameters; MACs of one test forward at the stated input size (see
tools/analysis_tools/model_complexity.py for what is counted, DK and DCN layers included);
training time per iteration, the median of the logged values.

Seeds. A WORK_DIR whose sub-folders are ``seed<k>/`` (k = 0, 1, ...) is one model trained
once per seed, each ``seed<k>/`` a work_dir as above. A study is laid out as

    work_dirs/study/<protocol>/<config>/seed<k>/<timestamp>/...

with ``tools/train.py CONFIG --work-dir .../seed<k> --cfg-options randomness.seed=<k>`` and the
tests of that checkpoint in the same folder; one call of this tool per protocol, given every
``<config>/`` of it (all seeded, or none). Each metric is then reported as the mean and the
standard deviation (n - 1 denominator) over the model's seeds. ``--baseline NAME`` (a work_dir's
name, e.g. the rigid ``faster-rcnn_r50_fpn_shapes``; one per detector) adds each model's
difference to the baseline with the same detector (same ``model.type`` in the config), paired
by seed index: d_k = model_k - baseline_k over the seeds both have, reported as the mean of
d and its 95% Student t interval, mean +- t(0.975, n - 1) * sd(d) / sqrt(n).

AP per bin of deformation. A test run whose ``test_evaluator.outfile_prefix`` was set
(``--cfg-options test_evaluator.outfile_prefix=.../seed<k>/detections/<split>``) left its
detections in ``<prefix>.bbox.json`` (and ``<prefix>.segm.json``), in COCO's result format. On
ground truth from tools/data/make_shapes.py, whose annotations carry their ``deformation``,
seeded models then also get the AP of each bin of each attribute in ``ATTRIBUTES`` (size,
stretch, shear, warp). The bins are the ``--bins`` quantiles of the attribute over the split's
ground truths (equal counts; the same bins for every model), and a bin's AP is COCO's AP with
the other ground truths ignored, the way COCO scores an area range: a detection is matched to
a ground truth of the bin when it overlaps one (IoU over the threshold) that is still free,
else to an ignored one, and is then left out; a detection that matches no ground truth is a
false positive in every bin (COCO would judge it by its own area; it has no deformation).
"""
import argparse
import contextlib
import csv
import functools
import glob
import importlib.util
import io
import json
import math
import os
import os.path as osp
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TOOLS_DIR = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(osp.dirname(TOOLS_DIR))
sys.path.insert(0, TOOLS_DIR)
if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: configs import the repository's dk_mmdet.
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from mmengine.config import Config  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402

# (column name, CocoMetric key suffix) of the COCO summary, for each task CocoMetric reports.
AP_COLUMNS = (('AP', 'mAP'), ('AP50', 'mAP_50'), ('AP75', 'mAP_75'), ('APs', 'mAP_s'),
              ('APm', 'mAP_m'), ('APl', 'mAP_l'))
TASKS = ('bbox', 'segm')
RUN_FOLDER = re.compile(r'^\d{8}_\d{6}$')  # mmengine's timestamp, e.g. 20261125_140255
SEED_FOLDER = re.compile(r'^seed(\d+)$')
CONFIDENCE = 0.95  # of the paired-difference intervals

# Deformation attributes binned for AP: name -> value of a make_shapes ``deformation`` record.
ATTRIBUTES: Dict[str, Callable[[Dict], float]] = {
    'size': lambda record: record['size'],  # pixels: square root of the unoccluded area
    'stretch': lambda record: max(record['aspect'], 1.0 / record['aspect']),  # >= 1
    'shear': lambda record: abs(record['shear']),
    'warp': lambda record: record['warp'],  # largest displacement, canonical half-sides
}


@dataclass(frozen=True)
class Bin:
    """A range [low, high) of one deformation attribute; None: open on that side."""
    attribute: str
    index: int  # 0: the lowest values
    low: Optional[float]
    high: Optional[float]
    ground_truths: int  # of the split, in this bin

    def label(self) -> str:
        if self.low is None:
            return f'{self.attribute} < {self.high:.3g}'
        if self.high is None:
            return f'{self.attribute} >= {self.low:.3g}'
        return f'{self.attribute} {self.low:.3g}-{self.high:.3g}'


@dataclass
class Evaluation:
    """The COCO metrics of one split, from one run."""
    split: str
    timestamp: str
    metrics: Dict[str, float]  # 'bbox AP', 'bbox AP50', ..., 'segm APl' -> value x 100
    bin_aps: Dict[Tuple[str, Bin], Optional[float]] = field(default_factory=dict)  # x 100


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


def read_run(run_dir: str, results: ModelResults, num_bins: int = 0) -> None:
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
                evaluation.bin_aps = bin_aps_of_test_run(evaluator_cfg, metrics, num_bins)
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


def _keep_newest(results: ModelResults, evaluation: Evaluation) -> None:
    known = results.evaluations.get(evaluation.split)
    if known is None or known.timestamp <= evaluation.timestamp:
        results.evaluations[evaluation.split] = evaluation


def read_work_dir(work_dir: str, num_bins: int = 0) -> ModelResults:
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


@dataclass
class SeededModel:
    """One model trained once per seed: the results of each of its ``seed<k>/`` work_dirs."""
    name: str
    work_dir: str
    seeds: Dict[int, ModelResults]  # seed index -> that seed's results

    @property
    def first(self) -> ModelResults:
        """The lowest seed's results, for what all seeds share: config, complexity."""
        return self.seeds[min(self.seeds)]

    def train_time_per_iter(self) -> Optional[float]:
        times = [time for seed in self.seeds.values() for time in seed.iteration_times]
        return statistics.median(times) if times else None


def read_seeded_work_dir(work_dir: str, num_bins: int) -> SeededModel:
    seeds = {k: read_work_dir(path, num_bins) for k, path in seed_folders(work_dir).items()}
    return SeededModel(name=osp.basename(osp.normpath(work_dir)), work_dir=work_dir,
                       seeds=seeds)


# ------------------------------------------------------------------ AP per deformation bin


def _existing_path(path: str) -> str:
    """A path from a config: as it is when it exists from here, else from the repository root
    (where tools/run_compare.sh and the Makefile run everything)."""
    if osp.isabs(path) or osp.exists(path):
        return path
    return osp.join(REPO_ROOT, path)


@functools.lru_cache(maxsize=None)
def load_ground_truth(ann_file: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return COCO(ann_file)


@functools.lru_cache(maxsize=None)
def attribute_bins(ann_file: str, num_bins: int) -> Tuple[Tuple[Bin, frozenset], ...]:
    """(bin, ids of its ground truths) for each attribute, ``num_bins`` quantile bins each."""
    if num_bins < 1:
        raise ValueError(f'num_bins must be >= 1, got {num_bins}')
    annotations = [ann for ann in load_ground_truth(ann_file).dataset['annotations']
                   if not ann.get('iscrowd')]
    unrecorded = [ann['id'] for ann in annotations if 'deformation' not in ann]
    if unrecorded or not annotations:
        raise ValueError(
            f'{ann_file}: AP per deformation bin needs annotations with a "deformation" record '
            f'(tools/data/make_shapes.py writes them); annotation ids without one: '
            f'{unrecorded[:5] or "(no annotations)"}')
    bins = []
    for attribute, value_of in ATTRIBUTES.items():
        values = np.array([value_of(ann['deformation']) for ann in annotations])
        edges = np.quantile(values, np.arange(1, num_bins) / num_bins).tolist()
        indices = np.searchsorted(edges, values, side='right')
        for index in range(num_bins):
            members = frozenset(ann['id'] for ann, i in zip(annotations, indices) if i == index)
            bins.append((Bin(attribute, index, low=edges[index - 1] if index else None,
                             high=edges[index] if index < num_bins - 1 else None,
                             ground_truths=len(members)), members))
    return tuple(bins)


def binned_ap(coco_gt: COCO, detections: List[Dict], iou_type: str,
              bins: Sequence[Tuple[Bin, frozenset]]) -> Dict[Bin, Optional[float]]:
    """COCO AP (x100; IoU 0.50:0.95, all areas, 100 detections per image) of ``detections``
    (COCO result dicts) on each bin's ground truths, the others ignored (see the module's
    docstring); None for a bin without ground truths."""
    if not detections:  # pycocotools cannot load an empty result list; nothing found: AP 0
        return {bin: 0.0 if bin.ground_truths else None for bin, _ in bins}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        # loadRes adds keys to the dicts it is given: give it copies
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(det) for det in detections]),
                             iou_type)
        evaluator.params.areaRng = [[0, 1e5 ** 2]]  # COCO's 'all'
        evaluator.params.areaRngLbl = ['all']
        evaluator.params.maxDets = [100]
        evaluator.evaluate()  # IoUs once; the ground truths' 'ignore' flags say which are crowds
        params = evaluator.params
        # the very dicts evaluate() flagged (and evaluateImg reads)
        ground_truths = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=params.imgIds,
                                                           catIds=params.catIds))
        crowd = {gt['id']: gt['ignore'] for gt in ground_truths}
        aps = {}
        for bin, members in bins:
            for gt in ground_truths:
                gt['ignore'] = crowd[gt['id']] or gt['id'] not in members
            # evaluate()'s per-image matching again, in its order, now with this bin's flags
            evaluator.evalImgs = [evaluator.evaluateImg(image_id, category_id, area_range,
                                                        params.maxDets[-1])
                                  for category_id in params.catIds
                                  for area_range in params.areaRng
                                  for image_id in params.imgIds]
            evaluator.accumulate()
            precision = evaluator.eval['precision'][:, :, :, 0, -1]  # IoU, recall, category
            measured = precision[precision > -1]  # -1: a category without ground truths
            aps[bin] = 100.0 * float(measured.mean()) if measured.size else None
        for gt in ground_truths:
            gt['ignore'] = crowd[gt['id']]
    return aps


def bin_aps_of_test_run(evaluator_cfg, metrics: Dict[str, float],
                        num_bins: int) -> Dict[Tuple[str, Bin], Optional[float]]:
    """{(task, bin): AP x 100} of the detections a test run's CocoMetric wrote to its
    ``outfile_prefix``, for each task the run reported."""
    ann_file = _existing_path(evaluator_cfg['ann_file'])
    coco_gt = load_ground_truth(ann_file)
    bins = attribute_bins(ann_file, num_bins)
    bin_aps = {}
    for task in TASKS:
        if f'{task} AP' not in metrics:
            continue
        detections_path = _existing_path(f'{evaluator_cfg["outfile_prefix"]}.{task}.json')
        if not osp.isfile(detections_path):
            raise FileNotFoundError(
                f'{detections_path}: the test run reported {task} AP on {ann_file} with '
                f'outfile_prefix={evaluator_cfg["outfile_prefix"]!r}, but its detections file '
                f'is not there')
        with open(detections_path) as f:
            detections = json.load(f)
        foreign = {det['image_id'] for det in detections} - set(coco_gt.getImgIds())
        if foreign:
            raise ValueError(
                f'{detections_path}: detections on images that {ann_file} does not have (ids '
                f'{sorted(foreign)[:5]}): written by a test on another split? (give each '
                f'split its own outfile_prefix)')
        aps = binned_ap(coco_gt, detections, task, bins)
        bin_aps.update(((task, bin), ap) for bin, ap in aps.items())
    return bin_aps


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
        row = {'model': model.name, 'split': split}
        row.update({column: evaluation.metrics.get(column) if evaluation else None
                    for column in metrics})
        row.update(complexity_columns(model, model.train_time_per_iter()))
        rows.append(row)
    return header, rows


def complexity_columns(results: ModelResults, train_time: Optional[float]) -> Dict:
    complexity = results.complexity
    return {'params (M)': complexity['params'] / 1e6 if complexity else None,
            'GMACs': complexity['macs'] / 1e9 if complexity else None,
            'input': 'x'.join(map(str, results.input_shape)) if results.input_shape else None,
            'train s/iter': train_time}


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
            writer.writerow(['' if row[c] is None else _format(row[c], c) for c in header] +
                            [work_dirs[row['model']]])


# ------------------------------------------------------------------------ seeds: statistics


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


# ---------------------------------------------------------------------------- seeds: tables


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


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    return (['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|'] +
            ['| ' + ' | '.join(cells) + ' |' for cells in body] + [''])


def study_markdown(models: Sequence[SeededModel], rows: Sequence[StudyRow],
                   baselines: Dict[str, SeededModel]) -> str:
    seeds = {model.name: len(model.seeds) for model in models}
    pairs = {model.name: len(model.seeds.keys() & baselines[model.name].seeds.keys())
             for model in models if model.name in baselines}
    lines = ['## Models', '']
    lines += _table(['model', 'seeds', 'params (M)', 'GMACs', 'input', 'train s/iter'], [
        [model.name, ', '.join(map(str, model.seeds))] +
        [_format(value, column) for column, value in
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
    lines += _table(['model', 'seeds'] + [quantity.metric for quantity in metrics], [
        [name, str(seeds[name])] + [summary(name, quantity) for quantity in metrics]
        for name in seeds])
    if pairs:
        lines += [f'### {task}: {paired}', '']
        lines += _table(['model', 'baseline', 'pairs'] +
                        [quantity.metric for quantity in metrics], [
            [name, baselines[name].name, str(pairs[name])] +
            [difference(name, quantity) for quantity in metrics] for name in pairs])
    if bins:
        lines += [f'### {task} AP per deformation bin: mean ± sd over seeds', '']
        lines += _table(['bin', 'GTs'] + list(seeds), [
            [quantity.bin.label(), str(quantity.bin.ground_truths)] +
            [summary(name, quantity) for name in seeds] for quantity in bins])
    if bins and pairs:
        lines += [f'### {task} AP per deformation bin: {paired}', '']
        lines += _table(['bin'] + list(pairs), [
            [quantity.bin.label()] + [difference(name, quantity) for name in pairs]
            for quantity in bins])
    return lines


def study_notes(models: Sequence[SeededModel]) -> List[str]:
    return notes([model.first for model in models]) + [
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
