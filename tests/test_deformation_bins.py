"""tools/analysis_tools/deformation_bins.py: AP per bin of deformation, by hand, against
pycocotools' own area ranges and against what mmdet's CocoMetric writes; end to end through
collect_results.py on a study of seed<k>/ work_dirs (work_dir_fixtures.py).
"""
import contextlib
import io
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tool_modules import load_tool
from work_dir_fixtures import coco_logged, model_config, read_csv, write_run

collect_results = load_tool('analysis_tools/collect_results.py')
deformation_bins = load_tool('analysis_tools/deformation_bins.py')


def ground_truth_file(path, stretches, boxes, categories=1, image_ids=None):
    """A COCO file with one ground truth per box, "deformation" records of the given stretch
    (as aspect) and of arbitrary size, shear and warp."""
    image_ids = image_ids or [1] * len(boxes)
    annotations = [dict(id=i + 1, image_id=image_id, category_id=i % categories + 1, bbox=box,
                        area=box[2] * box[3], iscrowd=0,
                        deformation=dict(size=10.0 + i, aspect=stretch, rotation=0.0,
                                         shear=0.01 * i, warp=0.02 * i))
                   for i, (stretch, box, image_id) in enumerate(zip(stretches, boxes, image_ids))]
    dataset = dict(images=[dict(id=i, width=200, height=200, file_name=f'{i}.png')
                           for i in sorted(set(image_ids))],
                   annotations=annotations,
                   categories=[dict(id=i + 1, name=f'c{i}') for i in range(categories)])
    with open(path, 'w') as f:
        json.dump(dataset, f)
    return path


def detection(box, score, image_id=1, category_id=1):
    return dict(image_id=image_id, category_id=category_id, bbox=box, score=score)


def stretch_bins(ann_file, num_bins):
    return [(bin, members) for bin, members in deformation_bins.attribute_bins(ann_file, num_bins)
            if bin.attribute == 'stretch']


def test_bin_ap_by_hand(tmp_path):
    # Ground truth A (stretch 1.1) and B (stretch 1.9); two bins split at their median, 1.5.
    # Detections, best first: A's box (0.9), a box on nothing (0.8), B's box (0.7).
    # Bin of A: TP, FP, then B's detection ignored: precision 1 at recall 1, AP 100.
    # Bin of B: A's detection ignored, FP, TP: precision 1/2 at every recall, AP 50 (33.3 if A's
    # detection counted as a false positive, 100 if the unmatched one were ignored).
    # Every ground truth at once: precision 1 up to recall 1/2 (51 of COCO's 101 recall points)
    # and 2/3 beyond (50 points): AP = 100 (51 + 50 * 2/3) / 101 = 83.498.
    box_a, box_b = [10, 10, 20, 20], [100, 100, 20, 30]
    ann_file = ground_truth_file(str(tmp_path / 'gt.json'), [1.1, 1.9], [box_a, box_b])
    detections = [detection(box_a, 0.9), detection([150, 10, 20, 20], 0.8),
                  detection(box_b, 0.7)]
    bins = stretch_bins(ann_file, 2)
    assert [(bin.low, bin.high, bin.ground_truths) for bin, _ in bins] == [(None, 1.5, 1),
                                                                            (1.5, None, 1)]
    coco_gt = deformation_bins.load_ground_truth(ann_file)
    aps = deformation_bins.binned_ap(coco_gt, detections, 'bbox', bins)
    assert [aps[bin] for bin, _ in bins] == pytest.approx([100.0, 50.0])
    everything = deformation_bins.binned_ap(coco_gt, detections, 'bbox', stretch_bins(ann_file, 1))
    assert list(everything.values()) == pytest.approx([100 * (51 + 50 * 2 / 3) / 101])
    # no detections at all: AP 0, not an error from pycocotools
    assert set(deformation_bins.binned_ap(coco_gt, [], 'bbox', bins).values()) == {0.0}


def coco_ap_by_area_range(ann_file, detections, value_of_ann, low, high):
    """The bin's AP the way pycocotools scores an area range, run end to end: every ground
    truth's area replaced by its attribute value, every detection's by a value inside the
    range (so that unmatched ones still count), and areaRng [low, high] (COCO's is closed:
    high is nudged below the bin's open end)."""
    with open(ann_file) as f:
        dataset = json.load(f)
    for ann in dataset['annotations']:
        ann['area'] = value_of_ann(ann)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(det) for det in detections])
        for det in coco_dt.anns.values():
            det['area'] = low
        evaluator = COCOeval(coco_gt, coco_dt, 'bbox')
        evaluator.params.areaRng = [[low, np.nextafter(high, -np.inf)]]
        evaluator.params.areaRngLbl = ['bin']
        evaluator.params.maxDets = [100]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval['precision'][:, :, :, 0, -1]
    return 100 * precision[precision > -1].mean()


