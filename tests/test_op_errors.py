"""Bad input to ``dk_ops.deform_kernel_conv2d`` raises a Python exception (ValueError, or
TypeError for dtypes) that names the argument and shows the shapes; input sizes follow
F.conv2d on real and fake tensors; non-finite offsets give the documented result."""
import dataclasses
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.modules.utils import _pair

import dk_ops
from dk_reference import PROBLEMS, Problem, deform_kernel_conv2d_reference, output_and_gradients

# N=2, C_in=C_out=4, 7x6 input, 3x3 taps from a 4x4 scope, padding 1: the output is 7x6,
# kernel_offset and data_offset (2, 18, 7, 6), mask (2, 9, 7, 6), weight (4, 4, 4, 4).
BASE = Problem('base', data_offset=True, mask=True)
PAIR_ARGUMENTS = ('kernel_size', 'stride', 'padding', 'dilation')


def zeros(*shape, dtype=torch.float64):
    return torch.zeros(shape, dtype=dtype)


@dataclasses.dataclass
class BadCall:
    name: str
    changes: dict  # tensors or geometry arguments replacing those of BASE
    arguments: tuple  # argument names the message must contain
    shapes: tuple = ()  # shapes the message must show, as "(2, 17, 7, 6)" or "[2, 17, 7, 6]"
    numbers: tuple = ()  # plain numbers the message must show
    error: type = ValueError  # TypeError for a wrong dtype


