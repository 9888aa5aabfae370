"""tools/image_demo.py draws a DK Mask R-CNN's predictions on generated shapes images (CPU).

The model is freshly built (random weights) and saved the way tools/train.py saves a
checkpoint; what the tool writes is compared with the model's own predictions, computed here.
"""
import glob
import json
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from mmdet.apis import inference_detector
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.registry import DefaultScope
from mmengine.runner.checkpoint import save_checkpoint
from pycocotools import mask as mask_utils

from dk_mmdet.layers import DKConv2d
from mmdet_fixtures import (IMAGE_SIZE, REPO_ROOT, make_shapes_dataset, tool_environment,
                            write_tiny_config)
from tool_modules import TOOLS_DIR

IMAGE_DEMO = osp.join(TOOLS_DIR, 'image_demo.py')


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """(images directory, config, checkpoint, class names, model) of a DK Mask R-CNN."""
    root = tmp_path_factory.mktemp('demo')
    classes = make_shapes_dataset(str(root / 'shapes'), num_train=1, num_val=2)
    config = write_tiny_config(str(root / 'tiny_mask.py'), 'mask-rcnn_r50-dk-c3-c5_fpn_1x_coco.py',
                               classes)
    cfg = Config.fromfile(config)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    model.cfg = cfg
    model.eval()
    assert isinstance(model.backbone.layer3[0].conv2, DKConv2d)

    # As a Runner checkpoint: class names in meta.dataset_meta, the message hub's
    # HistoryBuffers beside the weights (what weights_only loading has to be told about).
    message_hub = MessageHub.get_instance('image_demo_test')
    message_hub.update_scalar('train/loss', 1.0)
    checkpoint = str(root / 'iter_1.pth')
    save_checkpoint({'meta': {'dataset_meta': {'classes': classes}, 'iter': 1},
                     'state_dict': model.state_dict(),
                     'message_hub': message_hub.state_dict()}, checkpoint)
    return str(root / 'shapes' / 'val'), config, checkpoint, classes, model


def run_image_demo(inputs, config, checkpoint, out_dir, score_thr):
    result = subprocess.run(
        [sys.executable, IMAGE_DEMO, inputs, config, checkpoint, '--out-dir', out_dir,
         '--score-thr', str(score_thr)],
        cwd=REPO_ROOT, env=tool_environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    # The class names drawn are the checkpoint's, not mmdet's COCO fallback.
    assert 'use COCO classes by default' not in result.stderr
    return result


def assert_predictions_are_the_models(prediction_file, image_path, model, classes):
    with open(prediction_file) as f:
        written = json.load(f)
    with DefaultScope.overwrite_default_scope('mmdet'):
        expected = inference_detector(model, image_path).pred_instances
    assert len(expected) > 0, 'the model predicted nothing: the comparison would be empty'
    assert len(written['labels']) == len(written['scores']) == len(written['bboxes']) == len(
        written['masks']) == len(expected)
    np.testing.assert_array_equal(written['labels'], expected.labels.numpy())
    assert all(0 <= label < len(classes) for label in written['labels'])
    np.testing.assert_allclose(written['scores'], expected.scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(written['bboxes'], expected.bboxes.numpy(), atol=1e-3)
    for rle, expected_mask in zip(written['masks'], expected.masks.numpy()):
        assert rle['size'] == [IMAGE_SIZE, IMAGE_SIZE]
        decoded = mask_utils.decode(dict(size=rle['size'], counts=rle['counts'].encode()))
        np.testing.assert_array_equal(decoded, expected_mask)


def test_draws_the_predictions_on_every_image_of_a_directory(demo, tmp_path):
    image_dir, config, checkpoint, classes, model = demo
    out_dir = str(tmp_path / 'out')
    run_image_demo(image_dir, config, checkpoint, out_dir, score_thr=0)

    images = sorted(glob.glob(osp.join(image_dir, '*.png')))
    assert len(images) == 2
    assert sorted(osp.basename(path) for path in glob.glob(osp.join(out_dir, 'vis', '*'))) == [
        osp.basename(path) for path in images]
    for image_path in images:
        name = osp.basename(image_path)
        image = cv2.imread(image_path)
        drawn = cv2.imread(osp.join(out_dir, 'vis', name))
        assert drawn.shape == image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        # Every prediction is drawn at threshold 0: boxes, masks and labels cover the image.
        assert (drawn != image).any(axis=2).mean() > 0.5
        assert_predictions_are_the_models(
            osp.join(out_dir, 'preds', osp.splitext(name)[0] + '.json'), image_path, model,
            classes)


def test_predictions_under_the_score_threshold_are_not_drawn(demo, tmp_path):
    image_dir, config, checkpoint, classes, model = demo
    image_path = sorted(glob.glob(osp.join(image_dir, '*.png')))[0]
    out_dir = str(tmp_path / 'out')
    run_image_demo(image_path, config, checkpoint, out_dir, score_thr=1.01)

    name = osp.basename(image_path)
    np.testing.assert_array_equal(cv2.imread(osp.join(out_dir, 'vis', name)),
                                  cv2.imread(image_path))
    # The predictions file still lists every prediction the model keeps.
    assert_predictions_are_the_models(
        osp.join(out_dir, 'preds', osp.splitext(name)[0] + '.json'), image_path, model, classes)


def test_an_input_path_that_does_not_exist_is_named(demo, tmp_path):
    _, config, checkpoint, _, _ = demo
    missing = str(tmp_path / 'no_such_image.png')
    result = subprocess.run(
        [sys.executable, IMAGE_DEMO, missing, config, checkpoint, '--out-dir', str(tmp_path)],
        cwd=REPO_ROOT, env=tool_environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert f'inputs: {missing} does not exist' in result.stderr
