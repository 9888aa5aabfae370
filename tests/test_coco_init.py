"""Every ResNet config of configs/dk initialises from its ImageNet checkpoint, offline, as a user's
run does.

The configs name their ImageNet checkpoints by download URL (torchvision's ResNets) or by an
``open-mmlab://`` name that mmengine maps to a URL; either way mmengine loads the URL through
torch hub, from ``$TORCH_HOME/hub/checkpoints/<file name>`` when that file exists. The tests
write random torchvision-layout state dicts under those file names in a temporary
``TORCH_HOME`` and refuse any download, so ``init_weights()`` runs exactly the user's loading
path and provably reads these files.

What the checkpoint promises each conv2 that ``dcn`` replaces, on a 96x96 input in eval mode
(the rigid backbone is the same backbone without ``dcn``, loaded from the same file):

- mmcv's DCN, local DK, global DK, DK + DCN: the offsets start at zero, so the backbone
  computes the rigid backbone's features (the DK layers map the 3x3 kernel into their scope);
- CondConv: its experts are the checkpoint's kernel plus noise of zero mean, spread per filter
  by ``expert_spread`` times the kernel's RMS, and the routing starts constant, so it also
  computes the rigid features;
- mmcv's DCNv2: the mask starts at sigmoid(0) = 0.5, so every conv2 computes half of the rigid
  conv2 on the same input (the batch norm after it does not undo that, so the features
  differ); and DKDCNv2, which starts like it, computes the same features as a DCNv2 backbone.

"The same features" allows float rounding only: 1e-4 of the largest feature.
"""
import glob
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner.checkpoint import get_external_models

from dk_mmdet import DKDCNv2Conv2d
from mmdet_fixtures import CONFIG_DIR, torchvision_resnet_state_dict, write_hub_checkpoint

# The ResNet and ResNeXt configs; the depthwise detectors' CSPNeXt checkpoint is tested in
# test_depthwise_detectors.py (SSDLite starts from scratch).
CONFIG_FILES = sorted(osp.basename(path) for path in glob.glob(osp.join(CONFIG_DIR, '*.py'))
                      if not osp.basename(path).startswith(('rtmdet', 'ssdlite')))
# dcn types whose conv2 weight is not the rigid (out, in/groups, 3, 3) kernel
RESHAPED_CONV2 = ('DK', 'DKGlobal', 'DKDCN', 'DKDCNv2', 'CondConv')
OPEN_MMLAB_PREFIX = 'open-mmlab://'


def checkpoint_url(checkpoint: str) -> str:
    """The URL mmengine loads for an ``init_cfg`` checkpoint name."""
    assert not checkpoint.startswith('torchvision://'), (
        f'{checkpoint}: mmengine imports torchvision to resolve it; name the URL instead')
    if checkpoint.startswith(OPEN_MMLAB_PREFIX):
        return get_external_models()[checkpoint[len(OPEN_MMLAB_PREFIX):]]
    assert checkpoint.startswith('https://'), f'{checkpoint} is not an ImageNet download'
    return checkpoint


class FakeHub:
    """A temporary torch hub cache that gets a random state dict for each ImageNet checkpoint
    a backbone config names, when a test first asks for it."""

    def __init__(self, torch_home: str):
        self.torch_home = torch_home
        self.state_dicts = {}

    def state_dict_for(self, backbone_cfg) -> dict:
        checkpoint = backbone_cfg.init_cfg.checkpoint
        if checkpoint not in self.state_dicts:
            state_dict = torchvision_resnet_state_dict(
                backbone_cfg.depth, groups=backbone_cfg.get('groups', 1),
                width_per_group=backbone_cfg.get('base_width', 64), seed=len(self.state_dicts))
            write_hub_checkpoint(self.torch_home, checkpoint_url(checkpoint), state_dict)
            self.state_dicts[checkpoint] = state_dict
        return self.state_dicts[checkpoint]


@pytest.fixture(scope='module')
def fake_hub(tmp_path_factory):
    """A FakeHub, which TORCH_HOME names while this module's tests run; a download raises.
    MMENGINE_HOME, where a user's open_mmlab.json could rename checkpoints, is empty."""
    torch_home = str(tmp_path_factory.mktemp('torch_home'))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f'tried to download {url}')

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('TORCH_HOME', torch_home)
        patch.setenv('MMENGINE_HOME', str(tmp_path_factory.mktemp('mmengine_home')))
        assert torch.hub.get_dir() == osp.join(torch_home, 'hub')
        patch.setattr(torch.hub, 'download_url_to_file', no_download)
        yield FakeHub(torch_home)


