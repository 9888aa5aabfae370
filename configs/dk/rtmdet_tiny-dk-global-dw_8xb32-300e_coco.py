# The 5x5 depthwise conv of every CSPNeXt block in the backbone becomes global Deformable
# Kernels (5x5 kernels resampled from 6x6 scopes, offsets per image); every other conv stays
# rigid.
_base_ = './rtmdet_tiny_8xb32-300e_coco.py'
model = dict(
    backbone=dict(
        conv_cfg=dict(type='DKGlobalDepthwise', scope_size=6, kernel_offset_groups=1)))
