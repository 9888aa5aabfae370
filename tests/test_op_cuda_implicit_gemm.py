"""The opt-in implicit-GEMM forward of the local path (``DK_OPS_LOCAL_FORWARD=implicit_gemm``,
dk_ops/csrc/cuda/implicit_gemm_forward.cuh) executed on a CPU against the float64 reference, and
the block barriers and shared memory of the host emulation (dk_ops/csrc/cuda/host_emulation.h)
that it is the first kernel to use.

As in test_op_cuda_emulated.py, the op runs as users call it, its forward sent to the emulated
CUDA launchers. The driver marks each launch of the kernel with the profiler range
``dk_ops::implicit_gemm_forward`` and each scope-column pass of the default path with
``dk_ops::scatter_scope_columns``: the tests count both, so they fail if the driver takes the
columns path instead. The kernel's tiles are 64 columns x 64 output channels, and its K steps
4 input channels x 16 scope cells (8 in float64); the problems below cut each of them short."""
import collections

import pytest
import torch

import dk_ops
import dk_ops._C_host_cuda  # noqa: F401  (registers torch.ops.dk_ops_host_cuda)
from dk_reference import DCN_PROBLEMS, PROBLEMS, Problem, by_name, deform_kernel_conv2d_reference
from test_op_cuda import CUDA_PROBLEMS
from test_op_cuda_emulated import EmulatedCudaKernels
from test_op_forward import TOLERANCE

IMPLICIT_GEMM = 'dk_ops::implicit_gemm_forward'
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


