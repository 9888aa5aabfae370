"""The quickstart configs (configs/shapes): what they change from the COCO configs, the layers
they build, their data, and one tiny real train + test + results-table run.
"""
import glob
import os.path as osp
import subprocess
import sys

import pytest
from mmcv.ops import ModulatedDeformConv2dPack
from mmengine.config import Config
from mmengine.registry import init_default_scope
from torch import nn

import dk_mmdet
from mmdet_fixtures import REPO_ROOT, differing_keys, load_make_shapes, tool_environment
from tool_modules import TOOLS_DIR

SHAPES_DIR = osp.join(REPO_ROOT, 'configs', 'shapes')
COCO_DIR = osp.join(REPO_ROOT, 'configs', 'dk')
DETECTORS = ('faster-rcnn', 'mask-rcnn')
# variant -> the conv2 class of the Bottlenecks in stages c3-c5
VARIANTS = {
    'r50_fpn': nn.Conv2d,
    'r50-dconv-c3-c5_fpn': dk_mmdet.ZeroOffsetDeformConv2dPack,
    'r50-mdconv-c3-c5_fpn': ModulatedDeformConv2dPack,
    'r50-dk-c3-c5_fpn': dk_mmdet.DKConv2d,
    'r50-dk-global-c3-c5_fpn': dk_mmdet.DKGlobalConv2d,
    'r50-dk-dconv-c3-c5_fpn': dk_mmdet.DKDCNConv2d,
}
CONFIG_NAMES = [f'{detector}_{variant}' for detector in DETECTORS for variant in VARIANTS]

# Every key of the model config that the quickstart changes from mmdet's COCO model: widths,
# scratch training, anchor sizes, RoIAlign sampling, sample and proposal counts, classes.
THINNED_MODEL_KEYS = {
    'backbone.base_channels', 'backbone.frozen_stages', 'backbone.norm_eval',
    'backbone.init_cfg', 'neck.in_channels', 'neck.out_channels', 'rpn_head.in_channels',
    'rpn_head.feat_channels', 'rpn_head.anchor_generator.scales',
    'roi_head.bbox_roi_extractor.roi_layer.sampling_ratio',
    'roi_head.bbox_roi_extractor.out_channels', 'roi_head.bbox_head.in_channels',
    'roi_head.bbox_head.fc_out_channels', 'roi_head.bbox_head.num_classes',
    'train_cfg.rpn.sampler.num', 'train_cfg.rpn_proposal.nms_pre',
    'train_cfg.rpn_proposal.max_per_img', 'train_cfg.rcnn.sampler.num', 'test_cfg.rpn.nms_pre',
    'test_cfg.rpn.max_per_img',
}
THINNED_MASK_KEYS = {
    'roi_head.mask_roi_extractor.roi_layer.sampling_ratio',
    'roi_head.mask_roi_extractor.out_channels', 'roi_head.mask_head.in_channels',
    'roi_head.mask_head.conv_out_channels', 'roi_head.mask_head.num_classes',
}


def shapes_config(name):
    return Config.fromfile(osp.join(SHAPES_DIR, f'{name}_shapes.py'))


def coco_config(name):
    return Config.fromfile(osp.join(COCO_DIR, f'{name}_1x_coco.py'))


def _covering_key(key, keys):
    return next((known for known in keys if key == known or key.startswith(known + '.')), key)


def test_every_variant_has_a_config_for_both_detectors():
    names = {osp.basename(path)[:-len('_shapes.py')]
             for path in glob.glob(osp.join(SHAPES_DIR, '*_shapes.py'))}
    assert set(CONFIG_NAMES) <= names


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_the_model_is_the_coco_model_thinned(name):
    """Only the listed keys differ from configs/dk: same detector, same deformable layers."""
    shapes, coco = shapes_config(name).model, coco_config(name).model
    expected = THINNED_MODEL_KEYS | (THINNED_MASK_KEYS if name.startswith('mask') else set())
    # A dict replaced by None (init_cfg) differs in each of its own keys.
    assert {_covering_key(key, expected) for key in differing_keys(shapes, coco)} == expected
    assert shapes.backbone.base_channels * 4 * 8 == shapes.neck.in_channels[-1]


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_built_model_has_the_variant_conv_in_c3_to_c5(name):
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    model = MODELS.build(shapes_config(name).model)
    expected = VARIANTS[name.split('_', 1)[1]]
    for stage, layer in enumerate((model.backbone.layer1, model.backbone.layer2,
                                   model.backbone.layer3, model.backbone.layer4)):
        for block in layer:
            assert type(block.conv2) is (nn.Conv2d if stage == 0 else expected)
    assert model.roi_head.bbox_head.num_classes == 6
    assert hasattr(model.roi_head, 'mask_head') == name.startswith('mask')


