# Faster R-CNN ResNeXt-101 32x4d FPN 1x, mmdet's config unchanged: the rigid baseline of the
# ResNeXt rows. Its ImageNet weights, 'open-mmlab://resnext101_32x4d', need no torchvision:
# mmengine maps the name to a URL with its own table (mmengine/hub/openmmlab.json, which
# $MMENGINE_HOME/open_mmlab.json may extend) and loads that URL through torch hub, from
# $TORCH_HOME/hub/checkpoints/resnext101_32x4d-a5af3160.pth once downloaded.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py'
custom_imports = dict(imports=['dk_mmdet'], allow_failed_imports=False)
