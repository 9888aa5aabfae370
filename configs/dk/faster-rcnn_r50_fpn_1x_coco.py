# Faster R-CNN R50-FPN 1x, mmdet's config unchanged: the rigid baseline of this table.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['dk_mmdet'], allow_failed_imports=False)
