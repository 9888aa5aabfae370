# Quickstart: RTMDet-tiny on the synthetic "shapes" data set (tools/data/make_shapes.py), sized
# for a CPU, the rigid baseline of the depthwise DK quickstart. It is mmdet's COCO config
# (configs/dk/rtmdet_tiny_8xb32-300e_coco.py) at its own width, from scratch, with the data, a
# short schedule and the single-process batch norm of the Faster R-CNN quickstart
# (faster-rcnn_r50_fpn_shapes.py).
_base_ = '../dk/rtmdet_tiny_8xb32-300e_coco.py'

classes = ('star', 'cross', 'arrow', 'crescent', 'ring', 'heart')  # make_shapes.CLASSES
image_size = 256  # make_shapes' default image side; images are used at their own size

# RTMDet-tiny as it is but for the classes, trained from scratch: no ImageNet weights can be
# downloaded here, so mmcv ConvModule's Kaiming init of each conv is its start. One process:
# plain BatchNorm for mmdet's SyncBN.
norm_cfg = dict(type='BN')
model = dict(
    backbone=dict(norm_cfg=norm_cfg, init_cfg=None),
    neck=dict(norm_cfg=norm_cfg),
    bbox_head=dict(norm_cfg=norm_cfg, num_classes=len(classes)))

data_root = 'data/shapes/'
metainfo = dict(classes=classes)
# The Faster R-CNN quickstart's pipelines, in place of RTMDet's mosaic and mix-up at 640x640.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# Two cores: the main process loads the data itself (see faster-rcnn_r50_fpn_shapes.py).
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    pin_memory=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline))
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
# No evaluation during training: tools/test.py evaluates the final checkpoint.
val_dataloader = None
val_evaluator = None
val_cfg = None

# The Faster R-CNN quickstart's schedule: 800 iterations of 4 images, AdamW (RTMDet's, without
# weight decay on norms and biases) at lr 1e-3 with gradient clipping, a 100-iteration warm-up
# and a step at 80%. No EMA model and no pipeline switch: both are made for 300 epochs.
max_iters = 800
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters)
# Offsets learn at a tenth of the rate (mmdet's custom_keys, as its dcn_offset_lr_mult does for
# DCN). At the full rate, local DK's kernel-offset generators carried nearly all of the gradient's
# norm, and the DK quickstart trained to under half of rigid's AP (docs/shapes.md). No parameter of
# the rigid model is named so: it trains as without the rule.
optim_wrapper = dict(
    optimizer=dict(lr=1e-3),
    clip_grad=dict(max_norm=10, norm_type=2),
    paramwise_cfg=dict(custom_keys={'offset': dict(lr_mult=0.1)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.8)], gamma=0.1),
]
auto_scale_lr = dict(base_batch_size=4)
custom_hooks = []

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=1))
log_processor = dict(by_epoch=False, window_size=20)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