def test_classes_are_the_generators():
    make_shapes = load_make_shapes()
    for name in ('faster-rcnn_r50_fpn', 'mask-rcnn_r50_fpn'):
        cfg = shapes_config(name)
        assert tuple(cfg.train_dataloader.dataset.metainfo['classes']) == make_shapes.CLASSES
        assert tuple(cfg.test_dataloader.dataset.metainfo['classes']) == make_shapes.CLASSES


def test_mask_rcnn_loads_and_scores_masks():
    cfg = shapes_config('mask-rcnn_r50_fpn')
    for pipeline in (cfg.train_dataloader.dataset.pipeline, cfg.test_dataloader.dataset.pipeline):
        (load, ) = [step for step in pipeline if step['type'] == 'LoadAnnotations']
        assert load['with_mask'] and load.get('poly2mask', True)
    assert cfg.test_evaluator.metric == ['bbox', 'segm']
    assert shapes_config('faster-rcnn_r50_fpn').test_evaluator.metric == 'bbox'


def test_datasets_load_the_generated_annotations(tmp_path):
    from mmdet.registry import DATASETS
    make_shapes = load_make_shapes()
    root = str(tmp_path)
    make_shapes.generate(root, num_train=3, num_val=2, num_hard=2, img_size=64, seed=0)
    init_default_scope('mmdet')
    cfg = shapes_config('mask-rcnn_r50_fpn')
    # Training resizes the masks with the image; testing keeps them at the original size, where
    # the evaluation compares them.
    for section, count, mask_shape in (('train_dataloader', 3, 'img_shape'),
                                       ('test_dataloader', 2, 'ori_shape')):
        dataset_cfg = cfg[section].dataset
        dataset_cfg.data_root = root
        dataset = DATASETS.build(dataset_cfg)
        assert len(dataset) == count
        sample = dataset[0]['data_samples']
        assert sample.img_shape == (256, 256) and sample.ori_shape == (64, 64)
        assert len(sample.gt_instances) > 0
        assert sample.gt_instances.masks.masks.shape[-2:] == sample.metainfo[mask_shape]


def test_tiny_train_test_and_results_table(tmp_path):
    """tools/train.py, tools/test.py and collect_results.py on a 2-iteration quickstart run."""
    make_shapes = load_make_shapes()
    data_root = str(tmp_path / 'shapes') + '/'
    make_shapes.generate(data_root, num_train=4, num_val=2, num_hard=0, img_size=64, seed=0,
                         max_objects=3)
    config = osp.join(SHAPES_DIR, 'faster-rcnn_r50-dk-c3-c5_fpn_shapes.py')
    work_dir = str(tmp_path / 'faster-rcnn_r50-dk-c3-c5_fpn_shapes')
    tiny = ['train_cfg.max_iters=2', 'train_dataloader.batch_size=2',
            'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=2']

    def run(*command):
        result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT,
                                env=tool_environment(), capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-6000:]
        return result

    run(osp.join(TOOLS_DIR, 'train.py'), config, '--work-dir', work_dir, '--cfg-options',
        f'data_root={data_root}', *tiny)
    run(osp.join(TOOLS_DIR, 'test.py'), config, osp.join(work_dir, 'iter_2.pth'), '--work-dir',
        work_dir, '--cfg-options', f'data_root={data_root}')
    out = str(tmp_path / 'results.md')
    run(osp.join(TOOLS_DIR, 'analysis_tools', 'collect_results.py'), work_dir, '--out', out,
        '--csv', str(tmp_path / 'results.csv'))

    # The AP in the table is the one the test run printed in its log (copypaste line).
    (log, ) = [path for path in glob.glob(osp.join(work_dir, '*', '*.log'))
               if 'bbox_mAP_copypaste' in open(path).read()]
    copypaste = open(log).read().split('bbox_mAP_copypaste: ')[1].split()[:6]
    table = open(out).read()
    (row, ) = [line for line in table.splitlines()
               if line.startswith('| faster-rcnn_r50-dk-c3-c5_fpn_shapes |')]
    cells = [cell.strip() for cell in row.strip('|').split('|')]
    assert [float(cell) for cell in cells[1:7]] == pytest.approx(
        [100 * float(value) for value in copypaste], abs=0.051)
    assert cells[9] == '256x256'  # the config's test Resize scale
    assert float(cells[7]) > 0 and float(cells[8]) > 0 and float(cells[10]) > 0