def test_bin_ap_matches_pycocotools_area_ranges(tmp_path):
    """Four images, two categories, 24 ground truths; detections: jittered copies of most
    ground truths with random scores, some duplicates and boxes on nothing."""
    rng = np.random.default_rng(0)
    num_gts = 24
    corners = rng.uniform(0, 150, size=(num_gts, 2))
    sides = rng.uniform(8, 40, size=(num_gts, 2))
    boxes = np.concatenate([corners, sides], axis=1).round(1).tolist()
    image_ids = rng.integers(1, 5, size=num_gts).tolist()
    stretches = np.exp(rng.uniform(0, 0.8, size=num_gts)).round(4).tolist()
    ann_file = ground_truth_file(str(tmp_path / 'gt.json'), stretches, boxes, categories=2,
                                 image_ids=image_ids)
    detections = []
    for i, (box, image_id) in enumerate(zip(boxes, image_ids)):
        for _ in range(int(rng.integers(0, 3))):  # missed, found, or found twice
            jittered = (np.array(box) + rng.normal(0, 2.5, size=4) * [1, 1, 0.5, 0.5]).tolist()
            detections.append(detection(jittered, float(rng.uniform()), image_id, i % 2 + 1))
    for _ in range(8):
        detections.append(detection(rng.uniform(0, 150, size=4).tolist(), float(rng.uniform()),
                                    int(rng.integers(1, 5)), int(rng.integers(1, 3))))

    coco_gt = deformation_bins.load_ground_truth(ann_file)
    bins = stretch_bins(ann_file, 3)
    assert [bin.ground_truths for bin, _ in bins] == [8, 8, 8]
    aps = deformation_bins.binned_ap(coco_gt, detections, 'bbox', bins)
    lowest, highest = min(stretches), max(stretches)
    for bin, _ in bins:
        expected = coco_ap_by_area_range(
            ann_file, detections, lambda ann: ann['deformation']['aspect'],
            lowest if bin.low is None else bin.low,
            np.nextafter(highest, np.inf) if bin.high is None else bin.high)
        assert aps[bin] == pytest.approx(expected, abs=1e-9)
    assert len(set(aps.values())) == 3  # the bins do differ

    # one bin holding every ground truth: COCO's own AP
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(det) for det in detections]), 'bbox')
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    (everything, ) = deformation_bins.binned_ap(coco_gt, detections, 'bbox',
                                               stretch_bins(ann_file, 1)).values()
    assert everything == pytest.approx(100 * evaluator.stats[0], abs=1e-9)


def test_study_reports_bin_aps_paired_over_seeds(tmp_path, monkeypatch):
    """A study as tools/test.py leaves it with test_evaluator.outfile_prefix set: paths relative
    to the directory the tools ran in, detections in <prefix>.bbox.json."""
    monkeypatch.chdir(tmp_path)
    # Ground truths of stretch 1.1, 1.2 (bin 0) and 1.8, 1.9 (bin 1), one image.
    boxes = [[10, 10, 20, 20], [60, 10, 20, 20], [10, 60, 30, 20], [60, 60, 20, 30]]
    ground_truth_file('gt.json', [1.1, 1.2, 1.8, 1.9], boxes)
    everything = [detection(box, 0.9 - 0.1 * i) for i, box in enumerate(boxes)]
    all_but_last = everything[:3]
    # Bin 1 of a run that misses the last ground truth: precision 1 up to recall 1/2, 51 of the
    # 101 recall points: AP 100 * 51 / 101 = 50.495; finding both: 100.
    # rigid seeds 0, 1, 2 miss, miss, find it: 50.495, 50.495, 100; DK finds it every time.
    # Differences a, a, 0 with a = 100 - 50.495 = 49.505: mean 2a/3 = 33.0, sd a / sqrt(3) =
    # 28.58, interval 33.0 +- 4.303 * a / 3 = 33.0 +- 71.0 = [-38.0, 104.0]. Bin 0: 100 always.
    found = {'rigid': [all_but_last, all_but_last, everything], 'dk': [everything] * 3}
    for name, runs in found.items():
        for k, detections in enumerate(runs):
            seed_dir = osp.join(name, f'seed{k}')
            prefix = osp.join(seed_dir, 'detections', 'val')
            write_run(seed_dir, '20260106_000000',
                      model_config(test_ann='gt.json', outfile_prefix=prefix),
                      test_metrics=coco_logged(first=0.5))
            os.makedirs(osp.dirname(prefix), exist_ok=True)
            with open(f'{prefix}.bbox.json', 'w') as f:
                json.dump(detections, f)

    text = collect_results.main(['rigid', 'dk', '--out', 'study.md', '--csv', 'study.csv',
                                 '--no-complexity', '--baseline', 'rigid', '--bins', '2'])
    rows = {(row['bin'], row['model']): row for row in read_csv('study.csv')
            if row['bin'].startswith('stretch')}
    assert [(row['mean'], row['sd']) for row in (rows['stretch >= 1.5', 'rigid'],
                                                 rows['stretch >= 1.5', 'dk'])] == [
        ('67.0', '28.6'), ('100.0', '0.0')]
    assert [rows['stretch >= 1.5', 'dk'][key]
            for key in ('ground_truths', 'pairs', 'difference', 'ci95_low', 'ci95_high')] == [
        '2', '3', '33.0', '-38.0', '104.0']
    assert rows['stretch < 1.5', 'dk']['difference'] == '0.0'
    assert '### bbox AP per deformation bin: difference to the baseline' in text
    assert '| stretch >= 1.5 | +33.0 [-38.0, +104.0] |' in text
    assert '| stretch < 1.5 | 2 | 100.0 ± 0.0 | 100.0 ± 0.0 |' in text


