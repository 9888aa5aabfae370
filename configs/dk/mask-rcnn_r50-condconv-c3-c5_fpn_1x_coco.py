# The 3x3 conv2 of every Bottleneck in stages c3-c5 becomes CondConv (Yang et al., NeurIPS
# 2019): a per-image mixture of 8 expert kernels, the rival dynamic operator of the Deformable
# Kernels paper's analysis. ImageNet weights load into every expert (dk_mmdet/cond_conv.py).
_base_ = './mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        dcn=dict(type='CondConv', num_experts=8, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
