# The 5x5 depthwise conv of every CSPNeXt block in the backbone becomes local Deformable
# Kernels combined with DCN data offsets; every other conv stays rigid.
_base_ = './rtmdet_tiny_8xb32-300e_coco.py'
model = dict(
    backbone=dict(
        conv_cfg=dict(
            type='DKDCNDepthwise', scope_size=6, kernel_offset_groups=1, deform_groups=1)))
