# Cascade Mask R-CNN R50-FPN 1x, mmdet's config but for how it names the ImageNet weights: the
# rigid baseline of the Cascade Mask R-CNN rows.
_base_ = 'mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['dk_mmdet'], allow_failed_imports=False)
# torchvision's ImageNet ResNet-50 named by its download URL, where mmdet's
# 'torchvision://resnet50' points too: mmengine resolves 'torchvision://' by importing
# torchvision, but loads a URL through torch hub, which reads the file from
# $TORCH_HOME/hub/checkpoints/ (downloading it there on first use). Same weights, with or
# without torchvision installed (configs/dk/README.md).
model = dict(
    backbone=dict(
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://download.pytorch.org/models/resnet50-0676ba61.pth')))
