"""The nn.Modules around the op (DeformKernel2d, GlobalDeformKernel2d, DeformKernelConv2d)
and the mapping between rigid kernels and scopes."""
import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

import dk_ops
from dk_ops.weight_mapping import scope_to_rigid
from dk_reference import bilinear_zero_padded, deform_kernel_conv2d_reference

MODULES = {
    'local': dk_ops.DeformKernel2d,
    'global': dk_ops.GlobalDeformKernel2d,
    'dk_dcn': dk_ops.DeformKernelConv2d,
    'dk_dcn_modulated': functools.partial(dk_ops.DeformKernelConv2d, modulated=True),
}
GEOMETRIES = {
    'k3_default_scope': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    'k3_scope5_stride2_dil2_groups2': dict(in_channels=4, out_channels=4, kernel_size=3,
                                           stride=2, padding=2, dilation=2, groups=2,
                                           scope_size=5, kernel_offset_groups=2),
    'k3x1_scope_equal_kernel_no_bias': dict(in_channels=4, out_channels=4, kernel_size=(3, 1),
                                            padding=(1, 0), scope_size=(3, 1), bias=False),
    'k1_default_scope_depthwise': dict(in_channels=4, out_channels=8, kernel_size=1, groups=4),
}
kinds = pytest.mark.parametrize('kind', MODULES)
geometries = pytest.mark.parametrize('geometry', GEOMETRIES.values(), ids=GEOMETRIES.keys())


