"""Shared pieces of the mmdet tests: a tiny shapes dataset, tiny train configs, test hooks.

The tools' tests run ``tools/train.py`` in subprocesses on configs written here; those
configs import this module (``custom_imports``) for the hooks below, so it must stay cheap to
import and the subprocesses get ``tests/`` on ``PYTHONPATH``.
"""
import importlib.util
import os
import os.path as osp
import signal
import sys

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

TESTS_DIR = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(TESTS_DIR)
CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'dk')
TOOLS_DIR = osp.join(REPO_ROOT, 'tools')
# Environment variable read by KillAfterIterHook: the iteration after which to die.
KILL_AFTER_ITER_ENV = 'DK_TEST_KILL_AFTER_ITER'
IMAGE_SIZE = 64


def load_make_shapes():
    """tools/data/make_shapes.py as a module (tools/ is not an installed package)."""
    path = osp.join(TOOLS_DIR, 'data', 'make_shapes.py')
    spec = importlib.util.spec_from_file_location('make_shapes', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
