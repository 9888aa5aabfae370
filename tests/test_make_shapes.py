"""The shapes generator's output, checked against pycocotools and mmdet's own CocoDataset."""
import contextlib
import io
import json
import math
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools.data.make_shapes import SPLITS as SPLIT_RANGES
from tools.data.make_shapes import CLASSES, TEMPLATE_SIZE, generate, main, templates

SPLITS = ('train', 'val', 'test_hard')
IMAGE_SIZE = 256  # COCO's small/medium/large thresholds (32^2, 96^2 pixels) all fall inside it


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """A small dataset: enough train and test_hard instances to compare their distributions."""
    out_dir = tmp_path_factory.mktemp('shapes')
    paths = generate(str(out_dir), num_train=30, num_val=4, num_hard=30, img_size=IMAGE_SIZE,
                     seed=3)
    return out_dir, paths


def load_coco(path):
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return COCO(path)


def test_layout_and_categories(dataset):
    out_dir, paths = dataset
    assert paths == {split: str(out_dir / 'annotations' / f'instances_{split}.json')
                     for split in SPLITS}
    for split in SPLITS:
        coco = load_coco(paths[split])
        categories = coco.loadCats(coco.getCatIds())
        assert [category['name'] for category in categories] == list(CLASSES)
        for image in coco.dataset['images']:
            pixels = cv2.imread(str(out_dir / split / image['file_name']), cv2.IMREAD_UNCHANGED)
            assert pixels.shape == (image['height'], image['width'], 3)
            assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
            assert coco.getAnnIds(imgIds=image['id']), 'every image has at least one object'
    train = load_coco(paths['train'])
    assert {ann['category_id'] for ann in train.dataset['annotations']} == set(train.getCatIds())


@pytest.mark.parametrize('split', SPLITS)
def test_masks_match_areas_and_boxes(dataset, split):
    coco = load_coco(dataset[1][split])
    for ann in coco.dataset['annotations']:
        assert ann['iscrowd'] == 0
        mask = mask_utils.decode(ann['segmentation']).astype(bool)
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert ann['area'] == mask.sum() > 0
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and x + w <= IMAGE_SIZE and y + h <= IMAGE_SIZE
        inside = np.zeros_like(mask)
        inside[y:y + h, x:x + w] = True
        assert not (mask & ~inside).any(), 'mask pixels outside the box'
        # the box is tight: each of its four sides touches the mask
        assert mask[y].any() and mask[y + h - 1].any()
        assert mask[:, x].any() and mask[:, x + w - 1].any()
        assert mask_utils.area(ann['segmentation']) == ann['area']


@pytest.mark.parametrize('split', ['train', 'test_hard'])
def test_visible_masks_do_not_overlap(dataset, split):
    coco = load_coco(dataset[1][split])
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(ann) for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() == 1, 'visible parts must not overlap'


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
@pytest.mark.parametrize('split', ['train', 'test_hard'])
def test_ground_truth_scores_perfect_coco_ap(dataset, split, iou_type):
    """Feed the masks back as detections, their boxes recomputed by pycocotools from the masks:
    any disagreement between mask, box, ids and categories lowers the AP below 1."""
    coco = load_coco(dataset[1][split])
    assert all('deformation' in ann for ann in coco.dataset['annotations'])  # an unknown key
    areas = np.array([ann['area'] for ann in coco.dataset['annotations']])
    # all three COCO size ranges are present, so APs/APm/APl are measured, not -1
    assert (areas < 32 ** 2).any() and (areas >= 96 ** 2).any()
    assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).any()
    detections = [{'image_id': ann['image_id'], 'category_id': ann['category_id'], 'score': 1.0,
                   'segmentation': ann['segmentation'],
                   'bbox': mask_utils.toBbox(ann['segmentation']).tolist()}
                  for ann in coco.dataset['annotations']]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75, ap_small, ap_medium, ap_large = evaluator.stats[:6]
    assert (ap, ap50, ap75, ap_small, ap_medium, ap_large) == (1.0,) * 6


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    def files(out_dir):
        paths = [os.path.join(root, name) for root, _, names in os.walk(out_dir) for name in names]
        return {os.path.relpath(path, out_dir): open(path, 'rb').read() for path in paths}

    sizes = dict(num_train=3, num_val=2, num_hard=2, img_size=96)
    generate(str(tmp_path / 'a'), seed=7, **sizes)
    generate(str(tmp_path / 'b'), seed=7, **sizes)
    generate(str(tmp_path / 'c'), seed=8, **sizes)
    first, again, other = files(tmp_path / 'a'), files(tmp_path / 'b'), files(tmp_path / 'c')
    assert len(first) == 3 + 3 + 2 + 2  # three annotation files and seven images
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_more_images_extend_fewer(tmp_path):
    """Image i depends on (seed, split, i) only, so a bigger run starts with the smaller one."""
    generate(str(tmp_path / 'small'), num_train=2, num_val=0, num_hard=0, img_size=96)
    generate(str(tmp_path / 'large'), num_train=4, num_val=0, num_hard=0, img_size=96)
    for name in ('000000.png', '000001.png'):
        small = (tmp_path / 'small' / 'train' / name).read_bytes()
        assert small == (tmp_path / 'large' / 'train' / name).read_bytes()


