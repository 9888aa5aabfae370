"""tools/train.py and tools/test.py on a configs/dk COCO config as it is, ImageNet start included.

The config runs unchanged but for what makes it take seconds: a 4-image dataset laid out as
COCO 2017 (``--cfg-options data_root=``), 128x96 images kept at that size, one epoch (two
iterations), no dataloader workers, and every detection kept (an untrained head scores about
1/81 per class, under the default threshold). The ImageNet weights come from a random
torchvision-layout ResNet-50 in a temporary torch hub cache (``TORCH_HOME``), which the
training must read rather than download.
"""
import hashlib
import os
import os.path as osp
import sys

import torch
from mmengine.config import Config

from mmdet_fixtures import (CONFIG_DIR, IMAGENET_CHECKPOINT_URLS, METRIC_NAMES,
                            make_coco_layout_dataset, reported_metrics, run, tool_environment,
                            torchvision_resnet_state_dict, write_hub_checkpoint)
from tool_modules import TOOLS_DIR

TRAIN = osp.join(TOOLS_DIR, 'train.py')
TEST = osp.join(TOOLS_DIR, 'test.py')
CONFIG = osp.join(CONFIG_DIR, 'faster-rcnn_r50-dk-c3-c5_fpn_1x_coco.py')
IMAGE_SIZE = (128, 96)


def small_run_options(data_root):
    size = f'({IMAGE_SIZE[0]},{IMAGE_SIZE[1]})'
    options = [f'data_root={data_root}', 'train_cfg.max_epochs=1',
               'model.test_cfg.rcnn.score_thr=0.0',
               f'train_dataloader.dataset.pipeline.2.scale={size}',
               f'val_dataloader.dataset.pipeline.1.scale={size}',
               f'test_dataloader.dataset.pipeline.1.scale={size}']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [f'{loader}.num_workers=0', f'{loader}.persistent_workers=False']
    return options


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_train_from_imagenet_weights_then_test(tmp_path):
    data_root = str(tmp_path / 'coco')
    make_coco_layout_dataset(data_root, num_train=4, num_val=2, image_size=IMAGE_SIZE)
    torch_home = str(tmp_path / 'torch_home')
    imagenet = torchvision_resnet_state_dict(50)
    hub_file = write_hub_checkpoint(torch_home, IMAGENET_CHECKPOINT_URLS[50], imagenet)
    hub_file_hash = sha256(hub_file)
    options = small_run_options(data_root)

    # The scale options above address the pipelines' Resize steps by index.
    cfg = Config.fromfile(CONFIG)
    for loader, index in (('train_dataloader', 2), ('val_dataloader', 1),
                          ('test_dataloader', 1)):
        assert cfg[loader].dataset.pipeline[index].type == 'Resize'
    assert cfg.model.backbone.init_cfg.checkpoint == IMAGENET_CHECKPOINT_URLS[50]

    env = tool_environment()
    env['TORCH_HOME'] = torch_home
    work_dir = str(tmp_path / 'train')
    trained = run([sys.executable, TRAIN, CONFIG, '--work-dir', work_dir, '--cfg-options',
                   *options], env=env)
    log = trained.stdout + trained.stderr
    assert f'load model from: {IMAGENET_CHECKPOINT_URLS[50]}' in log
    assert f'Loads checkpoint by http backend from path: {IMAGENET_CHECKPOINT_URLS[50]}' in log
    # torch hub read the file: it downloaded nothing, the cache holds only the file written.
    assert 'Downloading' not in log
    assert os.listdir(osp.dirname(hub_file)) == [osp.basename(hub_file)]
    assert sha256(hub_file) == hub_file_hash

    checkpoint_path = osp.join(work_dir, 'epoch_1.pth')
    checkpoint = torch.load(checkpoint_path, map_location='cpu')
    assert checkpoint['meta']['iter'] == 2
    # The stem and c2 are frozen (frozen_stages=1): they still hold the ImageNet weights.
    state_dict = checkpoint['state_dict']
    for key in ('conv1.weight', 'bn1.running_var', 'layer1.0.conv2.weight'):
        assert torch.equal(state_dict['backbone.' + key], imagenet[key]), key

    test_dir = str(tmp_path / 'test')
    run([sys.executable, TEST, CONFIG, checkpoint_path, '--work-dir', test_dir,
         '--cfg-options', *options], env=env)
    metrics = reported_metrics(test_dir)
    for name in METRIC_NAMES:
        # COCOeval's -1: no ground truth in that size range
        assert metrics[f'coco/bbox_{name}'] == -1 or 0 <= metrics[f'coco/bbox_{name}'] <= 1
