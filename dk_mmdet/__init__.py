"""Deformable Kernels for MMDetection.

Importing the package registers the conv layers ``DK``, ``DKGlobal``, ``DKDCN`` and
``DKDCNv2`` (see :mod:`dk_mmdet.layers`), and the ``CondConv`` baseline (see
:mod:`dk_mmdet.cond_conv`), in mmengine's root ``MODELS`` registry; configs load
it with ``custom_imports = dict(imports=['dk_mmdet'], allow_failed_imports=False)``. It has no
other side effect: the tools opt in to the runtime helpers (:mod:`dk_mmdet.checkpoints`,
:mod:`dk_mmdet.distributed`, :mod:`dk_mmdet.config_loading`) explicitly.
"""
from dk_mmdet.cond_conv import CondConv2d
from dk_mmdet.layers import DKConv2d, DKDCNConv2d, DKDCNv2Conv2d, DKGlobalConv2d

__all__ = ['DKConv2d', 'DKGlobalConv2d', 'DKDCNConv2d', 'DKDCNv2Conv2d', 'CondConv2d']