BAD_CALLS = [
    BadCall('kernel_offset_channels', dict(kernel_offset=zeros(2, 17, 7, 6)), ('kernel_offset', ),
            ((2, 17, 7, 6), )),
    BadCall('kernel_offset_height', dict(kernel_offset=zeros(2, 18, 6, 6)), ('kernel_offset', ),
            ((2, 18, 6, 6), )),
    BadCall('kernel_offset_batch', dict(kernel_offset=zeros(3, 18, 7, 6)), ('kernel_offset', ),
            ((3, 18, 7, 6), )),
    BadCall('kernel_offset_3d', dict(kernel_offset=zeros(2, 18, 42)), ('kernel_offset', ),
            ((2, 18, 42), )),
    BadCall('kernel_offset_for_one_group_with_two', dict(kernel_offset_groups=2),
            ('kernel_offset', ), ((2, 18, 7, 6), )),
    BadCall('global_kernel_offset_channels', dict(kernel_offset=zeros(2, 17)),
            ('kernel_offset', ), ((2, 17), )),
    BadCall('global_kernel_offset_batch', dict(kernel_offset=zeros(1, 18)), ('kernel_offset', ),
            ((1, 18), )),
    BadCall('data_offset_channels', dict(data_offset=zeros(2, 16, 7, 6)), ('data_offset', ),
            ((2, 16, 7, 6), )),
    BadCall('data_offset_width', dict(data_offset=zeros(2, 18, 7, 5)), ('data_offset', ),
            ((2, 18, 7, 5), )),
    BadCall('data_offset_batch', dict(data_offset=zeros(1, 18, 7, 6)), ('data_offset', ),
            ((1, 18, 7, 6), )),
    BadCall('data_offset_for_one_group_with_two', dict(deform_groups=2, mask=None),
            ('data_offset', ), ((2, 18, 7, 6), )),
    BadCall('mask_channels', dict(mask=zeros(2, 18, 7, 6)), ('mask', ), ((2, 18, 7, 6), )),
    BadCall('mask_height', dict(mask=zeros(2, 9, 8, 6)), ('mask', ), ((2, 9, 8, 6), )),
    BadCall('mask_batch', dict(mask=zeros(3, 9, 7, 6)), ('mask', ), ((3, 9, 7, 6), )),
    BadCall('scope_smaller_than_kernel', dict(weight=zeros(4, 4, 2, 2)),
            ('weight', 'kernel_size'), ((2, 2), (3, 3))),
    BadCall('scope_narrower_than_kernel', dict(weight=zeros(4, 4, 4, 2)),
            ('weight', 'kernel_size'), ((4, 2), (3, 3))),
    BadCall('in_channels_not_divisible_by_groups', dict(groups=3, weight=zeros(3, 1, 4, 4),
                                                        bias=zeros(3)), ('groups', ),
            numbers=(4, 3)),
    BadCall('out_channels_not_divisible_by_groups', dict(groups=2, weight=zeros(3, 2, 4, 4),
                                                         bias=zeros(3)), ('groups', ),
            numbers=(3, 2)),
    BadCall('in_channels_not_divisible_by_kernel_offset_groups',
            dict(kernel_offset_groups=3, kernel_offset=zeros(2, 54, 7, 6)),
            ('kernel_offset_groups', ), numbers=(4, 3)),
    BadCall('in_channels_not_divisible_by_deform_groups',
            dict(deform_groups=3, data_offset=zeros(2, 54, 7, 6), mask=zeros(2, 27, 7, 6)),
            ('deform_groups', ), numbers=(4, 3)),
    BadCall('weight_in_channels', dict(weight=zeros(4, 3, 4, 4)), ('weight', ),
            ((4, 3, 4, 4), )),
    BadCall('weight_in_channels_ignore_groups', dict(groups=2, weight=zeros(4, 4, 4, 4)),
            ('weight', ), ((4, 4, 4, 4), )),
    BadCall('weight_3d', dict(weight=zeros(4, 4, 4)), ('weight', ), ((4, 4, 4), )),
    BadCall('input_3d', dict(input=zeros(4, 7, 6)), ('input', ), ((4, 7, 6), )),
    BadCall('input_5d', dict(input=zeros(2, 4, 7, 6, 1)), ('input', ), ((2, 4, 7, 6, 1), )),
    BadCall('input_too_small', dict(input=zeros(2, 4, 1, 1), padding=0), ('input', ),
            ((2, 4, 1, 1), )),
    # Smaller than the kernel by less than the stride: F.conv2d refuses it, and so must we
    # (rounding the negative output size towards zero would make it one row).
    BadCall('input_smaller_than_kernel_by_less_than_stride',
            dict(input=zeros(2, 4, 2, 6), padding=0, stride=2, kernel_offset=zeros(2, 18, 1, 2),
                 data_offset=zeros(2, 18, 1, 2), mask=zeros(2, 9, 1, 2)),
            ('input', 'kernel_size'), ((2, 4, 2, 6), (3, 3))),
    BadCall('input_smaller_than_dilated_kernel',
            dict(input=zeros(2, 4, 4, 6), padding=0, stride=3, dilation=2,
                 kernel_offset=zeros(2, 18, 1, 1), data_offset=zeros(2, 18, 1, 1),
                 mask=zeros(2, 9, 1, 1)),
            ('input', 'kernel_size', 'dilation'), ((2, 4, 4, 6), (5, 5))),
    BadCall('bias_length', dict(bias=zeros(5)), ('bias', ), ((5, ), )),
    BadCall('bias_2d', dict(bias=zeros(4, 1)), ('bias', ), ((4, 1), )),
    BadCall('weight_dtype', dict(weight=zeros(4, 4, 4, 4, dtype=torch.float32)), ('weight', ),
            error=TypeError),
    BadCall('kernel_offset_dtype', dict(kernel_offset=zeros(2, 18, 7, 6, dtype=torch.float32)),
            ('kernel_offset', ), error=TypeError),
    BadCall('data_offset_dtype', dict(data_offset=zeros(2, 18, 7, 6, dtype=torch.float32)),
            ('data_offset', ), error=TypeError),
    BadCall('mask_dtype', dict(mask=zeros(2, 9, 7, 6, dtype=torch.float32)), ('mask', ),
            error=TypeError),
    BadCall('bias_dtype', dict(bias=zeros(4, dtype=torch.float32)), ('bias', ), error=TypeError),
    BadCall('integer_input', dict(input=zeros(2, 4, 7, 6, dtype=torch.int64),
                                  weight=zeros(4, 4, 4, 4, dtype=torch.int64)), ('input', ),
            error=TypeError),
    BadCall('integer_weight', dict(weight=zeros(4, 4, 4, 4, dtype=torch.int32)), ('weight', ),
            error=TypeError),
    BadCall('integer_kernel_offset', dict(kernel_offset=zeros(2, 18, 7, 6, dtype=torch.int64)),
            ('kernel_offset', ), error=TypeError),
    BadCall('zero_stride', dict(stride=(1, 0)), ('stride', )),
    BadCall('zero_dilation', dict(dilation=0), ('dilation', )),
    BadCall('negative_padding', dict(padding=(-1, 1)), ('padding', )),
    BadCall('zero_kernel_size', dict(kernel_size=(0, 3)), ('kernel_size', )),
    BadCall('zero_groups', dict(groups=0), ('groups', )),
    BadCall('negative_groups', dict(groups=-1), ('groups', ), numbers=(-1, )),
    BadCall('zero_kernel_offset_groups', dict(kernel_offset_groups=0), ('kernel_offset_groups', )),
    BadCall('zero_deform_groups', dict(deform_groups=0), ('deform_groups', )),
    # F.conv2d refuses these zero sizes too (test_op_zero_sizes.py has those it accepts).
    BadCall('no_output_channels', dict(weight=zeros(0, 4, 4, 4), bias=None), ('weight', ),
            ((0, 4, 4, 4), )),
    # Padded enough to hold the kernel, with offsets and mask of the output size that gives.
    BadCall('input_without_rows',
            dict(input=zeros(2, 4, 0, 6), padding=2, kernel_offset=zeros(2, 18, 2, 8),
                 data_offset=zeros(2, 18, 2, 8), mask=zeros(2, 9, 2, 8)),
            ('input', ), ((2, 4, 0, 6), )),
    BadCall('input_without_columns',
            dict(input=zeros(2, 4, 7, 0), padding=2, kernel_offset=zeros(2, 18, 9, 2),
                 data_offset=zeros(2, 18, 9, 2), mask=zeros(2, 9, 9, 2)),
            ('input', ), ((2, 4, 7, 0), )),
]