def test_package_imports_on_its_own():
    # A fresh interpreter whose first import is dk_ops (torch not imported beforehand).
    result = subprocess.run([sys.executable, '-c', 'import dk_ops'], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def build(kind, geometry, seed=0):
    torch.manual_seed(seed)
    return MODULES[kind](**geometry).double()


def random_input(channels=4, size=(9, 8)):
    return torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def rigid_conv(module, x):
    """The rigid convolution of the kernel that zero offsets sample from the module's scope."""
    rigid = scope_to_rigid(module.weight, module.kernel_size)
    return F.conv2d(x, rigid, module.bias, module.stride, module.padding, module.dilation,
                    module.groups)


@kinds
@geometries
def test_exposes_conv2d_attributes(kind, geometry):
    module = build(kind, geometry)
    kernel_size = _pair(geometry['kernel_size'])
    default_scope = tuple(k + 1 if k > 1 else 3 for k in kernel_size)
    assert module.in_channels == geometry['in_channels']
    assert module.out_channels == geometry['out_channels']
    assert module.kernel_size == kernel_size
    assert module.stride == _pair(geometry.get('stride', 1))
    assert module.padding == _pair(geometry.get('padding', 0))
    assert module.dilation == _pair(geometry.get('dilation', 1))
    assert module.groups == geometry.get('groups', 1)
    assert module.transposed is False
    assert tuple(module.output_padding) == (0, 0)
    scope = _pair(geometry.get('scope_size', default_scope))
    assert module.weight.shape == (geometry['out_channels'],
                                   geometry['in_channels'] // module.groups, *scope)
    if geometry.get('bias', True):
        assert module.bias.shape == (geometry['out_channels'], )
    else:
        assert module.bias is None


@kinds
@geometries
def test_fresh_module_is_the_rigid_conv_of_its_zero_offset_kernel(kind, geometry):
    module = build(kind, geometry)
    x = random_input()
    expected = rigid_conv(module, x)
    if getattr(module, 'modulated', False):
        # As in DCNv2 (and mmcv's DCNv2), the mask starts at sigmoid(0) = 0.5.
        bias = 0 if module.bias is None else module.bias.view(1, -1, 1, 1)
        expected = 0.5 * (expected - bias) + bias
    torch.testing.assert_close(module(x), expected)


def randomise(module, scale=0.3):
    """Give every offset generator random weights, so the offsets are not zero."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.startswith(('kernel_offset_', 'data_offset_')):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def test_local_module_feeds_its_offset_conv_to_the_op():
    module = randomise(build('local', GEOMETRIES['k3_scope5_stride2_dil2_groups2']))
    x = random_input()
    kernel_offset = F.conv2d(x, module.kernel_offset_conv.weight, module.kernel_offset_conv.bias,
                             module.stride, module.padding, module.dilation)
    expected = deform_kernel_conv2d_reference(x, module.weight, kernel_offset, module.bias,
                                              kernel_size=3, stride=2, padding=2, dilation=2,
                                              groups=2, kernel_offset_groups=2)
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize('modulated', [False, True], ids=['plain', 'modulated'])
def test_dk_dcn_module_feeds_its_offset_convs_to_the_op(modulated):
    module = randomise(
        dk_ops.DeformKernelConv2d(4, 6, 3, padding=1, deform_groups=2,
                                  modulated=modulated).double())
    x = random_input()

    def generated(conv):
        return F.conv2d(x, conv.weight, conv.bias, module.stride, module.padding, module.dilation)

    data = generated(module.data_offset_conv)
    # As in mmcv's DCNv2: offsets first, then the mask logits.
    data_offset, mask = (data[:, :36], data[:, 36:].sigmoid()) if modulated else (data, None)
    assert data.shape[1] == (54 if modulated else 36)
    expected = deform_kernel_conv2d_reference(x, module.weight,
                                              generated(module.kernel_offset_conv), module.bias,
                                              kernel_size=3, padding=1, data_offset=data_offset,
                                              mask=mask, deform_groups=2)
    torch.testing.assert_close(module(x), expected)


@kinds
@geometries
def test_offset_generators_get_gradients(kind, geometry):
    # A fresh layer, as a rigid kernel maps into the scope: the default scope must not leave it
    # at a symmetric point where the offsets get no gradient (a 1x1 kernel in a 2x2 scope does).
    module = build(kind, geometry)
    x = random_input()
    output = module(x)
    (output * torch.randn_like(output)).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    generators = [name for name, _ in module.named_parameters() if 'offset' in name]
    assert generators, 'no offset generator found'


# (fc bias for dy, for dx) -> scope cell every tap then reads from a 4x4 scope.
CLAMP_CORNERS = [((10.0, 10.0), (3, 3)), ((-10.0, -10.0), (0, 0)), ((10.0, -10.0), (3, 0))]


@pytest.mark.parametrize('shift,cell', CLAMP_CORNERS, ids=str)
def test_global_module_clamps_far_offsets_to_the_scope_corner(shift, cell):
    # Unclamped, such offsets would leave the scope and the taps would read zero.
    module = build('global', GEOMETRIES['k3_default_scope'])
    with torch.no_grad():
        module.kernel_offset_fc.bias[0::2] = shift[0]
        module.kernel_offset_fc.bias[1::2] = shift[1]
    x = random_input()
    corner = module.weight[:, :, cell[0], cell[1]]
    expected = F.conv2d(x, corner[..., None, None].expand(-1, -1, 3, 3), module.bias,
                        padding=1)
    torch.testing.assert_close(module(x), expected)


def test_global_module_clamps_each_tap_separately():
    # Zero-offset rows/columns of a 3x3 kernel in a 4x4 scope: 0.5, 1.5, 2.5. A shift of
    # +0.7 rows gives 1.2, 2.2, 3.2 -> 3 (the last row); -0.8 columns gives -0.3 -> 0,
    # 0.7, 1.7. So the effective offsets are (0.7, 0.7, 0.5) and (-0.5, -0.8, -0.8).
    module = build('global', GEOMETRIES['k3_default_scope'])
    with torch.no_grad():
        module.kernel_offset_fc.bias[0::2] = 0.7
        module.kernel_offset_fc.bias[1::2] = -0.8
    rows = torch.tensor([0.7, 0.7, 0.5], dtype=torch.float64)
    cols = torch.tensor([-0.5, -0.8, -0.8], dtype=torch.float64)
    offset = torch.stack(torch.meshgrid(rows, cols, indexing='ij'), -1).reshape(1, 18)
    x = random_input()
    expected = deform_kernel_conv2d_reference(x, module.weight, offset.expand(2, 18),
                                              module.bias, kernel_size=3, padding=1)
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize('kind', ['dk_dcn_modulated', 'global'])
def test_compiled_module_matches_eager(kind):
    module = randomise(build(kind, GEOMETRIES['k3_scope5_stride2_dil2_groups2']))
    x = random_input()
    compiled = torch.compile(module, fullgraph=True)

    def output_and_gradients(function):
        module.zero_grad()
        leaf = x.clone().requires_grad_()
        output = function(leaf)
        (output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
         ).sum().backward()
        return [output.detach(), leaf.grad] + [p.grad.clone() for p in module.parameters()]

    for actual, expected in zip(output_and_gradients(compiled), output_and_gradients(module)):
        torch.testing.assert_close(actual, expected)


# ----------------------------------------------------------------------------- invalid arguments
INVALID = {
    'out_channels_not_divisible_by_groups': (dict(groups=4), 'groups'),
    'in_channels_not_divisible_by_groups': (dict(in_channels=5, groups=2), 'groups'),
    'in_channels_not_divisible_by_kernel_offset_groups': (dict(kernel_offset_groups=3),
                                                          'kernel_offset_groups'),
    'scope_smaller_than_kernel': (dict(scope_size=2), 'scope_size'),
    'scope_narrower_than_kernel': (dict(scope_size=(4, 2)), 'scope_size'),
}


@kinds
@pytest.mark.parametrize('changes,argument', INVALID.values(), ids=INVALID.keys())
def test_invalid_constructor_arguments_raise(kind, changes, argument):
    arguments = {**dict(in_channels=4, out_channels=6, kernel_size=3), **changes}
    with pytest.raises(ValueError, match=argument):
        MODULES[kind](**arguments)


def test_invalid_deform_groups_raise():
    with pytest.raises(ValueError, match='deform_groups'):
        dk_ops.DeformKernelConv2d(4, 6, 3, deform_groups=3)


# ----------------------------------------------------------------------------- weight mapping
def zero_offset_sampling_matrix(kernel_size, scope_size):
    """(K_h*K_w, S_h*S_w): how much each zero-offset tap reads from each scope cell,
    sampled with the reference's bilinear interpolation."""
    cells = scope_size[0] * scope_size[1]
    basis = torch.eye(cells, dtype=torch.float64).view(cells, *scope_size)
    rows = torch.arange(kernel_size[0]) + (scope_size[0] - kernel_size[0]) / 2
    cols = torch.arange(kernel_size[1]) + (scope_size[1] - kernel_size[1]) / 2
    tap_rows = rows.double().repeat_interleave(kernel_size[1]).expand(cells, -1)
    tap_cols = cols.double().repeat(kernel_size[0]).expand(cells, -1)
    return bilinear_zero_padded(basis, tap_rows, tap_cols).T


MAPPINGS = [((3, 3), (4, 4)), ((3, 3), (5, 5)), ((3, 3), (6, 6)), ((3, 2), (5, 4)),
            ((1, 1), (2, 2)), ((3, 3), (3, 3))]
mappings = pytest.mark.parametrize('kernel_size,scope_size', MAPPINGS, ids=str)


@mappings
def test_scope_to_rigid_is_the_zero_offset_kernel(kernel_size, scope_size):
    scope = torch.randn(6, 2, *scope_size, dtype=torch.float64)
    x = random_input(channels=2)
    zero = torch.zeros(2, 2 * kernel_size[0] * kernel_size[1], dtype=torch.float64)
    expected = deform_kernel_conv2d_reference(x, scope, zero, kernel_size=kernel_size)
    torch.testing.assert_close(F.conv2d(x, scope_to_rigid(scope, kernel_size)), expected)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@mappings
def test_rigid_to_scope_round_trips(kernel_size, scope_size, dtype):
    rigid = torch.randn(6, 2, *kernel_size, dtype=dtype)
    scope = dk_ops.rigid_to_scope(rigid, scope_size)
    assert scope.shape == (6, 2, *scope_size) and scope.dtype == dtype
    torch.testing.assert_close(scope_to_rigid(scope, kernel_size), rigid)


@mappings
def test_rigid_to_scope_is_the_minimum_norm_solution(kernel_size, scope_size):
    # Exact fit (sampling @ scope = rigid) and no component in the sampling's null space:
    # together that is the unique minimum-norm solution.
    rigid = torch.randn(5, *kernel_size, dtype=torch.float64)
    scope = dk_ops.rigid_to_scope(rigid, scope_size).reshape(5, -1)
    sampling = zero_offset_sampling_matrix(kernel_size, scope_size)
    torch.testing.assert_close(scope @ sampling.T, rigid.reshape(5, -1))
    _, singular_values, right = torch.linalg.svd(sampling)
    rank = int((singular_values > 1e-10).sum())
    null_space = right[rank:]
    torch.testing.assert_close(scope @ null_space.T, torch.zeros(5, len(null_space),
                                                                  dtype=torch.float64))
