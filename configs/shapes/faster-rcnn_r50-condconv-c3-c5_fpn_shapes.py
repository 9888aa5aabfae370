# The quickstart Faster R-CNN with CondConv (8 experts) in stages c3-c5, as in
# configs/dk/faster-rcnn_r50-condconv-c3-c5_fpn_1x_coco.py: the rival dynamic operator of the
# Deformable Kernels paper's analysis, which mixes whole kernels per image instead of
# resampling them per location.
_base_ = './faster-rcnn_r50_fpn_shapes.py'
model = dict(
    backbone=dict(
        dcn=dict(type='CondConv', num_experts=8, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
