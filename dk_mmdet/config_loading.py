"""How the tools load a config: ``--cfg-options`` (with ``data_root``) and early checks.

- ``--cfg-options data_root=DIR``: mmdet's dataset configs compute their paths from
  ``data_root`` when the file is parsed, so overriding the top-level key afterwards changes
  nothing by itself. :func:`move_data_root` rewrites every path of the dataloaders and
  evaluators that starts with the config's ``data_root``; dotted options are merged after it
  and still win.
- mmdet's ``BasicBlock`` (ResNet-18/34) does ``assert dcn is None`` without a message, which
  mmengine re-raises as an empty ``AssertionError``; :func:`check_model_config` names the
  problem before the model is built.
"""
import os.path as osp
from typing import Any, Optional

from mmengine.config import Config

DATA_SECTIONS = ('train_dataloader', 'val_dataloader', 'test_dataloader', 'val_evaluator',
                 'test_evaluator')
# mmdet's ResNet variants whose 18- and 34-layer versions are made of BasicBlocks.
RESNET_TYPES = ('ResNet', 'ResNetV1d')
BASIC_BLOCK_DEPTHS = (18, 34)


def load_config(config_path: str, cfg_options: Optional[dict] = None) -> Config:
    """The config at ``config_path`` with ``cfg_options`` applied, ``data_root`` first."""
    cfg = Config.fromfile(config_path)
    if cfg_options:
        if 'data_root' in cfg_options:
            move_data_root(cfg, cfg_options['data_root'])
        cfg.merge_from_dict(cfg_options)
    check_model_config(cfg.get('model'))
    return cfg


def move_data_root(cfg: Config, new_root: str) -> None:
    """Point the dataloaders and evaluators of ``cfg`` at ``new_root``; sets ``cfg.data_root``."""
    old_root = cfg.get('data_root')
    if not old_root:
        raise KeyError('data_root was given in --cfg-options, but the config has no top-level '
                       'data_root to replace; set the dataset paths with dotted options instead '
                       '(e.g. train_dataloader.dataset.data_root=...)')
    for section in DATA_SECTIONS:
        if section in cfg:
            cfg[section] = _replace_root(cfg[section], old_root.rstrip('/'), new_root)
    cfg.data_root = new_root


def _replace_root(value, old_root: str, new_root: str):
    if isinstance(value, dict):
        return type(value)({key: _replace_root(item, old_root, new_root)
                            for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_root(item, old_root, new_root) for item in value)
    if isinstance(value, str):
        if value.rstrip('/') == old_root:
            return new_root
        if value.startswith(old_root + '/'):
            return osp.join(new_root, value[len(old_root) + 1:])
    return value


def check_model_config(model_cfg: Any, path: str = 'model') -> None:
    """Raise ``ValueError`` for a ``dcn`` on a BasicBlock ResNet anywhere in ``model_cfg``."""
    if isinstance(model_cfg, dict):
        _check_resnet_dcn(model_cfg, path)
        for key, value in model_cfg.items():
            check_model_config(value, f'{path}.{key}')
    elif isinstance(model_cfg, (list, tuple)):
        for index, value in enumerate(model_cfg):
            check_model_config(value, f'{path}[{index}]')


def _check_resnet_dcn(cfg: dict, path: str) -> None:
    layer_type = cfg.get('type')
    if not isinstance(layer_type, str) or layer_type.split('.')[-1] not in RESNET_TYPES:
        return
    dcn = cfg.get('dcn')
    stage_with_dcn = tuple(cfg.get('stage_with_dcn', (False, ) * 4))
    if dcn is None or cfg.get('depth') not in BASIC_BLOCK_DEPTHS or not any(stage_with_dcn):
        return
    raise ValueError(
        f'{path}: dcn={dict(dcn)} with stage_with_dcn={stage_with_dcn} replaces the 3x3 conv2 '
        f'of Bottleneck blocks, but {layer_type} depth={cfg["depth"]} is built from BasicBlocks, '
        f'which take no dcn. Use depth 50, 101 or 152, or conv_cfg=dict(type='
        f'{dcn.get("type")!r}) to make every conv of the backbone that layer.')
