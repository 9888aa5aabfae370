"""What mmengine's initialisers see of a layer that replaces a rigid conv: the rigid kernel.

mmengine applies an ``init_cfg`` such as mmdet ResNet's ``dict(type='Kaiming', layer='Conv2d')``
to the modules whose class, or one of whose direct bases, is named ``Conv2d``, and draws their
``weight`` with a ``torch.nn.init`` function. A DK layer is not named Conv2d and its weight is
the larger scope, so it would keep its construction-time init, and every layer drawn after it
would get other random numbers than in the rigid network it is compared with.

So every DK (and CondConv) layer carries a parameter-free child, :class:`RigidKernelInit`,
that those initialisers match exactly where they match the rigid conv. Its ``weight`` is a
view of the layer's zero-offset kernel, (C_out, C_in/groups, K_h, K_w): an init function
applied to it draws what it would draw for the rigid conv (same shape and fan, same random
numbers), and the layer then takes the drawn kernel in (a DK layer as the minimum-norm scope
that reproduces it). A DK network built and initialised with the seed of its rigid twin
therefore computes the same function at step 0, up to float rounding.

Not covered: mmcv's ``ConvModule`` re-initialises its conv with ``kaiming_init`` only when the
conv has no ``init_weights`` of its own, which these layers have (to re-zero their offset
generators), so a DK layer inside a ConvModule keeps the init of the enclosing module's
``init_cfg`` (e.g. the FPN's Xavier), where the rigid conv gets ConvModule's Kaiming. The
depthwise ``conv_cfg`` types of :mod:`dk_mmdet.depthwise` draw ConvModule's Kaiming themselves.
"""
import torch
from torch import Tensor, nn


class Conv2d(nn.Module):
    """Carries the class name that ``layer='Conv2d'`` matches; not a convolution."""


class RigidKernelInit(Conv2d):
    """The rigid-kernel face of ``layer`` for mmengine's initialisers (see the module docstring).

    ``layer`` provides ``rigid_kernel()`` (its current zero-offset kernel), ``set_rigid_kernel``
    and ``bias``. The reference to it is kept outside the module tree, so the layer is not its
    own descendant.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__['_layer'] = layer

    @property
    def weight(self) -> Tensor:
        return _RigidKernelView.of(self._layer)

    @property
    def bias(self):
        # A rigid conv's bias is the layer's bias: constant_init of it lands in the same place.
        return self._layer.bias


class _RigidKernelView(Tensor):
    """A tensor holding a copy of the layer's zero-offset kernel that writes itself back.

    Every torch function applied to it runs on the plain tensor. Only one that wrote into it
    (``nn.init.kaiming_normal_``, ``tensor.uniform_``, ``copy_``, ...) hands the kernel to the
    layer's ``set_rigid_kernel``: a write is told by the tensor's version counter, which every
    in-place operation bumps and no read does. A name ending in ``_`` would not do: the
    property getters (``shape``, ``data``: ``__get__``) and ``__repr__`` end in one too, and
    writing an unchanged kernel back replaces the scope by the minimum-norm one.
    """

    @staticmethod
    def of(layer: nn.Module) -> '_RigidKernelView':
        # Contiguous like a conv's weight: an init fills memory in order, so the layout decides
        # which kernel entry each random number lands in.
        kernel = layer.rigid_kernel().detach().contiguous()
        view = Tensor._make_subclass(_RigidKernelView, kernel)
        view.layer = layer
        return view

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        views = [arg for arg in (*args, *kwargs.values()) if isinstance(arg, cls)]
        with torch._C.DisableTorchFunctionSubclass():
            versions = [view._version for view in views]
            result = func(*args, **kwargs)
            for view, version in zip(views, versions):
                if view._version != version:
                    view.layer.set_rigid_kernel(view.as_subclass(Tensor))
        return result
