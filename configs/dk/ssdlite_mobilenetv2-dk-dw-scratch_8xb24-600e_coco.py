# The 3x3 depthwise conv of every inverted residual block of the MobileNetV2 backbone becomes
# local Deformable Kernels (3x3 kernels resampled from 4x4 scopes, offsets per location); its
# 1x1 expand and project convs and the stem stay rigid. The SSDLite neck and head keep their
# own depthwise convs rigid.
_base_ = './ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'
model = dict(
    backbone=dict(
        conv_cfg=dict(type='DKDepthwise', scope_size=4, kernel_offset_groups=1)))
