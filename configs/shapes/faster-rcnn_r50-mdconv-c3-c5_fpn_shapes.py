# The quickstart Faster R-CNN with mmcv's modulated deformable convolution (DCNv2) in the 3x3
# conv2 of stages c3-c5, as in configs/dk/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py.
_base_ = './faster-rcnn_r50_fpn_shapes.py'
model = dict(
    backbone=dict(
        dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
