_base_ = './faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        depth=101,
        # By URL rather than 'torchvision://resnet101', as in the R-50 base config.
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://download.pytorch.org/models/resnet101-63fe2227.pth')))