# ------------------------------------------------------------------ the RTMDet-tiny pair
# Every key of the model config that the RTMDet quickstart changes from mmdet's COCO model:
# batch norm for SyncBN, scratch training, the classes.
RTMDET_THINNED_MODEL_KEYS = {'backbone.norm_cfg', 'backbone.init_cfg', 'neck.norm_cfg',
                             'bbox_head.norm_cfg', 'bbox_head.num_classes'}


def test_rtmdet_model_is_the_coco_model_single_process_and_scratch():
    shapes = shapes_config('rtmdet_tiny').model
    coco = Config.fromfile(osp.join(COCO_DIR, 'rtmdet_tiny_8xb32-300e_coco.py')).model
    assert {_covering_key(key, RTMDET_THINNED_MODEL_KEYS)
            for key in differing_keys(shapes, coco)} == RTMDET_THINNED_MODEL_KEYS
    assert shapes.bbox_head.num_classes == len(load_make_shapes().CLASSES)


def test_rtmdet_dk_quickstart_is_the_rigid_one_with_dk_in_the_depthwise_convs():
    from mmdet.registry import MODELS
    rigid, variant = shapes_config('rtmdet_tiny'), shapes_config('rtmdet_tiny-dk-dw')
    assert {_covering_key(key, {'model.backbone.conv_cfg'})
            for key in differing_keys(variant, rigid)} == {'model.backbone.conv_cfg'}
    coco = Config.fromfile(osp.join(COCO_DIR, 'rtmdet_tiny-dk-dw_8xb32-300e_coco.py'))
    assert variant.model.backbone.conv_cfg == coco.model.backbone.conv_cfg
    assert tuple(variant.train_dataloader.dataset.metainfo['classes']) == (
        load_make_shapes().CLASSES)
    init_default_scope('mmdet')
    model = MODELS.build(variant.model)
    dk_layers = [name for name, module in model.named_modules()
                 if isinstance(module, dk_mmdet.DepthwiseDKConv2d)]
    # The 5x5 depthwise conv of each of RTMDet-tiny's four CSPNeXt blocks.
    assert len(dk_layers) == 4
    assert all(name.endswith('.conv2.depthwise_conv.conv') for name in dk_layers)


@pytest.mark.parametrize('name', ['rtmdet_tiny', 'rtmdet_tiny-dk-dw'])
def test_rtmdet_quickstart_offsets_learn_at_a_tenth_of_the_rate(name):
    """The optimiser both RTMDet quickstarts build: DK's kernel-offset generators at a tenth of
    the base rate, every other parameter (all of the rigid model's) at the base rate."""
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper
    config = shapes_config(name)
    init_default_scope('mmdet')
    model = MODELS.build(config.model)
    optimizer = build_optim_wrapper(model, config.optim_wrapper).optimizer
    base_lr = config.optim_wrapper.optimizer.lr
    lr_of = {id(param): group['lr'] for group in optimizer.param_groups
             for param in group['params']}
    offset_names = [param_name for param_name, _ in model.named_parameters()
                    if 'kernel_offset_conv' in param_name]
    assert len(offset_names) == (8 if name.endswith('dk-dw') else 0)  # 4 layers' weight, bias
    for param_name, param in model.named_parameters():
        expected = base_lr / 10 if param_name in offset_names else base_lr
        assert lr_of[id(param)] == pytest.approx(expected), param_name
