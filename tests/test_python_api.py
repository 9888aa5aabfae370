"""mmdet's Python API loads a checkpoint that tools/train.py wrote, from its config alone.

``init_detector`` + ``inference_detector`` and ``DetInferencer`` run in a fresh process that
imports nothing of this project by hand: the config's ``custom_imports`` is all it gets. What
they predict is compared with the model built here from the same checkpoint.
"""
import glob
import json
import os.path as osp
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from mmdet.apis import inference_detector
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import DefaultScope

from dk_mmdet.layers import DKConv2d
from mmdet_fixtures import REPO_ROOT, tool_environment, write_tiny_config
from tool_modules import TOOLS_DIR

MAX_ITERS = 2

# Run in a subprocess; argv: config, checkpoint, image, output JSON.
API_SCRIPT = textwrap.dedent("""
    import json, sys
    from mmdet.apis import DetInferencer, inference_detector, init_detector
    config, checkpoint, image, out = sys.argv[1:]
    assert not [name for name in sys.modules if name.startswith('dk_')], 'imported by hand'
    model = init_detector(config, checkpoint, device='cpu')
    assert 'dk_mmdet' in sys.modules  # by the config's custom_imports
    predicted = inference_detector(model, image).pred_instances
    inferencer = DetInferencer(model=config, weights=checkpoint, device='cpu', show_progress=False)
    inferred = inferencer(image, return_datasamples=True)['predictions'][0].pred_instances
    weight = model.backbone.layer3[0].conv2.weight
    json.dump({'conv2_type': type(model.backbone.layer3[0].conv2).__name__,
               'conv2_weight_sum': weight.double().sum().item(),
               'classes': list(model.dataset_meta['classes']),
               'init_detector': {key: predicted[key].tolist()
                                 for key in ('bboxes', 'scores', 'labels')},
               'DetInferencer': {key: inferred[key].tolist()
                                 for key in ('bboxes', 'scores', 'labels')}}, open(out, 'w'))
""")


@pytest.fixture(scope='module')
def trained(shapes, tmp_path_factory):
    """(config, checkpoint) of a Faster R-CNN DK that tools/train.py trained for 2 iterations."""
    root = tmp_path_factory.mktemp('api')
    train_config = write_tiny_config(str(root / 'tiny_train.py'),
                                     'faster-rcnn_r50-dk-c3-c5_fpn_1x_coco.py', shapes[1],
                                     max_iters=MAX_ITERS, checkpoint_interval=MAX_ITERS)
    work_dir = str(root / 'work_dir')
    result = subprocess.run(
        [sys.executable, osp.join(TOOLS_DIR, 'train.py'), train_config, '--work-dir', work_dir,
         '--cfg-options', f'data_root={shapes[0]}'],
        cwd=REPO_ROOT, env=tool_environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    # What a user keeps: the config as the training ran it (importing dk_mmdet only, not the
    # tests' hooks) and the checkpoint.
    config = str(root / 'model.py')
    cfg = Config.fromfile(train_config)
    cfg.custom_imports = dict(imports=['dk_mmdet'], allow_failed_imports=False)
    cfg.custom_hooks = []
    cfg.data_root = shapes[0]
    cfg.dump(config)
    return config, osp.join(work_dir, f'iter_{MAX_ITERS}.pth')


def model_from(config, checkpoint):
    """The model built here, with the checkpoint's weights read by a trusting torch.load."""
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
    model.load_state_dict(state['state_dict'])
    model.cfg = cfg
    return model.eval(), state['meta']['dataset_meta']['classes']


def test_init_detector_and_det_inferencer_load_a_trained_checkpoint(shapes, trained, tmp_path):
    config, checkpoint = trained
    image = sorted(glob.glob(osp.join(shapes[0], 'val', '*.png')))[0]
    out = str(tmp_path / 'predictions.json')
    env = tool_environment()
    env.pop('PYTHONPATH')  # nothing of tests/ either
    result = subprocess.run([sys.executable, '-c', API_SCRIPT, config, checkpoint, image, out],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    with open(out) as f:
        loaded = json.load(f)

    model, classes = model_from(config, checkpoint)
    weight = model.backbone.layer3[0].conv2.weight
    assert isinstance(model.backbone.layer3[0].conv2, DKConv2d)
    assert loaded['conv2_type'] == 'DKConv2d'
    assert loaded['conv2_weight_sum'] == pytest.approx(weight.double().sum().item(), rel=1e-12)
    assert loaded['classes'] == list(classes)
    with DefaultScope.overwrite_default_scope('mmdet'):
        expected = inference_detector(model, image).pred_instances
    assert len(expected) > 0, 'the model predicted nothing: the comparison would be empty'
    for api in ('init_detector', 'DetInferencer'):
        np.testing.assert_array_equal(loaded[api]['labels'], expected.labels.numpy())
        np.testing.assert_allclose(loaded[api]['scores'], expected.scores.numpy(), rtol=1e-5)
        np.testing.assert_allclose(loaded[api]['bboxes'], expected.bboxes.numpy(), atol=1e-3)

