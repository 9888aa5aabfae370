# The 5x5 depthwise conv of every CSPNeXt block in the backbone becomes local Deformable
# Kernels (5x5 kernels resampled from 6x6 scopes, offsets per location); every other conv
# that conv_cfg reaches (1x1, strided 3x3) stays a rigid nn.Conv2d.
_base_ = './rtmdet_tiny_8xb32-300e_coco.py'
model = dict(
    backbone=dict(
        conv_cfg=dict(type='DKDepthwise', scope_size=6, kernel_offset_groups=1)))
