"""The opt-in implicit-GEMM kernels of the local path (``DK_OPS_LOCAL_KERNELS=implicit_gemm``,
dk_ops/csrc/cuda/implicit_gemm.cuh), the forward and the weight gradient, executed on a CPU against
the float64 reference (they are the first kernels to use the block barriers and shared memory
of the CUDA emulation, which test_emulated_cuda.py tests on their own).

As in test_op_cuda_emulated.py, the op runs as users call it, its forward and backward sent to the
emulated CUDA launchers. The driver marks each launch of the kernels with the profiler ranges
``dk_ops::implicit_gemm_forward`` and ``dk_ops::implicit_gemm_weight_grad``, and each
scope-column pass of the default path with ``dk_ops::scatter_scope_columns``: the tests count
all three, so they fail if the driver takes the columns path instead. The kernels' tiles are 64
columns x 64 output channels (forward) or K entries x 64 output channels (weight gradient), with
K steps or tiles of 4 input channels x 16 scope cells (8 in float64); the problems below cut each
of them short."""
import collections

import pytest
import torch

import dk_ops
from dk_reference import (CUDA_PROBLEMS, DCN_PROBLEMS, PROBLEMS, Problem, by_name,
                          deform_kernel_conv2d_reference, output_and_gradients)
from emulated_cuda import assert_matches_reference, emulated_output_and_gradients
from op_arguments import backward_op_args
from op_comparison import TOLERANCE, assert_gradients_close

FORWARD = 'dk_ops::implicit_gemm_forward'
WEIGHT_GRAD = 'dk_ops::implicit_gemm_weight_grad'
SCOPE_COLUMNS = 'dk_ops::scatter_scope_columns'


def runs_local_path(problem):
    # Global kernel offsets without data offsets or mask take the global path, no column kernel.
    return not problem.global_offset or problem.data_offset or problem.mask


# Every tail of the tiles: 144 columns (two tiles and 16), 70 output channels (64 and 6),
# 6 input channels (4 and 2), 25 scope cells (16 and 9; in float64 8, 8, 8 and 1); with groups,
# 72 columns, 65 output and 5 input channels per group, offset groups that cut the groups; and
# one problem of whole tiles and steps only.
TILE_PROBLEMS = [
    Problem('tiles_out70_in6_scope5_dcn_mask', in_channels=6, out_channels=70,
            input_size=(9, 8), scope_size=(5, 5), data_offset=True, mask=True),
    Problem('tiles_groups2_kgroups5_dgroups2_scope5', batch=1, in_channels=10, out_channels=130,
            input_size=(8, 9), scope_size=(5, 5), groups=2, kernel_offset_groups=5,
            deform_groups=2, data_offset=True, mask=True),
    Problem('tiles_whole', in_channels=8, out_channels=64, input_size=(8, 8)),
]

# The weight gradient splits the columns into ranges of at least 4 steps of 64 (implicit_gemm.cuh,
# kMinRangeSteps) when its tiles are few: here one K tile (two in float64) x one output tile, and
# 900 columns in ranges of 256, 256, 256 and 132, the last ending in a step of 4 columns.
RANGE_PROBLEM = Problem('ranges_900_columns_mask', batch=3, out_channels=8, input_size=(15, 20),
                        mask=True)


def ranges_run(profile):
    """The number of each of the dk_ops profiler ranges above in a profile."""
    ranges = collections.Counter(event.name for event in profile.events())
    return {name: ranges[name] for name in (FORWARD, WEIGHT_GRAD, SCOPE_COLUMNS)}


def profile_cpu():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def profiled_output_and_gradients(problem, tensors, **kwargs):
    """The op's output and gradients with its forward and backward on the emulated CUDA kernels,
    and the number of each dk_ops range they ran."""
    with profile_cpu() as profile:
        output, gradients = emulated_output_and_gradients(problem, tensors, **kwargs)
    return output, gradients, ranges_run(profile)


def assert_implicit_gemm_matches_reference(problem, dtype, launches=1, weight_only=False):
    """The output and the gradients against the reference: the weight's from the implicit GEMM,
    the others (unless ``weight_only``) through grad Z, as on the columns path."""
    tensors = problem.make_inputs(dtype)
    # The zero kernel offsets of DCN put every scope sample on a kink of bilinear sampling, where
    # the kernel offset gradient is either one-sided derivative: not compared (as elsewhere).
    wrt = ['weight'] if weight_only else [
        name for name, t in tensors.items()
        if t is not None and not (name == 'kernel_offset' and problem in DCN_PROBLEMS)]
    with profile_cpu() as profile:
        assert_matches_reference(problem, tensors, TOLERANCE[dtype], wrt=wrt)
    assert ranges_run(profile) == {FORWARD: launches, WEIGHT_GRAD: launches, SCOPE_COLUMNS: 0}


@pytest.fixture
def implicit_gemm(monkeypatch):
    monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', 'implicit_gemm')


# The wide-channel problems (many K steps and tiles, 72 input channels) in float64 only, as in
# test_op_cuda_emulated.py: the reference is slow there, and float32 runs the same code. The other
# gradients only in float64 at 4-10 channels: the driver runs them alike in every dtype and at
# every width (test_op_cuda_emulated.py compares them there), and their emulated kernels and
# their reference take most of the time.
@pytest.mark.parametrize('problem,dtype', [
    pytest.param(problem, dtype, id=f'{problem.name}-{dtype}')
    for problem in PROBLEMS + DCN_PROBLEMS + TILE_PROBLEMS if runs_local_path(problem)
    for dtype in (torch.float64, torch.float32)
] + [pytest.param(problem, torch.float64, id=f'{problem.name}-torch.float64')
     for problem in CUDA_PROBLEMS if runs_local_path(problem)])
