# The 3x3 conv2 of every Bottleneck in stages c3-c5 becomes mmcv's modulated deformable
# convolution (DCNv2).
_base_ = './faster-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
