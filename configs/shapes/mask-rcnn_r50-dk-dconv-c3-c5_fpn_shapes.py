# The quickstart Mask R-CNN with local Deformable Kernels combined with DCN data offsets in the 3x3
# conv2 of stages c3-c5, as in configs/dk/mask-rcnn_r50-dk-dconv-c3-c5_fpn_1x_coco.py.
_base_ = './mask-rcnn_r50_fpn_shapes.py'
model = dict(
    backbone=dict(
        dcn=dict(
            type='DKDCN',
            scope_size=4,
            kernel_offset_groups=1,
            deform_groups=1,
            fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
