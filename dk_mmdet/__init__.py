"""Deformable Kernels for MMDetection.

Importing the package (configs do it with ``custom_imports = dict(imports=['dk_mmdet'],
allow_failed_imports=False)``) does three things:

- it registers the conv layers ``DK``, ``DKGlobal``, ``DKDCN`` and ``DKDCNv2`` (see
  :mod:`dk_mmdet.layers`), and the ``CondConv`` baseline (see :mod:`dk_mmdet.cond_conv`), in
  mmengine's root ``MODELS`` registry, and ``DKDepthwise``, ``DKGlobalDepthwise`` and
  ``DKDCNDepthwise``, which put those layers into a backbone's depthwise convs only (see
  :mod:`dk_mmdet.depthwise`);
- it registers, under mmcv's name ``DCN``, mmcv's DCN with offsets that start at zero under
  mmengine's initialisers, as mmcv's ``DCNv2`` does (see :mod:`dk_mmdet.mmcv_dcn`);
- it lets ``torch.load(weights_only=True)``, which mmengine uses, read the checkpoints that
  mmengine's Runner writes, and has them written as data only
  (:func:`dk_mmdet.checkpoints.setup_checkpoint_serialization`). So mmdet's Python API
  (``init_detector``, ``DetInferencer``) loads a trained DK model from its config and
  checkpoint alone, while pickles that would run code stay refused.

The tools opt in to the other runtime helpers (:mod:`dk_mmdet.distributed`,
:mod:`dk_mmdet.config_loading`) explicitly.
"""
from dk_mmdet.checkpoints import setup_checkpoint_serialization
from dk_mmdet.cond_conv import CondConv2d
from dk_mmdet.depthwise import DepthwiseDKConv2d, DepthwiseDKDCNConv2d, DepthwiseDKGlobalConv2d
from dk_mmdet.layers import DKConv2d, DKDCNConv2d, DKDCNv2Conv2d, DKGlobalConv2d
from dk_mmdet.mmcv_dcn import ZeroOffsetDeformConv2dPack

setup_checkpoint_serialization()

__all__ = ['DKConv2d', 'DKGlobalConv2d', 'DKDCNConv2d', 'DKDCNv2Conv2d', 'CondConv2d',
           'DepthwiseDKConv2d', 'DepthwiseDKGlobalConv2d', 'DepthwiseDKDCNConv2d',
           'ZeroOffsetDeformConv2dPack']
