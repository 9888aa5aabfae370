"""Every config in configs/dk builds, puts its conv in c3-c5, and trains one step."""
import glob
import os.path as osp
import re

import pytest
import torch
import yaml
from mmcv.ops import ModulatedDeformConv2dPack
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.registry import DefaultScope
from torch import nn

from dk_mmdet.cond_conv import CondConv2d
from dk_mmdet.config_loading import load_config
from dk_mmdet.layers import DKConv2d, DKDCNConv2d, DKGlobalConv2d
from dk_mmdet.mmcv_dcn import ZeroOffsetDeformConv2dPack
from mmdet_fixtures import CONFIG_DIR, IMAGENET_CHECKPOINT_URLS

ALL_CONFIG_FILES = sorted(osp.basename(path)
                          for path in glob.glob(osp.join(CONFIG_DIR, '*.py')))
# conv tag in the file name -> class of the 3x3 conv2 of the Bottlenecks in c3-c5
CONV2_CLASSES = {
    None: nn.Conv2d,
    'dconv': ZeroOffsetDeformConv2dPack,
    'mdconv': ModulatedDeformConv2dPack,
    'condconv': CondConv2d,
    'dk': DKConv2d,
    'dk-global': DKGlobalConv2d,
    'dk-dconv': DKDCNConv2d,
}
BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NAME_PATTERN = re.compile(r'^(faster|mask)-rcnn_r(50|101)(?:-(.+)-c3-c5)?_fpn_1x_coco\.py$')
# The paper's table: Faster / Mask R-CNN, R-50 / R-101. The other detectors and backbones are
# tested in test_more_detectors.py.
CONFIG_FILES = [name for name in ALL_CONFIG_FILES if NAME_PATTERN.match(name)]


def parse_name(config_file):
    match = NAME_PATTERN.match(config_file)
    assert match, f'{config_file} does not follow the naming scheme'
    detector, depth, conv = match.groups()
    return detector, int(depth), conv


def test_the_table_is_complete():
    expected = {f'{detector}-rcnn_r{depth}{"" if conv is None else f"-{conv}-c3-c5"}'
                '_fpn_1x_coco.py'
                for detector in ('faster', 'mask') for depth in (50, 101) for conv in CONV2_CLASSES}
    assert set(CONFIG_FILES) == expected


@pytest.mark.parametrize('config_file', CONFIG_FILES)
def test_config_builds_and_trains_one_step(config_file):
    detector, depth, conv = parse_name(config_file)
    cfg = Config.fromfile(osp.join(CONFIG_DIR, config_file))
    assert 'dk_mmdet' in cfg.custom_imports.imports
    assert cfg.custom_imports.allow_failed_imports is False
    assert cfg.model.backbone.depth == depth
    assert cfg.model.backbone.init_cfg.checkpoint == IMAGENET_CHECKPOINT_URLS[depth]
    # mmdet's 1x schedule, unchanged.
    assert cfg.train_cfg.max_epochs == 12
    assert cfg.optim_wrapper.optimizer.lr == 0.02
    assert cfg.auto_scale_lr.base_batch_size == 16

    cfg.model.backbone.init_cfg = None  # no ImageNet weights here
    # Without zero-initialised last BN of each residual branch, every conv gets a gradient.
    cfg.model.backbone.zero_init_residual = False
    # Fewer proposals and sampled RoIs keep the heads cheap; the backbone is what is tested.
    cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=64)
    cfg.model.train_cfg.rcnn.sampler.num = 32
    # The random draw is the suite's (tests/conftest.py: --seed).
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        model.init_weights()
        backbone = model.backbone
        for stage, blocks in enumerate(BLOCKS_PER_STAGE[depth]):
            res_layer = getattr(backbone, f'layer{stage + 1}')
            assert len(res_layer) == blocks
            expected = nn.Conv2d if stage == 0 else CONV2_CLASSES[conv]
            assert all(type(block.conv2) is expected for block in res_layer)
            # Every offset generator starts at zero after mmdet's Kaiming init, so every conv2
            # starts as the rigid conv (a Kaiming-drawn DCN offset puts the samples tens of
            # pixels away: off the 6x6 input of c5's first block, whose output is then zero).
            for block in res_layer:
                for name, parameter in block.conv2.named_parameters():
                    if 'offset' in name:
                        assert not parameter.any(), f'layer{stage + 1} conv2.{name}'

        model.train()
        # 96x96: stage c5 is 3x3, the smallest input mmcv's DCN accepts.
        data = model.data_preprocessor(
            demo_mm_inputs(batch_size=1, image_shapes=(3, 96, 96), num_items=[2],
                           with_mask=detector == 'mask'), True)
        losses = model.loss(data['inputs'], data['data_samples'])
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    for res_layer in (backbone.layer2, backbone.layer4):
        for name, parameter in res_layer[0].conv2.named_parameters():
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all() and parameter.grad.any(), name
    if detector == 'mask':
        assert 'loss_mask' in losses


def test_data_root_option_moves_every_dataset_path():
    cfg = load_config(osp.join(CONFIG_DIR, 'mask-rcnn_r50-dk-c3-c5_fpn_1x_coco.py'),
                      {'data_root': '/datasets/coco',
                       'test_dataloader.dataset.data_root': '/elsewhere/'})
    assert cfg.data_root == '/datasets/coco'
    assert cfg.train_dataloader.dataset.data_root == '/datasets/coco'
    assert cfg.val_dataloader.dataset.data_root == '/datasets/coco'
    assert cfg.val_evaluator.ann_file == '/datasets/coco/annotations/instances_val2017.json'
    assert cfg.test_evaluator.ann_file == '/datasets/coco/annotations/instances_val2017.json'
    # Paths relative to the dataset's data_root stay as they are; dotted options win.
    assert cfg.train_dataloader.dataset.ann_file == 'annotations/instances_train2017.json'
    assert cfg.test_dataloader.dataset.data_root == '/elsewhere/'


def test_metafile_and_readme_list_every_config():
    with open(osp.join(CONFIG_DIR, 'metafile.yml')) as f:
        metafile = yaml.safe_load(f)
    listed = [model['Config'] for model in metafile['Models']]
    assert sorted(listed) == sorted(f'configs/dk/{name}' for name in ALL_CONFIG_FILES)
    for model in metafile['Models']:
        assert model['Name'] == osp.splitext(osp.basename(model['Config']))[0]
        # No numbers until someone has trained the model.
        for result in model['Results']:
            assert all(value is None for value in result['Metrics'].values())
    with open(osp.join(CONFIG_DIR, 'README.md')) as f:
        readme = f.read()
    for name in ALL_CONFIG_FILES:
        assert f'[config]({name})' in readme, name