def test_output_and_gradients_match_reference(problem, dtype, implicit_gemm):
    assert_implicit_gemm_matches_reference(
        problem, dtype, weight_only=dtype == torch.float32 or problem in CUDA_PROBLEMS)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
def test_column_ranges_with_a_tail(dtype, implicit_gemm):
    assert_implicit_gemm_matches_reference(RANGE_PROBLEM, dtype, weight_only=True)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name(TILE_PROBLEMS[:2])
def test_reduced_precision_close_to_reference(problem, dtype, implicit_gemm):
    # Tiles and sums in float32, so the output and the weight gradient are the reference on the
    # rounded inputs (and the rounded output gradient) up to their own rounding to the dtype (and
    # products summed in another order). The other gradients go through grad Z rounded to the
    # dtype, as on the columns path (test_op_cuda_emulated.py).
    tensors = problem.make_inputs(dtype)
    output, gradients, ranges = profiled_output_and_gradients(problem, tensors, wrt=['weight'])
    assert ranges == {FORWARD: 1, WEIGHT_GRAD: 1, SCOPE_COLUMNS: 0}
    assert output.dtype == dtype and gradients['weight'].dtype == dtype
    as_float64 = {name: None if t is None else t.double() for name, t in tensors.items()}
    expected_output, expected = output_and_gradients(
        problem, deform_kernel_conv2d_reference, as_float64, wrt=['weight'],
        view=lambda name, t: t.to(dtype).double() if name == 'grad_output' else t)
    unit_roundoff = torch.finfo(dtype).eps / 2
    for actual, wanted in [(output, expected_output), (gradients['weight'], expected['weight'])]:
        scale = wanted.abs().max().item()
        torch.testing.assert_close(actual.double(), wanted, rtol=2 * unit_roundoff,
                                   atol=2 * unit_roundoff * scale)


@pytest.mark.parametrize('columns_per_chunk', [37, 200])
@by_name(TILE_PROBLEMS[:1])
def test_column_chunks_start_inside_tiles(problem, columns_per_chunk, implicit_gemm, monkeypatch):
    # The kernels take every column in one launch unless the column budget asks for chunks;
    # chunks of 37 columns start inside tiles, image rows and images.
    column_bytes = problem.in_channels * problem.scope_size[0] * problem.scope_size[1] * 8
    monkeypatch.setenv('DK_OPS_MAX_COLUMN_BYTES', str(columns_per_chunk * column_bytes))
    columns = problem.batch * problem.output_size[0] * problem.output_size[1]
    assert_implicit_gemm_matches_reference(problem, torch.float64,
                                           launches=-(-columns // columns_per_chunk))


@pytest.mark.parametrize('wrt', [['weight'], ['input', 'kernel_offset', 'data_offset', 'mask']],
                         ids=['weight_alone', 'all_but_weight'])
@by_name(TILE_PROBLEMS[:1])
def test_weight_gradient_alone_or_not_at_all(problem, wrt, implicit_gemm):
    # The backward op's output_mask then asks for the weight gradient alone (no grad Z at all),
    # or for everything but it (no implicit GEMM in the backward).
    tensors = problem.make_inputs()
    output, gradients, ranges = profiled_output_and_gradients(problem, tensors, wrt=wrt)
    assert ranges == {FORWARD: 1, WEIGHT_GRAD: int('weight' in wrt), SCOPE_COLUMNS: 0}
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, tensors, wrt=wrt)
    assert_gradients_close(gradients, expected, **TOLERANCE[torch.float64])


@pytest.mark.parametrize('value', [None, '', 'columns'])
@by_name(TILE_PROBLEMS[:1])
def test_columns_path_unless_asked(problem, value, monkeypatch):
    if value is None:
        monkeypatch.delenv('DK_OPS_LOCAL_KERNELS', raising=False)
    else:
        monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', value)
    _, _, ranges = profiled_output_and_gradients(problem, problem.make_inputs())
    # The scope columns of the forward and the backward, in the GPU's ceil(S / taps) chunks.
    chunks = -(-(problem.scope_size[0] * problem.scope_size[1]) // problem.taps)
    assert ranges == {FORWARD: 0, WEIGHT_GRAD: 0, SCOPE_COLUMNS: 2 * chunks}


@by_name(TILE_PROBLEMS[:1])
def test_cpu_kernels_keep_the_columns_path(problem, implicit_gemm):
    # The CPU kernels have no implicit GEMM: the request leaves them as they are.
    tensors = problem.make_inputs()
    with profile_cpu() as profile:
        output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    assert ranges_run(profile) == {FORWARD: 0, WEIGHT_GRAD: 0, SCOPE_COLUMNS: 2}
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     tensors)
    torch.testing.assert_close(output, expected_output, **TOLERANCE[torch.float64])
    assert_gradients_close(gradients, expected, **TOLERANCE[torch.float64])


@pytest.mark.parametrize('value', ['implicit-gemm', 'IMPLICIT_GEMM', 'cudnn'])
def test_unknown_local_kernels_value_is_refused(value, monkeypatch):
    # By the forward and by the backward op called alone.
    monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', value)
    problem = TILE_PROBLEMS[0]
    tensors = problem.make_inputs()
    message = (f"DK_OPS_LOCAL_KERNELS must be 'columns' or 'implicit_gemm' \\(or unset\\), "
               f"got '{value}'")
    with pytest.raises(ValueError, match=message):
        problem.call(dk_ops.deform_kernel_conv2d, tensors)
    grad_output = torch.ones(problem.batch, problem.out_channels, *problem.output_size,
                             dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        torch.ops.dk_ops.deform_kernel_conv2d_backward(
            *backward_op_args(problem, tensors, grad_output, [True] * 5))
