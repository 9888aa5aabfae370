"""CondConv (Yang et al., NeurIPS 2019, "CondConv: Conditionally Parameterized Convolutions")
as an mmcv conv layer, registered in mmengine's root ``MODELS`` as ``CondConv``.

Every example b gets its own kernel, a mix of E expert kernels::

    r_b = sigmoid(Linear(mean_{h,w} x_b))          routing weights, (E,)
    W_b = sum_e r_{b,e} W_e,   bias_b = sum_e r_{b,e} bias_e
    out_b = conv2d(x_b, W_b, bias_b)

computed as one grouped convolution over the batch (input viewed as (1, N*C_in, H, W),
N*groups groups). The routing is the submodule ``routing``: ``layer.routing(x)`` or a forward
hook on it gives the routing weights of an input (the t-SNE tool reads them that way).

Start, and rigid weights. The routing starts with zero weights and bias logit(1/E), so every
routing weight is 1/E for every input and the layer computes the convolution with the mean of
its experts. The experts start as W + d_e with sum_e d_e = 0, so that mean is exactly W. The
spread d must not be zero: with identical experts and a routing that does not depend on the
input, every expert and every routing row gets the same gradient, and the experts would never
become different. d_e is zero-mean noise scaled per filter to ``expert_spread`` times the RMS
of W's filter, drawn from a generator seeded from torch's seed (``torch.initial_seed()``), so
that the layer draws from torch's global generator only what the rigid conv draws. From scratch,
W is drawn as nn.Conv2d draws its weight, and an init_cfg that would initialise the rigid conv
initialises W (:mod:`dk_mmdet.rigid_init`); a rigid (out, in/groups, K, K) ``weight`` (and
(out,) ``bias``) met while loading a state dict, e.g. ImageNet weights through
``init_cfg=dict(type='Pretrained', ...)``, becomes W. Either way the layer starts as the rigid
conv it replaces, up to float rounding.
"""
import math

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from dk_mmdet.rigid_init import RigidKernelInit


class _RoutingStartLinear(nn.Linear):
    """nn.Linear starting at zero weights and bias logit(1/E), drawing no random numbers."""

    def reset_parameters(self) -> None:
        # sigmoid(-log(E - 1)) = 1/E: the routing weights start constant and sum to one.
        nn.init.zeros_(self.weight)
        nn.init.constant_(self.bias, -math.log(self.out_features - 1))


class RoutingLinear(_RoutingStartLinear):
    """The routing's linear layer; two levels below nn.Linear so that mmengine's initialisers,
    which match ``layer='Linear'`` by class name and direct bases, leave it alone."""


class CondConvRouting(nn.Module):
    """Routing weights sigmoid(Linear(global average pool of x)): (N, C, H, W) -> (N, E)."""

    def __init__(self, in_channels: int, num_experts: int):
        super().__init__()
        self.fc = RoutingLinear(in_channels, num_experts)

    def reset_parameters(self) -> None:
        self.fc.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(x.mean((2, 3))))


