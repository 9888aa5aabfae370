"""The direct depthwise path of ``dk_ops.deform_kernel_conv2d`` (groups == C_in == C_out): its
output and every gradient against the float64 reference over kernel sizes 1 to 7, scopes K+1
and K+2, strides, dilations, kernel offset groups 1, C/4 and C, data offsets and masks, on the
CPU kernels and on the CUDA kernels emulated on the CPU (half and bfloat16 there too); that the
op picks it by itself; layouts, an empty batch, the thread count, opcheck and torch.compile."""
import contextlib
import dataclasses

import pytest
import torch

import dk_ops
from determinism import deterministic_algorithms
from dk_reference import (Problem, by_name, deform_kernel_conv2d_reference, non_contiguous,
                          output_and_gradients)
from emulated_cuda import EmulatedCudaKernels, emulated_output_and_gradients
from emulated_cuda import assert_matches_reference as assert_emulated_matches_reference
from op_arguments import backward_op_args, forward_op_args
from op_comparison import (TOLERANCE, assert_gradients_close,
                           assert_reduced_precision_close_to_float32)

CHANNELS = 8


def depthwise(name, kernel, scope, **geometry):
    """A depthwise problem of CHANNELS channels, padded to keep the size, with a kernel offset
    set for every two channels unless told otherwise."""
    geometry = dict(dict(kernel_offset_groups=CHANNELS // 4, padding=(kernel // 2, kernel // 2),
                         input_size=(9, 8), kernel_size=(kernel, kernel),
                         scope_size=(scope, scope)), **geometry)
    return Problem(name, in_channels=CHANNELS, out_channels=CHANNELS, groups=CHANNELS,
                   **geometry)


DEPTHWISE_PROBLEMS = [
    # every kernel size, odd and even, each with scope K+1 or K+2 and a kernel offset set for
    # all channels, for every two, or for each
    depthwise(f'k{kernel}_scope{kernel + extra}_kgroups{groups}', kernel, kernel + extra,
              kernel_offset_groups=groups)
    for kernel in range(1, 8)
    for extra, groups in ([(1, 1), (2, CHANNELS)] if kernel % 2 else [(2, 1), (1, CHANNELS // 4)])
] + [
    depthwise('k3_scope4_stride2', 3, 4, stride=(2, 2)),
    depthwise('k3_scope5_dilation2', 3, 5, dilation=(2, 2), padding=(2, 2)),
    depthwise('k5_scope6_stride2_dilation2', 5, 6, stride=(2, 2), dilation=(2, 2), padding=(4, 3),
              input_size=(11, 10)),
    depthwise('k3x2_scope4x5_stride2x1', 3, 4, kernel_size=(3, 2), scope_size=(4, 5),
              stride=(2, 1), padding=(1, 0)),
    # DK + DCN: data offsets and masks, deform groups that cut the kernel offset groups
    depthwise('k3_scope4_dcn_dgroups4', 3, 4, data_offset=True, deform_groups=4),
    depthwise('k5_scope6_dcn_mask_kgroups8', 5, 6, data_offset=True, mask=True,
              kernel_offset_groups=CHANNELS),
    depthwise('k3_scope5_mask_dgroups2_stride2', 3, 5, mask=True, deform_groups=2, stride=(2, 2)),
    # global kernel offsets with a mask go the local way, broadcast to every location
    depthwise('k3_scope4_global_mask', 3, 4, global_offset=True, mask=True),
]

def strided(name, tensor):
    """non_contiguous's layouts, and a transposed weight: a depthwise weight (C, 1, S_h, S_w) is
    contiguous also in channels-last."""
    if name == 'weight':
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    return non_contiguous(name, tensor)


PROFILER_RANGES = ('dk_ops::depthwise_forward', 'dk_ops::depthwise_backward',
                   'dk_ops::scatter_scope_columns')


def assert_matches_reference(problem, tensors, **kwargs):
    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                             **kwargs)
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     tensors, **kwargs)
    tolerance = TOLERANCE[tensors['input'].dtype]
    assert output.dtype == tensors['input'].dtype
    torch.testing.assert_close(output.double(), expected_output, **tolerance)
    assert_gradients_close(gradients, expected, **tolerance)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(DEPTHWISE_PROBLEMS)
def test_output_and_gradients_match_reference(problem, dtype):
    assert_matches_reference(problem, problem.make_inputs(dtype))


@by_name([problem for problem in DEPTHWISE_PROBLEMS
          if problem.name in ('k3_scope4_kgroups1', 'k3_scope5_kgroups8',
                              'k5_scope6_dcn_mask_kgroups8')])
def test_non_contiguous_and_channels_last_inputs(problem):
    assert_matches_reference(problem, problem.make_inputs(), view=strided)


# One kernel offset set per channel: the CPU samples each scope point from the 4 x 4 scope cells
# around its tap's rigid point where they hold its four cells, and exactly otherwise. Offsets of
# up to 3.5 cells send points beyond that window and beyond the scope; scope K+1 puts the rigid
# points between cells and K+2 on them, so the window's reach differs.
PER_CHANNEL_FAR = [
    dataclasses.replace(depthwise(f'k{kernel}_scope{scope}_kgroups8_far', kernel, scope,
                                  kernel_offset_groups=CHANNELS), kernel_offset_range=3.5)
    for kernel, scope in ((3, 4), (3, 5), (5, 6))
]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(PER_CHANNEL_FAR)
def test_per_channel_offsets_beyond_the_window_match_reference(problem, dtype):
    assert_matches_reference(problem, problem.make_inputs(dtype))


@by_name(PER_CHANNEL_FAR)
def test_per_channel_points_on_cell_edges_match_one_shared_set(problem):
    """Offsets in half cells put every scope point on a cell edge or a cell centre, among them
    the window's borders and the scope's (-1 and S), where the bilinear gradient has a kink:
    there the reference's autograd picks its own side, so the per-channel kernels are held to
    the shared-offset kernels' rule instead (a point on an edge takes the cell below or to its
    right as top-left), given the same offsets for every channel."""
    shared = dataclasses.replace(problem, kernel_offset_groups=1)
    tensors = shared.make_inputs()
    tensors['kernel_offset'] = (tensors['kernel_offset'] * 2).round() / 2
    per_channel = dict(tensors, kernel_offset=tensors['kernel_offset'].repeat(1, CHANNELS, 1, 1))
    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, per_channel)
    expected_output, expected = output_and_gradients(shared, dk_ops.deform_kernel_conv2d, tensors)
    batch, _, out_h, out_w = output.shape
    gradients['kernel_offset'] = gradients['kernel_offset'].view(
        batch, CHANNELS, -1, out_h, out_w).sum(1)
    torch.testing.assert_close(output, expected_output, **TOLERANCE[torch.float64])
    assert_gradients_close(gradients, expected, **TOLERANCE[torch.float64])