def test_bin_ap_needs_deformation_records_and_the_detections(tmp_path):
    ann_file = str(tmp_path / 'gt.json')
    ground_truth_file(ann_file, [1.1, 1.5], [[0, 0, 10, 10], [20, 20, 10, 10]])
    with open(ann_file) as f:
        dataset = json.load(f)
    del dataset['annotations'][1]['deformation']
    plain_file = str(tmp_path / 'coco_like.json')
    with open(plain_file, 'w') as f:
        json.dump(dataset, f)
    with pytest.raises(ValueError, match=r'coco_like.json: AP per deformation bin .* \[2\]'):
        deformation_bins.attribute_bins(plain_file, 3)

    seed_dir = str(tmp_path / 'model' / 'seed0')
    write_run(seed_dir, '20260106_000000',
              model_config(test_ann=ann_file, outfile_prefix=str(tmp_path / 'nowhere')),
              test_metrics=coco_logged())
    with pytest.raises(FileNotFoundError, match='nowhere.bbox.json: the test run reported bbox'):
        collect_results.main([str(tmp_path / 'model'), '--out', str(tmp_path / 's.md'),
                              '--no-complexity'])
    with open(tmp_path / 'nowhere.bbox.json', 'w') as f:  # from a split with more images
        json.dump([detection([0, 0, 10, 10], 0.5, image_id=1),
                   detection([0, 0, 10, 10], 0.5, image_id=7)], f)
    with pytest.raises(ValueError, match=r'nowhere.bbox.json: detections on images .* \[7\]'):
        collect_results.main([str(tmp_path / 'model'), '--out', str(tmp_path / 's.md'),
                              '--no-complexity'])


def test_bin_ap_reads_what_coco_metric_writes(tmp_path):
    """mmdet's CocoMetric, given an outfile_prefix (as tools/test.py's --cfg-options
    test_evaluator.outfile_prefix=... sets it), leaves <prefix>.bbox.json and <prefix>.segm.json;
    read back on shapes ground truth, one bin holding every object gives CocoMetric's AP (which
    it rounds to 3 decimals)."""
    from mmdet.evaluation import CocoMetric

    from tools.data.make_shapes import CLASSES, generate
    ann_file = generate(str(tmp_path / 'shapes'), num_train=0, num_val=4, num_hard=0,
                        img_size=96, seed=2)['val']
    coco = deformation_bins.load_ground_truth(ann_file)
    prefix = str(tmp_path / 'detections' / 'val')
    metric = CocoMetric(ann_file=ann_file, metric=['bbox', 'segm'], outfile_prefix=prefix)
    metric.dataset_meta = dict(classes=CLASSES)
    rng = np.random.default_rng(0)
    for image in coco.dataset['images']:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image['id']))[::2]  # half of them found
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)])
        predictions = dict(
            bboxes=(boxes + torch.from_numpy(rng.normal(0, 1.5, size=boxes.shape))).float(),
            scores=torch.from_numpy(rng.uniform(size=len(anns))).float(),
            labels=torch.tensor([ann['category_id'] - 1 for ann in anns]),
            masks=torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)))
        metric.process({}, [dict(img_id=image['id'], ori_shape=(96, 96),
                                 pred_instances=predictions)])
    with contextlib.redirect_stdout(io.StringIO()):
        results = metric.evaluate(size=len(coco.dataset['images']))
    for task in ('bbox', 'segm'):
        with open(f'{prefix}.{task}.json') as f:
            detections = json.load(f)
        (everything, ) = deformation_bins.binned_ap(coco, detections, task,
                                                   stretch_bins(ann_file, 1)).values()
        assert 0 < everything < 100
        assert everything == pytest.approx(100 * results[f'coco/{task}_mAP'], abs=0.05)
