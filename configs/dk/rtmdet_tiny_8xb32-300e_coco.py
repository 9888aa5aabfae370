# RTMDet-tiny, mmdet's config as it is: the rigid baseline of the depthwise DK rows. The
# CSPNeXt ImageNet weights are named by their download URL in mmdet's config already.
_base_ = 'mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py'
custom_imports = dict(imports=['dk_mmdet'], allow_failed_imports=False)
