"""Shared pieces of the mmdet tests: a tiny shapes dataset, tiny train configs, test hooks;
random ImageNet checkpoints in a torch hub cache and a COCO-layout dataset for configs/dk.

The tools' tests run ``tools/train.py`` in subprocesses on configs written here; those
configs import this module (``custom_imports``) for the hooks below, so it must stay cheap to
import and the subprocesses get ``tests/`` on ``PYTHONPATH``.
"""
import glob
import json
import os
import os.path as osp
import pickle
import signal
import socket
import subprocess
import sys

import numpy as np
import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, init_default_scope

from tool_modules import load_tool

TESTS_DIR = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(TESTS_DIR)
CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'dk')
# Environment variable read by KillAfterIterHook: the iteration after which to die.
KILL_AFTER_ITER_ENV = 'DK_TEST_KILL_AFTER_ITER'
IMAGE_SIZE = 64


def load_make_shapes():
    """tools/data/make_shapes.py as a module."""
    return load_tool('data/make_shapes.py')


def make_shapes_dataset(out_dir: str, num_train: int = 4, num_val: int = 2) -> tuple:
    """A few 64x64 shapes images with boxes and masks; returns the class names."""
    make_shapes = load_make_shapes()
    make_shapes.generate(out_dir, num_train=num_train, num_val=num_val, num_hard=0,
                         img_size=IMAGE_SIZE, seed=0, min_objects=1, max_objects=3)
    return make_shapes.CLASSES


TINY_CONFIG = """\
_base_ = {base!r}
custom_imports = dict(imports=['dk_mmdet', 'mmdet_fixtures'], allow_failed_imports=False)

# A thin ResNet-50 (stage widths 64..512 instead of 256..2048) and thin heads, from scratch,
# on 64x64 images: each iteration takes a fraction of a second on a CPU.
num_classes = {num_classes}
model = dict(
    backbone=dict(base_channels=16, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=num_classes),
        {mask_heads}),
    # Samplers that draw no random numbers, so that a resumed run repeats an uninterrupted
    # one exactly: mmengine checkpoints do not hold the random generators' states.
    train_cfg=dict(
        rpn=dict(sampler=dict(_delete_=True, type='PseudoSampler')),
        rcnn=dict(sampler=dict(_delete_=True, type='PseudoSampler'))))

# Paths under mmdet's COCO-style data_root; the tests move them with --cfg-options data_root=.
data_root = 'data/shapes/'
metainfo = dict(classes={classes!r})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json',
                      metric={metrics!r})
val_dataloader = None
val_evaluator = None
val_cfg = None

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={max_iters})
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end={max_iters}, milestones=[3]),
]
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval={checkpoint_interval}),
    logger=dict(type='LoggerHook', interval=1))
custom_hooks = [dict(type='KillAfterIterHook'), dict(type='SaveRankWeightsHook')]
log_processor = dict(by_epoch=False)
randomness = dict(seed=0, deterministic=True)
"""

MASK_HEADS = ("mask_roi_extractor=dict(out_channels=32),\n"
              "        mask_head=dict(in_channels=32, conv_out_channels=32, "
              "num_classes=num_classes)")


def write_tiny_config(path: str, base_config: str, classes: tuple, max_iters: int = 4,
                      checkpoint_interval: int = 2) -> str:
    """A tiny train/test config inheriting ``configs/dk/<base_config>``; returns ``path``."""
    with_mask = base_config.startswith('mask-rcnn')
    text = TINY_CONFIG.format(
        base=osp.join(CONFIG_DIR, base_config), num_classes=len(classes), classes=classes,
        mask_heads=MASK_HEADS if with_mask else '', with_mask=with_mask, size=IMAGE_SIZE,
        metrics=['bbox', 'segm'] if with_mask else ['bbox'], max_iters=max_iters,
        checkpoint_interval=checkpoint_interval)
    with open(path, 'w') as f:
        f.write(text)
    return path


