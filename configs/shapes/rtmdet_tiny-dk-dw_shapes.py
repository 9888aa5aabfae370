# The quickstart RTMDet-tiny with local Deformable Kernels (5x5 kernels resampled from 6x6
# scopes, offsets per location) in the 5x5 depthwise conv of every CSPNeXt block of the
# backbone, as in configs/dk/rtmdet_tiny-dk-dw_8xb32-300e_coco.py.
_base_ = './rtmdet_tiny_shapes.py'
model = dict(
    backbone=dict(
        conv_cfg=dict(type='DKDepthwise', scope_size=6, kernel_offset_groups=1)))