def ranges_run(problem, tensors):
    """The names of the op's profiler ranges that one forward and backward ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    return {event.name for event in profile.events()} & set(PROFILER_RANGES)


@by_name([DEPTHWISE_PROBLEMS[0], DEPTHWISE_PROBLEMS[-1]])
def test_the_op_picks_the_depthwise_path_by_itself(problem, monkeypatch):
    tensors = problem.make_inputs(torch.float32)
    monkeypatch.delenv('DK_OPS_LOCAL_KERNELS', raising=False)
    assert ranges_run(problem, tensors) == {'dk_ops::depthwise_forward',
                                            'dk_ops::depthwise_backward'}
    # The scope columns where asked for, and where the conv is not depthwise.
    monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', 'columns')
    assert ranges_run(problem, tensors) == {'dk_ops::scatter_scope_columns'}
    monkeypatch.delenv('DK_OPS_LOCAL_KERNELS')
    grouped = dataclasses.replace(problem, groups=CHANNELS // 2)
    assert ranges_run(grouped, grouped.make_inputs(torch.float32)) == {
        'dk_ops::scatter_scope_columns'}


def test_an_empty_batch_gives_the_bias_and_zero_gradients():
    problem = dataclasses.replace(DEPTHWISE_PROBLEMS[0], batch=0)
    assert_matches_reference(problem, problem.make_inputs())


@by_name([problem for problem in DEPTHWISE_PROBLEMS
          if problem.name in ('k3_scope4_stride2', 'k3_scope5_kgroups8', 'k3_scope4_dcn_dgroups4')])
def test_results_do_not_depend_on_the_thread_count(problem):
    tensors = problem.make_inputs(torch.float32)
    threads = torch.get_num_threads()
    results = []
    for count in (1, 3):
        torch.set_num_threads(count)
        try:
            results.append(output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors))
        finally:
            torch.set_num_threads(threads)
    (output_1, gradients_1), (output_3, gradients_3) = results
    assert torch.equal(output_1, output_3)
    assert all(torch.equal(gradients_1[name], gradients_3[name]) for name in gradients_1)


OPCHECK_PROBLEMS = [problem for problem in DEPTHWISE_PROBLEMS
                    if problem.name in ('k3_scope4_kgroups1', 'k3_scope5_kgroups8',
                                        'k5_scope6_dcn_mask_kgroups8')]


@pytest.mark.parametrize('layout', [lambda name, t: t, strided], ids=['contiguous', 'strided'])
@by_name(OPCHECK_PROBLEMS)
def test_opcheck(problem, layout):
    tensors = {name: None if t is None else layout(name, t)
               for name, t in problem.make_inputs(torch.float32).items()}
    leaves = {name: None if t is None else t.detach().requires_grad_()
              for name, t in tensors.items()}
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d.default,
                          forward_op_args(problem, leaves))
    grad_output = layout('grad_output', torch.randn(problem.batch, problem.out_channels,
                                                    *problem.output_size))
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d_backward.default,
                          backward_op_args(problem, tensors, grad_output, [True] * 5))


@pytest.mark.filterwarnings('ignore:dynamo_pgo force disabled')
@by_name(OPCHECK_PROBLEMS)
def test_torch_compile_fullgraph_matches_eager(problem):
    tensors = problem.make_inputs(torch.float32)
    compiled = torch.compile(dk_ops.deform_kernel_conv2d, fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):
        output, gradients = output_and_gradients(problem, compiled, tensors)
    expected_output, expected = output_and_gradients(problem, dk_ops.deform_kernel_conv2d,
                                                     tensors)
    torch.testing.assert_close(output, expected_output)
    assert_gradients_close(gradients, expected, rtol=1.3e-6, atol=1e-5)


# ----------------------------------------------------------------------------- emulated CUDA
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(DEPTHWISE_PROBLEMS)
def test_cuda_kernels_match_reference(problem, dtype):
    assert_emulated_matches_reference(problem, problem.make_inputs(dtype), TOLERANCE[dtype])


def test_cuda_kernels_run_the_depthwise_path():
    problem = DEPTHWISE_PROBLEMS[0]
    with EmulatedCudaKernels():
        assert ranges_run(problem, problem.make_inputs(torch.float32)) == {
            'dk_ops::depthwise_forward', 'dk_ops::depthwise_backward'}


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name([problem for problem in DEPTHWISE_PROBLEMS
          if problem.name in ('k3_scope4_kgroups1', 'k3_scope5_kgroups8',
                              'k5_scope6_dcn_mask_kgroups8')])
def test_cuda_kernels_in_reduced_precision_close_to_float32(problem, dtype):
    with EmulatedCudaKernels() as emulated:
        assert_reduced_precision_close_to_float32(problem, dtype, view=lambda name, t: t)
    assert emulated.calls == {'deform_kernel_conv2d': 2, 'deform_kernel_conv2d_backward': 2}


def with_non_finite_offsets(tensors):
    """The tensors with NaN, +-inf and a huge value among the kernel and data offsets, and the
    same tensors with those offsets at 1e6, where the reference samples nothing either (the op
    puts a tap with a non-finite offset outside, contributing zero)."""
    marked, outside = dict(tensors), dict(tensors)
    for name in ('kernel_offset', 'data_offset'):
        if tensors[name] is not None:
            flat = tensors[name].clone().view(-1)
            flat[0::7], flat[1::11], flat[2::13], flat[3::17] = (
                float('nan'), float('inf'), -float('inf'), 1e30)
            marked[name] = flat.view(tensors[name].shape)
            outside[name] = torch.where(marked[name].isfinite() & (marked[name].abs() < 1e6),
                                        marked[name], torch.full_like(marked[name], 1e6))
    return marked, outside


@pytest.mark.parametrize('kernels', ['cpu', 'emulated_cuda'])
@by_name([problem for problem in DEPTHWISE_PROBLEMS
          if problem.name in ('k3_scope4_kgroups1', 'k3_scope5_kgroups8',
                              'k5_scope6_dcn_mask_kgroups8')])
def test_non_finite_offsets_sample_nothing(problem, kernels):
    marked, outside = with_non_finite_offsets(problem.make_inputs())
    wrt = ['input', 'weight'] + [name for name in ('mask', 'bias') if marked[name] is not None]
    with EmulatedCudaKernels() if kernels == 'emulated_cuda' else contextlib.nullcontext():
        output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, marked,
                                                 wrt=wrt)
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     outside, wrt=wrt)
    assert output.isfinite().all()
    torch.testing.assert_close(output, expected_output, **TOLERANCE[torch.float64])
    assert_gradients_close(gradients, expected, **TOLERANCE[torch.float64])


def test_cuda_data_offset_input_gradient_is_refused_in_deterministic_mode():
    # The depthwise input gradient is added with atomics where there are data offsets, and
    # gathered without them on a rigid grid.
    deformed = next(problem for problem in DEPTHWISE_PROBLEMS
                    if problem.name == 'k3_scope4_dcn_dgroups4')
    rigid = DEPTHWISE_PROBLEMS[0]
    with deterministic_algorithms():
        with pytest.raises(RuntimeError, match='does not have a deterministic implementation'):
            emulated_output_and_gradients(deformed, deformed.make_inputs())
        emulated_output_and_gradients(deformed, deformed.make_inputs(),
                                      wrt=['weight', 'kernel_offset', 'data_offset', 'bias'])
        emulated_output_and_gradients(rigid, rigid.make_inputs())