def tool_environment() -> dict:
    """Environment for the tools' subprocesses: this module importable, one thread each."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [TESTS_DIR] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['PYTHON'] = sys.executable
    env.pop(KILL_AFTER_ITER_ENV, None)
    return env


def run(command, env=None, expect_success=True):
    """``command`` run from the repository root, by default in ``tool_environment()``; unless
    told otherwise, a non-zero exit raises with the ends of its output."""
    result = subprocess.run(command, cwd=REPO_ROOT, env=env or tool_environment(),
                            capture_output=True, text=True, timeout=900)
    if expect_success and result.returncode != 0:
        raise AssertionError(f'{command} exited with {result.returncode}\n'
                             f'stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}')
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def build_with_seed(cfg, seed=0):
    """The mmdet model of ``cfg``, built and initialised after seeding torch with ``seed``, in
    eval mode."""
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    torch.manual_seed(seed)
    model = MODELS.build(cfg)
    model.init_weights()
    model.eval()  # mmdet's ResNet.train() returns None, so no chaining
    return model


def differing_keys(ours, theirs) -> set:
    """The dotted keys of the leaves in which config (or config dict) ``ours`` differs from
    ``theirs``, ignoring the ``_scope_`` keys that mmengine adds to every dict inherited through
    'mmdet::'; lists (pipelines) are leaves."""

    def flatten(value, prefix=''):
        if isinstance(value, dict):
            flat = {}
            for key, item in value.items():
                if key != '_scope_':
                    flat.update(flatten(item, f'{prefix}{key}.'))
            return flat
        if isinstance(value, (list, tuple)):
            return {prefix[:-1]: [flatten(item) if isinstance(item, dict) else item
                                  for item in value]}
        return {prefix[:-1]: value}

    ours, theirs = flatten(ours.to_dict()), flatten(theirs.to_dict())
    return {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}


# mmdet's CocoMetric names of COCOeval.stats[0:6]
METRIC_NAMES = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')


def reported_metrics(work_dir: str) -> dict:
    """The metrics test.py logged, from the json log of its run."""
    logs = glob.glob(osp.join(work_dir, '*', '*.json'))
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def coco_stats(annotation_file: str, predictions_pkl: str, classes: tuple, iou_type: str):
    """COCOeval of test.py's dumped predictions, computed here with pycocotools directly."""
    # Imported here: the tiny configs import this module, which must stay cheap.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with open(predictions_pkl, 'rb') as f:
        predictions = pickle.load(f)
    ground_truth = COCO(annotation_file)
    category_ids = ground_truth.getCatIds(catNms=list(classes))
    detections = []
    for prediction in predictions:
        instances = prediction['pred_instances']
        for index, (box, score, label) in enumerate(
                zip(instances['bboxes'].tolist(), instances['scores'].tolist(),
                    instances['labels'].tolist())):
            detection = dict(image_id=prediction['img_id'], category_id=category_ids[label],
                             score=score)
            if iou_type == 'bbox':
                detection['bbox'] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                detection['segmentation'] = instances['masks'][index]
            detections.append(detection)
    assert detections, 'the model predicted nothing: the comparison would be empty'
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), iou_type)
    evaluation.params.maxDets = [100, 300, 1000]  # as mmdet's CocoMetric
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation.stats[:6]


def assert_metrics_match_pycocotools(metrics: dict, predictions_pkl: str, data_root: str,
                                     classes: tuple, iou_types) -> None:
    """What test.py reported equals pycocotools' COCOeval of the predictions it dumped."""
    annotation_file = osp.join(data_root, 'annotations', 'instances_val.json')
    for iou_type in iou_types:
        expected = coco_stats(annotation_file, predictions_pkl, classes, iou_type)
        reported = [metrics[f'coco/{iou_type}_{name}'] for name in METRIC_NAMES]
        np.testing.assert_allclose(reported, expected, atol=6e-4)  # mmdet rounds to 3 digits


@HOOKS.register_module()
class KillAfterIterHook(Hook):
    """SIGKILLs its own process after the iteration named by ``DK_TEST_KILL_AFTER_ITER``.

    It runs after the CheckpointHook, like a crash right after that iteration ended.
    """

    priority = 'LOWEST'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        kill_after = os.environ.get(KILL_AFTER_ITER_ENV)
        if kill_after is not None and runner.iter + 1 == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)


@HOOKS.register_module()
class SaveRankWeightsHook(Hook):
    """After training, every rank saves its model's state dict to ``rank{R}_of_{N}.pth``."""

    priority = 'LOWEST'

    def after_train(self, runner):
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        path = osp.join(runner.work_dir, f'rank{get_rank()}_of_{get_world_size()}.pth')
        torch.save({'state_dict': model.state_dict(), 'iter': runner.iter}, path)


