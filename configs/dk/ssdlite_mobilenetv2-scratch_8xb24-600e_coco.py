# SSDLite MobileNetV2 from scratch, mmdet's config as it is: the rigid baseline of the
# MobileNetV2 DK row.
_base_ = 'mmdet::ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py'
custom_imports = dict(imports=['dk_mmdet'], allow_failed_imports=False)