def shape_pattern(shape):
    # "(2, 17)" or "[2, 17]", possibly as the tail of a longer shape.
    return r'(?<!\d)' + r',\s*'.join(str(size) for size in shape) + r',?\s*[\)\]]'


def call_with(bad_call: BadCall, raw_op: bool):
    tensors = BASE.make_inputs()
    geometry = BASE.geometry()
    for name, value in bad_call.changes.items():
        (tensors if name in tensors else geometry)[name] = value
    if not raw_op:
        return dk_ops.deform_kernel_conv2d(tensors['input'], tensors['weight'],
                                           tensors['kernel_offset'], tensors['bias'],
                                           data_offset=tensors['data_offset'],
                                           mask=tensors['mask'], **geometry)
    pairs = [list(_pair(geometry[name])) for name in PAIR_ARGUMENTS]
    return torch.ops.dk_ops.deform_kernel_conv2d(
        tensors['input'], tensors['weight'], tensors['kernel_offset'], tensors['data_offset'],
        tensors['mask'], tensors['bias'], *pairs, geometry['groups'],
        geometry['kernel_offset_groups'], geometry['deform_groups'])


@pytest.mark.parametrize('raw_op', [False, True], ids=['dk_ops', 'torch.ops'])
@pytest.mark.parametrize('bad_call', BAD_CALLS, ids=lambda bad_call: bad_call.name)
def test_bad_call_raises_a_clear_error(bad_call, raw_op):
    with pytest.raises(bad_call.error) as error:
        call_with(bad_call, raw_op)
    message = str(error.value)
    for argument in bad_call.arguments:
        # Whole word: "groups" must not be found inside "kernel_offset_groups".
        assert re.search(rf'(?<![\w.]){argument}(?!\w)', message), (argument, message)
    for shape in bad_call.shapes:
        assert re.search(shape_pattern(shape), message), (shape, message)
    for number in bad_call.numbers:
        assert re.search(rf'(?<!\d){number}(?!\d)', message), (number, message)