def elongation(mask):
    """Ratio of the principal axes of a mask's second moments: 1 for a disc, more when stretched."""
    ys, xs = np.nonzero(mask)
    eigenvalues = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    return np.sqrt(eigenvalues[1] / eigenvalues[0])


def test_hard_split_is_more_deformed_than_train(dataset):
    """Measured on the annotations themselves: test_hard spreads wider in object size and its
    masks are more stretched (its aspect and shear ranges are wider)."""
    statistics = {}
    for split in ('train', 'test_hard'):
        coco = load_coco(dataset[1][split])
        anns = coco.dataset['annotations']
        log_sizes = np.log([np.sqrt(ann['area']) for ann in anns])
        log_elongations = np.log([elongation(coco.annToMask(ann)) for ann in anns])
        statistics[split] = (log_sizes, log_elongations)
    train_sizes, train_elongations = statistics['train']
    hard_sizes, hard_elongations = statistics['test_hard']
    assert hard_sizes.std() > 1.1 * train_sizes.std()
    assert hard_sizes.min() < train_sizes.min() and hard_sizes.max() > train_sizes.max()
    assert np.median(hard_elongations) > 1.2 * np.median(train_elongations)


@pytest.mark.parametrize('split', SPLITS)
def test_deformation_records_lie_in_their_split_range(dataset, split):
    """Each annotation's "deformation" record, within the documented range of its split (the
    values are rounded: size to 0.01 pixel, aspect and shear to 1e-4, rotation to 0.01)."""
    _, deformation_range = SPLIT_RANGES[split]
    annotations = load_coco(dataset[1][split]).dataset['annotations']
    for ann in annotations:
        record = ann['deformation']
        assert set(record) == {'size', 'aspect', 'rotation', 'shear', 'warp'}
        low, high = deformation_range.size
        assert low * IMAGE_SIZE - 0.005 <= record['size'] <= high * IMAGE_SIZE + 0.005
        assert 1 / deformation_range.aspect - 5e-5 <= record['aspect']
        assert record['aspect'] <= deformation_range.aspect + 5e-5
        assert 0 <= record['rotation'] <= 360
        assert abs(record['shear']) <= deformation_range.shear + 5e-5
        low, high = deformation_range.warp
        assert low - 5e-5 <= record['warp'] <= high + 5e-5


def predicted_covariance(ann):
    """Second moments (pixels^2) of the instance's mask as its record predicts them, ignoring the
    warp: L C L^T, C the class template's covariance in canonical coordinates, L the documented
    map size / (2 sqrt(fill)) * rotation @ shear @ stretch."""
    record = ann['deformation']
    coverage = templates()[ann['category_id'] - 1].coverage
    rows, cols = np.nonzero(coverage > 0.5)
    canonical = np.linspace(-1.0, 1.0, TEMPLATE_SIZE)
    template_covariance = np.cov(np.stack([canonical[cols], canonical[rows]]))
    angle = math.radians(record['rotation'])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shear = np.array([[1.0, record['shear']], [0.0, 1.0]])
    stretch = np.diag([math.sqrt(record['aspect']), 1 / math.sqrt(record['aspect'])])
    linear_map = record['size'] / (2 * math.sqrt(coverage.mean())) * rotation @ shear @ stretch
    return linear_map @ template_covariance @ linear_map.T


def mask_covariance(ann):
    rows, cols = np.nonzero(mask_utils.decode(ann['segmentation']))
    return np.cov(np.stack([cols, rows]).astype(np.float64))


