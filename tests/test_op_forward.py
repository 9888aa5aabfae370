"""Forward values of ``dk_ops.deform_kernel_conv2d``: against the float64 reference over
the problem matrix, and against independent oracles (``F.conv2d``, mmcv's deformable
convolutions, shifted rigid kernels) for the consequences of the formula."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import dk_ops
from dk_reference import (DCN_PROBLEMS, PROBLEMS, Problem, by_name,
                          deform_kernel_conv2d_reference, mmcv_deformable_conv, non_contiguous)

# float32 results are compared with the float64 reference of the same (rounded) inputs.
TOLERANCE = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
}


def problem_named(name: str) -> Problem:
    return next(problem for problem in PROBLEMS if problem.name == name)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(PROBLEMS)
def test_matches_reference(problem, dtype):
    tensors = problem.make_inputs(dtype)
    output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    expected = problem.call(deform_kernel_conv2d_reference, tensors)
    assert output.dtype == dtype
    torch.testing.assert_close(output.double(), expected, **TOLERANCE[dtype])


@by_name([
    problem_named('k3_scope4_local'),
    problem_named('global'),
    problem_named('data_offset_mask_dgroups2_groups2'),
    problem_named('global_data_offset_mask_dgroups2'),
])
def test_bfloat16_close_to_reference(problem):
    tensors = problem.make_inputs(torch.bfloat16)
    output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    # The reference sees the same bfloat16-rounded inputs, so only the op's own
    # rounding (about 3 significant digits) separates the two.
    expected = problem.call(deform_kernel_conv2d_reference, tensors)
    assert output.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    torch.testing.assert_close(output.double(), expected, rtol=3e-2, atol=3e-2 * scale)


@by_name([
    problem_named('k3_scope4_local'),
    problem_named('global'),
    problem_named('data_offset_mask_dgroups2_groups2'),
    problem_named('global_data_offset_mask_dgroups2'),
])
def test_non_contiguous_inputs(problem):
    tensors = problem.make_inputs()
    scrambled = {name: None if t is None else non_contiguous(name, t)
                 for name, t in tensors.items()}
    output = problem.call(dk_ops.deform_kernel_conv2d, scrambled)
    torch.testing.assert_close(output, problem.call(deform_kernel_conv2d_reference, tensors))


@by_name([
    problem_named('data_offset_mask_dgroups2_groups2'),
    problem_named('global_data_offset_mask_dgroups2'),
])
def test_empty_batch(problem):
    problem = dataclasses.replace(problem, batch=0)
    output = problem.call(dk_ops.deform_kernel_conv2d, problem.make_inputs())
    assert output.shape == (0, problem.out_channels, *problem.output_size)


@by_name([
    Problem('k3', scope_size=(3, 3)),
    Problem('k3x2_stride2x1_dil1x2_pad0x1', kernel_size=(3, 2), scope_size=(3, 2),
            input_size=(8, 9), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    Problem('k3_groups2_stride2_dil2', scope_size=(3, 3), groups=2, kernel_offset_groups=2,
            out_channels=6, stride=(2, 2), dilation=(2, 2), padding=(2, 2), input_size=(9, 8)),
    Problem('k1_depthwise_stride2', kernel_size=(1, 1), scope_size=(1, 1), padding=(0, 0),
            stride=(2, 2), groups=4),
])
@pytest.mark.parametrize('offsets', ['local', 'global', 'local_with_zero_data_offset_unit_mask'])
def test_zero_offsets_with_scope_equal_kernel_is_conv2d(problem, offsets):
    problem = dataclasses.replace(problem, global_offset=offsets == 'global',
                                  data_offset=offsets.endswith('mask'),
                                  mask=offsets.endswith('mask'))
    tensors = problem.make_inputs()
    tensors['kernel_offset'].zero_()
    if problem.data_offset:
        tensors['data_offset'].zero_()
        tensors['mask'].fill_(1)
    output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    expected = F.conv2d(tensors['input'], tensors['weight'], tensors['bias'], problem.stride,
                        problem.padding, problem.dilation, problem.groups)
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(DCN_PROBLEMS)
def test_zero_kernel_offsets_with_data_offsets_is_mmcv_dcn(problem, dtype):
    tensors = problem.make_inputs(dtype)
    output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    torch.testing.assert_close(output, problem.call(mmcv_deformable_conv, tensors),
                               **TOLERANCE[dtype])


def shifted_window(weight, top, left, kernel_size):
    """weight[..., top:top+K_h, left:left+K_w], reading zeros outside the scope."""
    pad = max(kernel_size)
    padded = F.pad(weight, (pad, pad, pad, pad))
    return padded[..., pad + top:pad + top + kernel_size[0], pad + left:pad + left + kernel_size[1]]


# (scope, kernel offset (dy, dx)): with an integer zero-offset position s0 = (S - K)/2, an
# offset d such that s0 + d is an integer t samples the rigid window of the scope
# starting at row/column t, i.e. tap (i, j) reads weight[..., t_y + i, t_x + j].
SHIFTS = [
    ((5, 5), (1.0, -1.0)),  # s0 = 1: window rows 2..4, columns 0..2
    ((5, 5), (-1.0, 0.0)),
    ((4, 4), (0.5, -0.5)),  # s0 = 0.5: window rows 1..3, columns 0..2
    ((3, 3), (1.0, 0.0)),  # s0 = 0: rows 1..3, row 3 outside the scope reads zero
    ((5, 4), (-2.0, 1.5)),  # s0 = (1, 0.5): rows -1..1 (row -1 zero), columns 2..4 (4 zero)
]


@pytest.mark.parametrize('global_offset', [False, True], ids=['local', 'global'])
@pytest.mark.parametrize('scope_size,shift', SHIFTS, ids=str)
def test_integer_kernel_offset_shifts_the_window(scope_size, shift, global_offset):
    problem = Problem('shift', scope_size=scope_size, global_offset=global_offset)
    tensors = problem.make_inputs()
    tensors['kernel_offset'][:, 0::2] = shift[0]
    tensors['kernel_offset'][:, 1::2] = shift[1]
    top = int(shift[0] + (scope_size[0] - 3) / 2)
    left = int(shift[1] + (scope_size[1] - 3) / 2)
    expected = F.conv2d(tensors['input'], shifted_window(tensors['weight'], top, left, (3, 3)),
                        tensors['bias'], problem.stride, problem.padding)
    torch.testing.assert_close(problem.call(dk_ops.deform_kernel_conv2d, tensors), expected)


def test_kernel_offset_groups_shift_their_own_channel_blocks():
    # Input channels 0-1 form offset block 0 (shifted down-left), channels 2-3 block 1
    # (shifted up-right): one rigid conv whose kernel takes each block's window.
    problem = Problem('shift_blocks', scope_size=(5, 5), kernel_offset_groups=2)
    tensors = problem.make_inputs()
    offset = tensors['kernel_offset'].view(2, 2, 9, 2, *problem.output_size)
    offset[:, 0, :, 0], offset[:, 0, :, 1] = 1.0, -1.0
    offset[:, 1, :, 0], offset[:, 1, :, 1] = -1.0, 1.0
    weight = tensors['weight']
    rigid = torch.cat([shifted_window(weight[:, :2], 2, 0, (3, 3)),
                       shifted_window(weight[:, 2:], 0, 2, (3, 3))], dim=1)
    expected = F.conv2d(tensors['input'], rigid, tensors['bias'], problem.stride,
                        problem.padding)
    torch.testing.assert_close(problem.call(dk_ops.deform_kernel_conv2d, tensors), expected)


def broadcast_global_offset(problem, tensors):
    """The tensors with the global kernel offset repeated at every output location."""
    local = tensors['kernel_offset'][:, :, None, None].expand(-1, -1, *problem.output_size)
    return dict(tensors, kernel_offset=local.contiguous())


@by_name([problem for problem in PROBLEMS if problem.global_offset])
def test_global_offset_equals_broadcast_local_offset(problem):
    tensors = problem.make_inputs()
    output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    expected = problem.call(dk_ops.deform_kernel_conv2d, broadcast_global_offset(problem, tensors))
    torch.testing.assert_close(output, expected)


@by_name([
    dataclasses.replace(problem_named('data_offset_mask_dgroups2_groups2'), batch=3),
    dataclasses.replace(problem_named('global_data_offset_mask_dgroups2'), batch=3),
])
def test_tiny_column_budget_gives_the_same_output(problem, monkeypatch):
    tensors = problem.make_inputs()
    monkeypatch.delenv('DK_OPS_MAX_COLUMN_BYTES', raising=False)
    default = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    monkeypatch.setenv('DK_OPS_MAX_COLUMN_BYTES', '1')
    torch.testing.assert_close(problem.call(dk_ops.deform_kernel_conv2d, tensors), default)