def profiled_forward(problem, tensors):
    """The op's output with its forward on the emulated CUDA kernels, and the number of each
    dk_ops profiler range it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with EmulatedCudaKernels() as emulated:
            output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    assert emulated.calls == {'deform_kernel_conv2d': 1}
    ranges = collections.Counter(event.name for event in profile.events())
    return output, {name: ranges[name] for name in (IMPLICIT_GEMM, SCOPE_COLUMNS)}


def assert_implicit_gemm_matches_reference(problem, dtype, launches=1):
    tensors = problem.make_inputs(dtype)
    output, ranges = profiled_forward(problem, tensors)
    assert ranges == {IMPLICIT_GEMM: launches, SCOPE_COLUMNS: 0}
    assert output.dtype == dtype
    expected = problem.call(deform_kernel_conv2d_reference, tensors)
    torch.testing.assert_close(output.double(), expected, **TOLERANCE[dtype])


@pytest.fixture
def implicit_gemm(monkeypatch):
    monkeypatch.setenv('DK_OPS_LOCAL_FORWARD', 'implicit_gemm')


# The wide-channel problems (many K steps, 72 input channels) in float64 only, as in
# test_op_cuda_emulated.py: the reference is slow there, and float32 runs the same code.
@pytest.mark.parametrize('problem,dtype', [
    pytest.param(problem, dtype, id=f'{problem.name}-{dtype}')
    for problem in PROBLEMS + DCN_PROBLEMS + TILE_PROBLEMS if runs_local_path(problem)
    for dtype in (torch.float64, torch.float32)
] + [pytest.param(problem, torch.float64, id=f'{problem.name}-torch.float64')
     for problem in CUDA_PROBLEMS if runs_local_path(problem)])
def test_forward_matches_reference(problem, dtype, implicit_gemm):
    assert_implicit_gemm_matches_reference(problem, dtype)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name(TILE_PROBLEMS[:2])
def test_reduced_precision_forward_close_to_reference(problem, dtype, implicit_gemm):
    # Tiles and sums in float32, so the output is the reference on the rounded inputs up to the
    # output's own rounding (and products summed in another order).
    tensors = problem.make_inputs(dtype)
    output, ranges = profiled_forward(problem, tensors)
    assert ranges == {IMPLICIT_GEMM: 1, SCOPE_COLUMNS: 0} and output.dtype == dtype
    as_float64 = {name: None if t is None else t.double() for name, t in tensors.items()}
    expected = problem.call(deform_kernel_conv2d_reference, as_float64)
    scale = expected.abs().max().item()
    unit_roundoff = torch.finfo(dtype).eps / 2
    torch.testing.assert_close(output.double(), expected, rtol=2 * unit_roundoff,
                               atol=2 * unit_roundoff * scale)


@pytest.mark.parametrize('columns_per_chunk', [37, 200])
@by_name(TILE_PROBLEMS[:1])
def test_column_chunks_start_inside_tiles(problem, columns_per_chunk, implicit_gemm, monkeypatch):
    # The kernel takes every column in one launch unless the column budget asks for chunks;
    # chunks of 37 columns start inside tiles, image rows and images.
    column_bytes = problem.in_channels * problem.scope_size[0] * problem.scope_size[1] * 8
    monkeypatch.setenv('DK_OPS_MAX_COLUMN_BYTES', str(columns_per_chunk * column_bytes))
    columns = problem.batch * problem.output_size[0] * problem.output_size[1]
    assert_implicit_gemm_matches_reference(problem, torch.float64,
                                           launches=-(-columns // columns_per_chunk))


@pytest.mark.parametrize('value', [None, '', 'columns'])
@by_name(TILE_PROBLEMS[:1])
def test_columns_path_unless_asked(problem, value, monkeypatch):
    if value is None:
        monkeypatch.delenv('DK_OPS_LOCAL_FORWARD', raising=False)
    else:
        monkeypatch.setenv('DK_OPS_LOCAL_FORWARD', value)
    _, ranges = profiled_forward(problem, problem.make_inputs())
    assert ranges == {IMPLICIT_GEMM: 0, SCOPE_COLUMNS: 1}


@by_name(TILE_PROBLEMS[:1])
def test_cpu_kernels_keep_the_columns_path(problem, implicit_gemm):
    # The CPU kernels have no implicit GEMM: the request leaves them as they are.
    tensors = problem.make_inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    ranges = collections.Counter(event.name for event in profile.events())
    assert ranges[IMPLICIT_GEMM] == 0 and ranges[SCOPE_COLUMNS] == 1
    torch.testing.assert_close(output, problem.call(deform_kernel_conv2d_reference, tensors),
                               **TOLERANCE[torch.float64])


@pytest.mark.parametrize('value', ['implicit-gemm', 'IMPLICIT_GEMM', 'cudnn'])
def test_unknown_local_forward_is_refused(value, monkeypatch):
    monkeypatch.setenv('DK_OPS_LOCAL_FORWARD', value)
    problem = TILE_PROBLEMS[0]
    with pytest.raises(ValueError, match=f"DK_OPS_LOCAL_FORWARD must be 'columns' or "
                       f"'implicit_gemm' \\(or unset\\), got '{value}'"):
        problem.call(dk_ops.deform_kernel_conv2d, problem.make_inputs())


# ----------------------------------------------------------------------------- the emulation
# The kernel above needs __syncthreads: its tests fail when one is left out. These run the
# emulation's own kernels (dk_ops/csrc/host_cuda/deform_kernel_conv2d_host_cuda.cpp), 2 blocks
# of 64 threads each.
def test_syncthreads_orders_shared_memory():
    # Each thread reads, through shared memory, the index its neighbour in the block wrote.
    out = torch.ops.dk_ops_host_cuda.emulation_self_test('rotate_through_shared')
    index = torch.arange(128).view(2, 64)
    assert out.tolist() == (index.roll(-1, dims=1)).flatten().float().tolist()


@pytest.mark.parametrize('kernel,message', [
    ('barrier_after_early_exit',
     'host emulation: 1 threads of block 0 ended while 63 wait at __syncthreads'),
    ('shuffle_against_barrier',
     'host emulation: no thread of block 0 can go on: 48 wait at __syncthreads'),
])
def test_barriers_that_cannot_be_passed_raise(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dk_ops_host_cuda.emulation_self_test(kernel)