# The ImageNet checkpoints of the configs/dk COCO configs, named by their download URL: torch
# hub caches each as $TORCH_HOME/hub/checkpoints/<file name of the URL> and reads that file
# instead of downloading whenever it exists.
IMAGENET_CHECKPOINT_URLS = {
    50: 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    101: 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
}
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def torchvision_resnet_state_dict(depth: int, groups: int = 1, width_per_group: int = 64,
                                  seed: int = 0) -> dict:
    """Random weights under the keys and shapes of torchvision's ResNet-``depth`` state dict
    (ResNeXt with ``groups`` and ``width_per_group``), which mmdet's ResNet and ResNeXt share.

    Convs are He-normal and batch norms get random affine parameters and running statistics,
    so a network in eval mode computes features of a moderate, non-trivial size.
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}

    def conv(name, out_channels, in_channels, kernel_size, groups=1):
        fan_in = in_channels // groups * kernel_size**2
        state_dict[name + '.weight'] = torch.randn(
            out_channels, in_channels // groups, kernel_size, kernel_size,
            generator=generator) * (2 / fan_in)**0.5

    def batch_norm(name, channels):
        state_dict[name + '.weight'] = torch.rand(channels, generator=generator) * 0.5 + 0.5
        state_dict[name + '.bias'] = torch.randn(channels, generator=generator) * 0.1
        state_dict[name + '.running_mean'] = torch.randn(channels, generator=generator) * 0.1
        state_dict[name + '.running_var'] = torch.rand(channels, generator=generator) + 0.5
        state_dict[name + '.num_batches_tracked'] = torch.tensor(0)

    conv('conv1', 64, 3, 7)
    batch_norm('bn1', 64)
    in_channels = 64
    for stage, blocks in enumerate(RESNET_BLOCKS[depth]):
        planes = 64 * 2**stage
        width = planes * width_per_group // 64 * groups
        for block in range(blocks):
            prefix = f'layer{stage + 1}.{block}.'
            conv(prefix + 'conv1', width, in_channels, 1)
            batch_norm(prefix + 'bn1', width)
            conv(prefix + 'conv2', width, width, 3, groups)
            batch_norm(prefix + 'bn2', width)
            conv(prefix + 'conv3', planes * 4, width, 1)
            batch_norm(prefix + 'bn3', planes * 4)
            if block == 0:
                conv(prefix + 'downsample.0', planes * 4, in_channels, 1)
                batch_norm(prefix + 'downsample.1', planes * 4)
            in_channels = planes * 4
    state_dict['fc.weight'] = torch.randn(1000, in_channels, generator=generator) * 0.01
    state_dict['fc.bias'] = torch.zeros(1000)
    return state_dict


def write_hub_checkpoint(torch_home: str, url: str, state_dict: dict) -> str:
    """Saves ``state_dict`` where torch hub caches the file of ``url``; returns the path."""
    path = osp.join(torch_home, 'hub', 'checkpoints', osp.basename(url))
    os.makedirs(osp.dirname(path), exist_ok=True)
    torch.save(state_dict, path)
    return path


# COCO numbers its 80 categories from 1 to 90 with these gaps; mmdet's CocoDataset lists the
# names in the order of the ids.
COCO_UNUSED_CATEGORY_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)


def make_coco_layout_dataset(root: str, num_train: int = 4, num_val: int = 2,
                             image_size=(128, 96), seed: int = 0) -> None:
    """A few images of filled rectangles laid out as COCO 2017, with COCO's categories.

    Writes ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/*.png`` under
    ``root``; every object is a box with its polygon mask, labelled with one of COCO's
    categories, so mmdet's ``CocoDataset`` keeps every annotation.
    """
    # Imported here: the tiny configs import this module, which must stay cheap.
    import cv2
    from mmdet.datasets import CocoDataset

    category_ids = [i for i in range(1, 91) if i not in COCO_UNUSED_CATEGORY_IDS]
    categories = [dict(id=category_id, name=name) for category_id, name in zip(
        category_ids, CocoDataset.METAINFO['classes'], strict=True)]
    rng = np.random.default_rng(seed)
    width, height = image_size
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    for split, num_images in (('train2017', num_train), ('val2017', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, num_images + 1):
            image = np.full((height, width, 3), 127, np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                w, h = (int(v) for v in rng.integers(16, 48, size=2))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                image[y:y + h, x:x + w] = rng.integers(0, 256, size=3)
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id,
                    category_id=int(rng.choice(category_ids)), bbox=[x, y, w, h],
                    area=w * h, iscrowd=0,
                    segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]]))
            file_name = f'{image_id:012d}.png'
            cv2.imwrite(osp.join(root, split, file_name), image)
            images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