def build_backbone(backbone_cfg):
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MODELS.build(backbone_cfg)
    backbone.init_weights()
    backbone.eval()  # mmdet's ResNet.train returns None
    return backbone


@pytest.fixture(scope='module')
def sample():
    return torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def rigid_reference(fake_hub, sample):
    """backbone config -> (the same backbone without dcn, its features on the sample), each
    built once and initialised from the same checkpoint file."""
    built = {}

    def reference(backbone_cfg):
        rigid_cfg = backbone_cfg.copy()
        rigid_cfg.update(dcn=None, stage_with_dcn=(False, ) * 4)
        key = repr(rigid_cfg)
        if key not in built:
            fake_hub.state_dict_for(rigid_cfg)
            backbone = build_backbone(rigid_cfg)
            with torch.no_grad():
                built[key] = backbone, backbone(sample)
        return built[key]

    return reference


def assert_same_features(features, reference):
    for level, (ours, theirs) in enumerate(zip(features, reference, strict=True)):
        tolerance = 1e-4 * float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance,
                                   msg=lambda message: f'level {level}: {message}')


@pytest.mark.parametrize('config_file', CONFIG_FILES)
def test_config_initialises_from_the_imagenet_checkpoint(config_file, fake_hub,
                                                         rigid_reference, sample):
    cfg = Config.fromfile(osp.join(CONFIG_DIR, config_file))
    backbone_cfg = cfg.model.backbone
    assert backbone_cfg.init_cfg.type == 'Pretrained'
    checkpoint = fake_hub.state_dict_for(backbone_cfg)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    backbone = model.backbone
    backbone.eval()

    dcn_type = (backbone_cfg.get('dcn') or {}).get('type')
    dcn_stages = [f'layer{index + 1}'
                  for index, with_dcn in enumerate(backbone_cfg.get('stage_with_dcn', ()))
                  if dcn_type and with_dcn]
    # Every ImageNet tensor but the classifier's is in place; only a reshaped conv2 differs.
    loaded = backbone.state_dict()
    for key, value in checkpoint.items():
        if key.startswith('fc.'):
            continue
        if loaded[key].shape == value.shape:
            assert torch.equal(loaded[key], value), key
        else:
            assert dcn_type in RESHAPED_CONV2 and key.endswith('.conv2.weight'), key
            assert key.split('.')[0] in dcn_stages, key

    rigid_backbone, rigid_features = rigid_reference(backbone_cfg)
    if dcn_type == 'DCNv2':
        generator = torch.Generator().manual_seed(1)
        for stage in dcn_stages:
            for block, rigid_block in zip(getattr(backbone, stage),
                                          getattr(rigid_backbone, stage), strict=True):
                x = torch.randn(1, block.conv2.in_channels, 12, 12, generator=generator)
                with torch.no_grad():
                    torch.testing.assert_close(block.conv2(x), 0.5 * rigid_block.conv2(x),
                                               rtol=1e-4, atol=1e-5)
    else:
        with torch.no_grad():
            assert_same_features(backbone(sample), rigid_features)
    if dcn_type == 'CondConv':
        for stage in dcn_stages:
            for index, block in enumerate(getattr(backbone, stage)):
                experts = block.conv2.weight.detach()
                kernel = checkpoint[f'{stage}.{index}.conv2.weight']
                torch.testing.assert_close(experts.mean(0), kernel)
                spread = (experts - kernel).pow(2).mean((0, 2, 3, 4)).sqrt()
                torch.testing.assert_close(
                    spread, block.conv2.expert_spread * kernel.pow(2).mean((1, 2, 3)).sqrt(),
                    rtol=1e-3, atol=0)


def test_dk_dcnv2_computes_what_mmcv_dcnv2_computes(fake_hub, sample):
    # No config uses DKDCNv2; in place of mmcv's DCNv2 in the R-50 config, both start at half
    # the rigid conv2 and must compute the same features.
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py'))
    fake_hub.state_dict_for(cfg.model.backbone)
    mmcv_dcnv2 = build_backbone(cfg.model.backbone)
    cfg.model.backbone.dcn = dict(type='DKDCNv2', scope_size=4, kernel_offset_groups=1,
                                  deform_groups=1, fallback_on_stride=False)
    dk_dcnv2 = build_backbone(cfg.model.backbone)
    assert type(dk_dcnv2.layer3[0].conv2) is DKDCNv2Conv2d
    with torch.no_grad():
        assert_same_features(dk_dcnv2(sample), mmcv_dcnv2(sample))
