# The 3x3 conv2 of every Bottleneck in stages c3-c5 becomes global Deformable Kernels (3x3
# kernels resampled from 4x4 scopes, offsets per image).
_base_ = './faster-rcnn_x101-32x4d_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        dcn=dict(
            type='DKGlobal', scope_size=4, kernel_offset_groups=1,
            fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