def test_bad_grad_output_of_backward_op_raises_a_clear_error():
    tensors = BASE.make_inputs()
    pairs = [list(_pair(value)) for value in (BASE.kernel_size, BASE.stride, BASE.padding,
                                              BASE.dilation)]
    with pytest.raises(ValueError, match=r'grad_output[\s\S]*2,\s*4,\s*7,\s*5'):
        torch.ops.dk_ops.deform_kernel_conv2d_backward(
            zeros(2, 4, 7, 5), tensors['input'], tensors['weight'], tensors['kernel_offset'],
            tensors['data_offset'], tensors['mask'], *pairs, BASE.groups,
            BASE.kernel_offset_groups, BASE.deform_groups, [True] * 5)


@pytest.mark.parametrize('budget', ['0', '-5', 'lots'])
def test_bad_column_budget_raises_a_clear_error(budget, monkeypatch):
    monkeypatch.setenv('DK_OPS_MAX_COLUMN_BYTES', budget)
    with pytest.raises(ValueError, match=rf'DK_OPS_MAX_COLUMN_BYTES[\s\S]*{budget}'):
        BASE.call(dk_ops.deform_kernel_conv2d, BASE.make_inputs())


# Every floating dtype this torch has besides the four the kernels compute in (float8 and float4
# kinds): refused up front with the documented TypeError, whichever op is called.
SUPPORTED_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
OTHER_FLOATING_DTYPES = sorted({value for value in vars(torch).values()
                                if isinstance(value, torch.dtype) and value.is_floating_point} -
                               SUPPORTED_DTYPES, key=str)


@pytest.mark.parametrize('dtype', OTHER_FLOATING_DTYPES, ids=str)
@pytest.mark.parametrize('problem', [BASE, Problem('global', global_offset=True)],
                         ids=lambda problem: problem.name)
def test_unsupported_floating_dtype_raises_type_error(problem, dtype):
    assert OTHER_FLOATING_DTYPES  # float8_e4m3fn and float8_e5m2 at least
    # Never read: the dtype check comes first (not every such dtype can even be filled).
    tensors = {name: None if t is None else torch.empty(t.shape, dtype=dtype)
               for name, t in problem.make_inputs().items()}
    dtype_name = re.escape(str(dtype).removeprefix('torch.'))
    message = rf'(?i)input[\s\S]*float32[\s\S]*{dtype_name}'
    with pytest.raises(TypeError, match=message):
        problem.call(dk_ops.deform_kernel_conv2d, tensors)
    grad_output = torch.empty(problem.batch, problem.out_channels, *problem.output_size,
                              dtype=dtype)
    with pytest.raises(TypeError, match=message):
        torch.ops.dk_ops.deform_kernel_conv2d_backward(
            grad_output, tensors['input'], tensors['weight'], tensors['kernel_offset'],
            tensors['data_offset'], tensors['mask'], list(problem.kernel_size),
            list(problem.stride), list(problem.padding), list(problem.dilation), problem.groups,
            problem.kernel_offset_groups, problem.deform_groups, [True] * 5)


# ----------------------------------------------------------------------------- output size
def outcome(function):
    """The output's (H_out, W_out), or the name of the exception ``function`` raised."""
    try:
        return tuple(function().shape[2:])
    except Exception as error:  # any exception is an outcome to compare
        return type(error).__name__


def one_dimension_sweep():
    """Geometries as (H, W) pairs of (size, kernel, stride, padding, dilation): each small
    combination in one dimension, with a fixed valid one (output 3) in the other."""
    other = (4, 2, 1, 0, 1)
    for swept in itertools.product(range(1, 6), range(1, 4), range(1, 4), range(3), range(1, 3)):
        yield swept, other
        yield other, swept


