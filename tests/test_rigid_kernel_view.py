"""A layer's rigid-kernel face (``layer.rigid_kernel_init.weight``): reads leave the layer as it
was, in-place initialisers write the kernel they drew into it."""
import pytest
import torch
from torch import nn

from dk_mmdet import CondConv2d, DKConv2d, DKDCNConv2d, DKDCNv2Conv2d, DKGlobalConv2d

LAYER_CLASSES = [DKConv2d, DKGlobalConv2d, DKDCNConv2d, DKDCNv2Conv2d, CondConv2d]

READS = {
    'shape': lambda w: w.shape,
    'size': lambda w: w.size(),
    'dtype': lambda w: w.dtype,
    'device': lambda w: w.device,
    'repr': repr,
    'str': str,
    'indexing': lambda w: w[0, :1],
    'sum': lambda w: w.sum(),
    'clone': lambda w: w.clone(),
    'data': lambda w: w.data,
    'detach': lambda w: w.detach(),
    'fan': lambda w: nn.init._calculate_fan_in_and_fan_out(w),
    'numel': lambda w: w.numel(),
}

# Initialiser applied to the view -> the same initialiser on a plain tensor, for the truth.
INITIALISERS = {
    'kaiming_normal_': lambda w: nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu'),
    'kaiming_uniform_': lambda w: nn.init.kaiming_uniform_(w, a=1),
    'xavier_uniform_': nn.init.xavier_uniform_,
    'normal_': lambda w: nn.init.normal_(w, 0, 0.01),
    'trunc_normal_': lambda w: nn.init.trunc_normal_(w, std=0.02),
    'constant_': lambda w: nn.init.constant_(w, 0.25),
    'Tensor.uniform_': lambda w: w.uniform_(-0.5, 0.5),
    'Tensor.normal_': lambda w: w.normal_(),
    'Tensor.fill_': lambda w: w.fill_(0.75),
    'Tensor.zero_': lambda w: w.zero_(),
    'Tensor.copy_': lambda w: w.copy_(torch.arange(w.numel(), dtype=w.dtype).view(w.shape)),
    'setitem': lambda w: w.__setitem__(0, 3.0),
}


def build(layer_class):
    torch.manual_seed(0)
    options = dict(num_experts=3) if layer_class is CondConv2d else {}
    layer = layer_class(4, 6, 3, padding=1, **options).double()
    # A scope that is not the minimum-norm one for its kernel, as after training: writing the
    # unchanged kernel back would replace it.
    with torch.no_grad():
        layer.weight.normal_()
    return layer


@pytest.mark.parametrize('read', READS)
@pytest.mark.parametrize('layer_class', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_reading_the_rigid_kernel_changes_nothing(layer_class, read):
    layer = build(layer_class)
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    READS[read](layer.rigid_kernel_init.weight)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), f'{read} of the rigid kernel changed {name}'


@pytest.mark.parametrize('initialiser', INITIALISERS)
@pytest.mark.parametrize('layer_class', LAYER_CLASSES, ids=lambda c: c.__name__)
def test_in_place_initialisers_write_the_kernel_they_drew(layer_class, initialiser):
    layer = build(layer_class)
    truth = layer.rigid_kernel().clone()
    torch.manual_seed(1)
    with torch.no_grad():
        INITIALISERS[initialiser](truth)
    torch.manual_seed(1)
    with torch.no_grad():
        INITIALISERS[initialiser](layer.rigid_kernel_init.weight)
    assert not torch.equal(truth, build(layer_class).rigid_kernel())  # the init changed something
    torch.testing.assert_close(layer.rigid_kernel(), truth, rtol=1e-12, atol=1e-12)