@pytest.mark.parametrize('split', ['train', 'test_hard'])
def test_deformation_records_agree_with_the_masks(dataset, split):
    """The records describe the drawn geometry: the visible area follows size^2, each nearly
    unoccluded mask has the second moments that size, aspect, rotation and shear predict (an
    inverted aspect, a negated rotation or shear, or a size 20% off miss them by 17 to 40% in
    the median), and the unrecorded remainder grows with the warp."""
    annotations = load_coco(dataset[1][split]).dataset['annotations']
    sizes = np.array([ann['deformation']['size'] for ann in annotations])
    areas = np.array([ann['area'] for ann in annotations])
    assert (areas <= 1.25 * sizes ** 2).all()  # the warp changes the area a little
    assert np.corrcoef(np.log(areas), np.log(sizes))[0, 1] > 0.95

    unoccluded = [ann for ann in annotations
                  if ann['area'] >= 0.9 * ann['deformation']['size'] ** 2]
    assert len(unoccluded) >= 20
    warps = np.array([ann['deformation']['warp'] for ann in unoccluded])
    errors = np.array([np.linalg.norm(mask_covariance(ann) - predicted_covariance(ann)) /
                       np.linalg.norm(predicted_covariance(ann)) for ann in unoccluded])
    assert np.median(errors[warps < 0.1]) < 0.06
    weakest, strongest = warps < np.quantile(warps, 1 / 3), warps >= np.quantile(warps, 2 / 3)
    assert np.median(errors[strongest]) > 1.5 * np.median(errors[weakest])


def test_mmdet_coco_dataset_loads_it(dataset):
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules()
    out_dir, paths = dataset
    loaded = CocoDataset(
        data_root=str(out_dir), ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'), metainfo=dict(classes=CLASSES),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                  dict(type='PackDetInputs')])
    coco = load_coco(paths['train'])
    assert all('deformation' in ann for ann in coco.dataset['annotations'])  # an unknown key
    assert len(loaded) == len(coco.getImgIds())
    sample = loaded[0]['data_samples']
    anns = coco.loadAnns(coco.getAnnIds(imgIds=sample.img_id))
    instances = sample.gt_instances
    assert len(instances) == len(anns) > 0
    expected_boxes = [[x, y, x + w, y + h] for x, y, w, h in (ann['bbox'] for ann in anns)]
    np.testing.assert_array_equal(instances.bboxes.tensor.numpy(), expected_boxes)
    assert [CLASSES[label] for label in instances.labels.tolist()] == \
        [coco.loadCats(ann['category_id'])[0]['name'] for ann in anns]
    np.testing.assert_array_equal(instances.masks.to_ndarray(),
                                  [coco.annToMask(ann) for ann in anns])


def test_mmdet_coco_metric_scores_ground_truth_as_perfect(dataset):
    """mmdet's evaluator, the one the trainings report through, reads the RLE ground truth."""
    import torch
    from mmdet.evaluation import CocoMetric
    path = dataset[1]['val']
    coco = load_coco(path)
    metric = CocoMetric(ann_file=path, metric=['bbox', 'segm'])
    metric.dataset_meta = dict(classes=CLASSES)
    for image in coco.dataset['images']:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image['id']))
        predictions = dict(
            bboxes=torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)],
                                dtype=torch.float32),
            scores=torch.ones(len(anns)),
            labels=torch.tensor([CLASSES.index(coco.loadCats(a['category_id'])[0]['name'])
                                 for a in anns]),
            masks=torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)))
        metric.process({}, [dict(img_id=image['id'], ori_shape=(image['height'], image['width']),
                                 pred_instances=predictions)])
    with contextlib.redirect_stdout(io.StringIO()):
        results = metric.evaluate(size=len(coco.dataset['images']))
    assert results['coco/bbox_mAP'] == results['coco/segm_mAP'] == 1.0


def test_command_line_writes_and_reports_each_split(tmp_path, capsys):
    main(['--out', str(tmp_path), '--num-train', '2', '--num-val', '1', '--num-hard', '1',
          '--img-size', '96', '--seed', '1'])
    printed = capsys.readouterr().out
    for split in SPLITS:
        path = tmp_path / 'annotations' / f'instances_{split}.json'
        assert str(path) in printed
        assert len(json.loads(path.read_text())['images']) == (2 if split == 'train' else 1)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_train=-1), 'num_train'),
    (dict(img_size=32), 'img_size'),
    (dict(min_objects=0), 'min_objects'),
    (dict(min_objects=3, max_objects=2), 'max_objects'),
    (dict(seed=1.5), 'seed'),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        generate(str(tmp_path), **kwargs)
