"""dk_mmdet's conv layers: registry, mmcv signature, option errors, rigid-weight loading."""
import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_conv_layer
from mmengine.registry import MODELS, DefaultScope

from dk_mmdet.layers import DKConv2d, DKDCNConv2d, DKDCNv2Conv2d, DKGlobalConv2d

LAYER_TYPES = {
    'DK': DKConv2d,
    'DKGlobal': DKGlobalConv2d,
    'DKDCN': DKDCNConv2d,
    'DKDCNv2': DKDCNv2Conv2d,
}


def build(layer_type, *args, **kwargs):
    return build_conv_layer(dict(type=layer_type, **kwargs.pop('options', {})), *args, **kwargs)


@contextlib.contextmanager
def default_scope(scope):
    """``scope`` as mmengine's default scope; None means no default scope at all.

    ``DefaultScope.overwrite_default_scope(None)`` keeps whatever scope earlier code (a
    Runner in another test) left current, so "no scope" empties the instance registry
    for the duration instead.
    """
    if scope is not None:
        with DefaultScope.overwrite_default_scope(scope):
            yield
        return
    saved = dict(DefaultScope._instance_dict)
    DefaultScope._instance_dict.clear()
    try:
        yield
    finally:
        DefaultScope._instance_dict.update(saved)


@pytest.mark.parametrize('layer_type', LAYER_TYPES)
@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_build_conv_layer_finds_each_type(layer_type, scope):
    with default_scope(scope):
        if scope is None:
            assert DefaultScope.get_current_instance() is None
        layer = build(layer_type, 8, 16, 3, stride=2, padding=1)
        assert type(layer) is LAYER_TYPES[layer_type]
        assert MODELS.get(layer_type) is LAYER_TYPES[layer_type]
    # mmcv's signature: bias defaults to False, the scope to kernel + 1.
    assert layer.bias is None
    assert layer.weight.shape == (16, 8, 4, 4)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding) == (8, 16, (3, 3), (2, 2), (1, 1))


@pytest.mark.parametrize('layer_type', LAYER_TYPES)
def test_conv_module_reads_the_conv_attributes(layer_type):
    module = ConvModule(8, 16, 3, padding=1, conv_cfg=dict(type=layer_type),
                        norm_cfg=dict(type='BN'))
    assert type(module.conv) is LAYER_TYPES[layer_type]
    # ConvModule drops the conv bias before a norm layer ('auto').
    assert module.conv.bias is None
    assert module(torch.randn(2, 8, 10, 10)).shape == (2, 16, 10, 10)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"DK got unknown option\(s\) \['deform_groups'\]"
                       r".*\['scope_size', 'kernel_offset_groups'\]"):
        build('DK', 8, 8, 3, options=dict(deform_groups=2))
    with pytest.raises(TypeError, match=r"DKDCN got unknown option\(s\) \['scope'\].*"
                       r"'deform_groups'"):
        build('DKDCN', 8, 8, 3, options=dict(scope=4))


@pytest.mark.parametrize('layer_type', LAYER_TYPES)
def test_scope_smaller_than_kernel_is_refused(layer_type):
    with pytest.raises(ValueError, match=r'scope_size=\(2, 2\) must be at least kernel_size'):
        build(layer_type, 8, 8, 3, options=dict(scope_size=2))


def reference_conv(layer, x, rigid, bias):
    return F.conv2d(x, rigid, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize('layer_type', LAYER_TYPES)
@pytest.mark.parametrize('scope_size', [4, 5])
def test_rigid_weight_loads_as_the_same_convolution(layer_type, scope_size):
    torch.manual_seed(0)
    layer = build(layer_type, 8, 12, 3, stride=2, padding=2, dilation=2, groups=2, bias=True,
                  options=dict(scope_size=scope_size))
    rigid = torch.randn(12, 4, 3, 3)
    bias = torch.randn(12)
    layer.load_state_dict({'weight': rigid, 'bias': bias}, strict=False)
    assert layer.weight.shape == (12, 4, scope_size, scope_size)

    x = torch.randn(2, 8, 11, 9)
    expected = reference_conv(layer, x, rigid, bias)
    if layer_type == 'DKDCNv2':
        # The zero-initialised mask branch gives sigmoid(0) = 0.5 at every tap, as in DCNv2.
        expected = 0.5 * F.conv2d(x, rigid, None, layer.stride, layer.padding, layer.dilation,
                                  layer.groups) + bias[:, None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_scope_equal_to_kernel_and_scope_weights_load_unchanged():
    same_scope = build('DK', 4, 4, 3, options=dict(scope_size=3))
    rigid = torch.randn(4, 4, 3, 3)
    same_scope.load_state_dict({'weight': rigid}, strict=False)
    assert torch.equal(same_scope.weight.data, rigid)

    layer = build('DK', 4, 4, 3)
    scope = torch.randn(4, 4, 4, 4)
    layer.load_state_dict({'weight': scope}, strict=False)
    assert torch.equal(layer.weight.data, scope)


def test_weight_of_another_shape_is_still_a_size_mismatch():
    layer = build('DK', 4, 4, 3)
    with pytest.raises(RuntimeError, match='size mismatch for weight'):
        layer.load_state_dict({'weight': torch.randn(4, 2, 3, 3)}, strict=False)


def test_loading_leaves_the_callers_state_dict_alone():
    layer = build('DK', 4, 4, 3)
    rigid = torch.randn(4, 4, 3, 3)
    state = {'weight': rigid}
    layer.load_state_dict(state, strict=False)
    assert state['weight'] is rigid


def test_import_registers_the_layers_and_checkpoint_loading_and_nothing_else():
    code = (
        'import sys, torch\n'
        'before = list(torch.serialization.get_safe_globals())\n'
        'import dk_mmdet\n'
        'from dk_mmdet.checkpoints import CHECKPOINT_SAFE_GLOBALS\n'
        'from mmengine.registry import MODELS, DefaultScope\n'
        'assert all(name in MODELS.module_dict for name in ("DK", "DKGlobal", "DKDCN", '
        '"DKDCNv2", "CondConv"))\n'
        'assert MODELS.get("DCN") is dk_mmdet.ZeroOffsetDeformConv2dPack\n'
        'assert "mmdet" not in sys.modules, "dk_mmdet imports mmdet"\n'
        'assert not torch.distributed.is_initialized()\n'
        # What weights_only loading may build beyond torch's own (torch.distributed registers
        # its tensor types when mmengine imports it): the data-only classes of mmengine
        # checkpoints.
        'added = [item for item in torch.serialization.get_safe_globals() if item not in before\n'
        '         and not item.__module__.startswith("torch.")]\n'
        'assert set(added) == set(CHECKPOINT_SAFE_GLOBALS), added\n'
        'assert DefaultScope.get_current_instance() is None\n'
        # A program that never sets a default scope builds them too.
        'from mmcv.cnn import build_conv_layer\n'
        'for name in ("DK", "DKGlobal", "DKDCN", "DKDCNv2"):\n'
        '    assert type(build_conv_layer(dict(type=name), 4, 4, 3)) is MODELS.get(name)\n')
    subprocess.run([sys.executable, '-c', code], check=True)
