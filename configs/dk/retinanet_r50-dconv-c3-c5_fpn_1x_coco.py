# The 3x3 conv2 of every Bottleneck in stages c3-c5 becomes mmcv's deformable convolution
# (DCN).
_base_ = './retinanet_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
