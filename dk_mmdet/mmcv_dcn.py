"""mmcv's DCN with its offsets starting at zero under mmengine's initialisers, as DCNv2's do.

mmcv 2.1's ``DCN`` (``DeformConv2dPack``) zeroes its offset generator ``conv_offset`` only when
it is built. Its ``conv_offset`` is an ``nn.Conv2d``, so an initialiser that matches
``layer='Conv2d'`` draws it again: mmdet ResNet's default ``dict(type='Kaiming',
layer='Conv2d')``, which applies to every model built without pretrained backbone weights,
from scratch or before ``load_from``. The DCN layers then start with random offsets of tens
of pixels (at c5 of a small image every sample can land outside the feature map, so the layer
outputs zeros) instead of as the rigid conv. mmcv's ``DCNv2`` re-zeroes its offsets in
``init_weights``, which mmengine calls after the enclosing module's initialisers; this class
gives ``DCN`` the same, and importing :mod:`dk_mmdet` registers it under mmcv's name ``DCN``.

Like ``DCNv2``, a DCN inside an mmcv ``ConvModule`` then keeps its own init rather than
ConvModule's Kaiming (ConvModule re-initialises only convs without an ``init_weights``).
"""
from mmcv.ops import DeformConv2dPack
from mmengine.registry import MODELS


@MODELS.register_module('DCN', force=True)
class ZeroOffsetDeformConv2dPack(DeformConv2dPack):
    """mmcv's ``DeformConv2dPack`` whose ``init_weights`` sets the offsets to zero."""

    def init_weights(self) -> None:
        self.init_offset()
