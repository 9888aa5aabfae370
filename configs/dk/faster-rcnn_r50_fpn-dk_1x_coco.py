# DK through conv_cfg, the option the backbone configs do not show: every conv of the FPN (the
# 1x1 lateral convs and the 3x3 output convs) becomes local DK; the backbone stays rigid. The
# default scopes apply: 4x4 for the 3x3 convs, 3x3 for the 1x1 ones (in a 2x2 scope a 1x1
# kernel's offsets never get a gradient; see dk_ops/modules.py).
_base_ = './faster-rcnn_r50_fpn_1x_coco.py'
model = dict(neck=dict(conv_cfg=dict(type='DK')))