@pytest.mark.parametrize('global_offset', [False, True], ids=['local', 'global'])
def test_output_size_follows_conv2d_on_real_and_fake_tensors(global_offset):
    # F.conv2d refuses a padded input smaller than the dilated kernel; elsewhere its output
    # size is the op's. The op raises a ValueError there instead (documented), on real tensors
    # and in the fake kernel (FakeTensorMode, as torch.compile traces).
    mismatches = []
    for geometry in one_dimension_sweep():
        size, kernel_size, stride, padding, dilation = (tuple(pair) for pair in zip(*geometry))
        input = torch.zeros(1, 2, *size, dtype=torch.float64)
        weight = torch.zeros(2, 2, *kernel_size, dtype=torch.float64)
        expected = outcome(lambda: F.conv2d(input, weight, None, stride, padding, dilation))
        if expected == 'RuntimeError':
            expected = 'ValueError'
        # Where the size is refused, the size check comes first: any local offsets shape will do.
        out_size = (1, 1) if expected == 'ValueError' else expected
        taps = kernel_size[0] * kernel_size[1]
        kernel_offset = torch.zeros((1, 2 * taps) if global_offset else (1, 2 * taps, *out_size),
                                    dtype=torch.float64)

        def call(input, weight, kernel_offset):
            return dk_ops.deform_kernel_conv2d(input, weight, kernel_offset,
                                               kernel_size=kernel_size, stride=stride,
                                               padding=padding, dilation=dilation)

        real = outcome(lambda: call(input, weight, kernel_offset))
        with FakeTensorMode() as mode:
            fake_tensors = [mode.from_tensor(t) for t in (input, weight, kernel_offset)]
            fake = outcome(lambda: call(*fake_tensors))
        if real != expected or fake != expected:
            mismatches.append(f'{geometry}: F.conv2d {expected}, real {real}, fake {fake}')
    assert not mismatches, '\n'.join(mismatches)


# ----------------------------------------------------------------------------- non-finite
# Documented: a non-finite offset puts its tap outside the scope (or image), so the tap
# contributes zero and gets zero gradient, exactly like a finite offset that lands far
# outside. The reference, which needs finite offsets, gets such a far offset instead.
FAR_OUTSIDE = 1e4


def poison(tensors, name, value):
    """Set a few entries of the offset ``name`` to ``value``; returns their index."""
    offset = tensors[name]
    index = torch.zeros_like(offset, dtype=torch.bool)
    index[0, 2 * 4] = True  # dy of the centre tap of group 0, first image, every location
    if offset.dim() == 4:
        index[1, 2 * 1 + 1, 2, 3] = True  # dx of tap 1 at one location of the second image
    else:
        index[1, 2 * 1 + 1] = True
    offset[index] = value
    return index


def problem_named(name: str) -> Problem:
    return next(problem for problem in PROBLEMS if problem.name == name)


@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize('problem,name', [
    (problem_named(problem), name)
    for problem in ('data_offset_mask_dgroups2_groups2', 'global_data_offset_mask_dgroups2')
    for name in ('kernel_offset', 'data_offset')
] + [
    # Global offsets without data offsets: the fast path (one kernel per image).
    (problem_named(problem), 'kernel_offset') for problem in ('global', 'global_kgroups2')
], ids=lambda value: value if isinstance(value, str) else value.name)
def test_non_finite_offset_tap_contributes_zero(problem, name, value):
    tensors = problem.make_inputs()
    poisoned = poison(tensors, name, value)
    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    far = dict(tensors, **{name: tensors[name].masked_fill(poisoned, FAR_OUTSIDE)})
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     far)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, expected_output)
    for argument, gradient in gradients.items():
        assert torch.isfinite(gradient).all(), argument
        torch.testing.assert_close(gradient, expected[argument],
                                   msg=lambda m, argument=argument: f'{argument}: {m}')
    assert not gradients[name][poisoned].any()
