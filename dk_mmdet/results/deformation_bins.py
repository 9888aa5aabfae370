"""AP per bin of deformation, for tools/analysis_tools/collect_results.py.

A test run whose ``test_evaluator.outfile_prefix`` was set
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
import contextlib
import functools
import io
import json
import os.path as osp
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

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


def _existing_path(path: str) -> str:
    """A path from a config: as it is when it exists from here, else from the repository root
    (where tools/run_study.py and the Makefile run everything)."""
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
        try:
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
        finally:  # the cached ground truths (load_ground_truth) as they were, whatever happens
            for gt in ground_truths:
                gt['ignore'] = crowd[gt['id']]
    return aps


def bin_aps_of_test_run(evaluator_cfg, tasks: Sequence[str],
                        num_bins: int) -> Dict[Tuple[str, Bin], Optional[float]]:
    """{(task, bin): AP x 100} of the detections a test run's CocoMetric wrote to its
    ``outfile_prefix``, for each of ``tasks`` (those the run reported: 'bbox', 'segm')."""
    ann_file = _existing_path(evaluator_cfg['ann_file'])
    coco_gt = load_ground_truth(ann_file)
    bins = attribute_bins(ann_file, num_bins)
    bin_aps = {}
    for task in tasks:
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