@MODELS.register_module(name='CondConv')
class CondConv2d(nn.Module):
    """Conditionally parameterized convolution with mmcv's conv signature.

    ``weight`` holds the experts, (num_experts, out_channels, in_channels/groups, K_h, K_w);
    ``bias`` (num_experts, out_channels) or None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, num_experts: int = 8,
                 expert_spread: float = 0.1):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f'num_experts={num_experts} must be at least 2 (one expert is a '
                             'plain convolution)')
        if not expert_spread > 0:
            raise ValueError(f'expert_spread={expert_spread} must be positive: identical '
                             'experts never become different')
        for name, channels in (('in_channels', in_channels), ('out_channels', out_channels)):
            if channels % groups:
                raise ValueError(f'{name}={channels} must be divisible by groups={groups}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.num_experts = num_experts
        self.expert_spread = expert_spread
        # nn.Conv2d attributes that mmcv's ConvModule reads.
        self.transposed = False
        self.output_padding = (0, 0)
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.routing = CondConvRouting(in_channels, num_experts)
        self.reset_parameters()
        # Where an init_cfg would initialise the rigid conv, it initialises W the same way
        # (dk_mmdet/rigid_init.py).
        self.rigid_kernel_init = RigidKernelInit(self)

    def reset_parameters(self) -> None:
        # The rigid conv's init: W drawn exactly as nn.Conv2d draws its weight and bias (same
        # random numbers), so with the seed of a rigid network the layer is the same function.
        rigid = torch.empty(self.weight.shape[1:], dtype=self.weight.dtype,
                            device=self.weight.device)
        nn.init.kaiming_uniform_(rigid, a=math.sqrt(5))
        self.set_rigid_kernel(rigid)
        if self.bias is not None:
            bound = 1 / math.sqrt(rigid[0].numel())
            with torch.no_grad():
                self.bias.copy_(torch.empty(self.out_channels).uniform_(-bound, bound))
        self.routing.reset_parameters()

    def init_weights(self) -> None:
        # Called by mmengine's BaseModule.init_weights after the parent's init_cfg (which set
        # W through rigid_kernel_init); the routing restarts constant.
        self.routing.reset_parameters()

    def rigid_kernel(self) -> Tensor:
        """W, the mean of the experts: the kernel the layer convolves with while routing is 1/E."""
        return self.weight.detach().mean(0)

    def set_rigid_kernel(self, rigid: Tensor) -> None:
        """Set the experts to ``rigid`` plus a fresh zero-sum spread."""
        with torch.no_grad():
            self.weight.copy_(self.experts_around(rigid.to(self.weight.dtype)))

    def experts_around(self, rigid: Tensor) -> Tensor:
        """Experts W + d_e (E, *rigid.shape) whose mean is ``rigid``; see the module docstring."""
        # The spread comes from a generator of its own, seeded from torch's seed, so the layer
        # draws from the global generator exactly what the rigid conv draws.
        spread_generator = torch.Generator(rigid.device).manual_seed(torch.initial_seed())
        noise = torch.randn(self.num_experts, *rigid.shape, dtype=rigid.dtype,
                            device=rigid.device, generator=spread_generator)
        noise -= noise.mean(0)
        filter_dims = (2, 3, 4)
        noise_rms = noise.pow(2).mean((0, *filter_dims), keepdim=True).sqrt()
        rigid_rms = rigid.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
        return rigid + noise * (self.expert_spread * rigid_rms / noise_rms)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        weight_key, bias_key = prefix + 'weight', prefix + 'bias'
        weight = state_dict.get(weight_key)
        if weight is not None and tuple(weight.shape) == tuple(self.weight.shape[1:]):
            # The state dict handed to a module is the loader's copy: this stays local.
            state_dict[weight_key] = self.experts_around(weight.to(self.weight.dtype))
        bias = state_dict.get(bias_key)
        if (bias is not None and self.bias is not None
                and tuple(bias.shape) == (self.out_channels, )):
            state_dict[bias_key] = bias.expand(self.num_experts, -1).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'CondConv expects input (N, {self.in_channels}, H, W), got '
                             f'{tuple(x.shape)}')
        batch = x.shape[0]
        if batch == 0:
            # The grouped form below needs at least one group; any kernel gives the shape.
            return F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation,
                            self.groups)
        routing = self.routing(x)
        kernels = (routing @ self.weight.flatten(1)).view(
            batch * self.out_channels, *self.weight.shape[2:])
        bias = None if self.bias is None else (routing @ self.bias).flatten()
        out = F.conv2d(x.reshape(1, batch * self.in_channels, *x.shape[2:]), kernels, bias,
                       self.stride, self.padding, self.dilation, batch * self.groups)
        return out.view(batch, self.out_channels, *out.shape[2:])

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, '
                f'groups={self.groups}, bias={self.bias is not None}, '
                f'num_experts={self.num_experts}, expert_spread={self.expert_spread}')
