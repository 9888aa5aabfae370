# Quickstart: Mask R-CNN R50-FPN on "shapes", the rigid baseline of the Mask R-CNN configs here.
# The quickstart Faster R-CNN plus mmdet's mask branch (as in
# mmdet::_base_/models/mask-rcnn_r50_fpn.py), thinned like the rest of the model, and the
# instance masks loaded and scored.
_base_ = './faster-rcnn_r50_fpn_shapes.py'

model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(pad_mask=True),
    roi_head=dict(
        mask_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=2),
            out_channels=64,
            featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead',
            num_convs=4,
            in_channels=64,
            conv_out_channels=64,
            num_classes=len(_base_.classes),
            loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(rcnn=dict(assigner=dict(match_low_quality=True), mask_size=28)),
    test_cfg=dict(rcnn=dict(mask_thr_binary=0.5)))

# make_shapes writes RLE masks; LoadAnnotations decodes them with its default poly2mask=True.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(_base_.image_size, _base_.image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(_base_.image_size, _base_.image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_evaluator = dict(metric=['bbox', 'segm'])
