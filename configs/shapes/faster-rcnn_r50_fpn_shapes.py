# Quickstart: Faster R-CNN R50-FPN on the synthetic "shapes" data set (tools/data/make_shapes.py),
# sized for a CPU. The rigid baseline, and the base of every config in this directory: it is
# mmdet's COCO config (configs/dk/faster-rcnn_r50_fpn_1x_coco.py) made thin, short and scratch.
_base_ = '../dk/faster-rcnn_r50_fpn_1x_coco.py'

classes = ('star', 'cross', 'arrow', 'crescent', 'ring', 'heart')  # make_shapes.CLASSES
image_size = 256  # make_shapes' default image side; images are used at their own size

# A ResNet-50 a quarter as wide (stage outputs 64..512 instead of 256..2048), FPN and heads
# thinned to match, trained from scratch: no ImageNet weights can be downloaded here, so the
# BatchNorms learn their statistics (norm_eval=False) and no stage is frozen.
model = dict(
    backbone=dict(
        base_channels=16, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        # Objects span about 12 to 150 pixels: anchors of 16..256 pixels (4x the strides)
        # instead of COCO's 32..512.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        # A fixed 2x2 sampling grid per RoI bin: mmcv's adaptive default reads up to ~40
        # points per bin for a large RoI on the stride-4 level, and its CPU backward is slow.
        bbox_roi_extractor=dict(roi_layer=dict(sampling_ratio=2), out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=len(classes))),
    # At most six objects per image: fewer sampled anchors and RoIs than COCO's 256 and 512.
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200)))

data_root = 'data/shapes/'
metainfo = dict(classes=classes)
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
# Two cores: loading a 256x256 PNG costs little next to a training step, so the main process
# loads the data itself rather than competing with worker processes for the cores.
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline))
test_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
# No evaluation during training: tools/test.py evaluates the final checkpoint, on the val split
# or (see tools/run_study.py) on test_hard.
val_dataloader = None
val_evaluator = None
val_cfg = None

# A short iteration-based schedule with warm-up and one step, evaluated once by tools/test.py.
# AdamW with gradient clipping, as for training from scratch: in a tuning run, this model with
# local DK reached a val bbox AP of 0.117 after 600 such iterations.
max_iters = 800
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.8)], gamma=0.1),
]
auto_scale_lr = dict(base_batch_size=4)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=1))
log_processor = dict(by_epoch=False, window_size=20)
# mmengine trains on the CPU when there is no GPU; gloo is its CPU process-group backend.
env_cfg = dict(dist_cfg=dict(backend='gloo'))
# A fixed seed: every run of a config gives the same model on the CPU (two unseeded runs of the
# local-DK config ended at val bbox AP 15.0 and 10.6, so compare variants by the same seed).
randomness = dict(seed=0)
