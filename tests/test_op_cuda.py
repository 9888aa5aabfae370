"""The CUDA kernels of ``dk_ops.deform_kernel_conv2d``: parity with the CPU op (which the
other op tests hold to the float64 reference) in float64, gradcheck, half and bfloat16
against float32, opcheck, ``torch.compile``, autocast and deterministic mode.

Every test needs a CUDA GPU; without one the module is skipped, saying so."""
import dataclasses

import pytest
import torch

import dk_ops
from determinism import deterministic_algorithms
from dk_reference import (CUDA_PROBLEMS, PROBLEMS, REDUCED_PRECISION_PROBLEMS, by_name,
                          non_contiguous, output_and_gradients, problems_named)
from op_arguments import TENSOR_ARGUMENTS, backward_op_args, forward_op_args
from op_comparison import assert_gradients_close, assert_reduced_precision_close_to_float32

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason='no CUDA GPU on this machine: the CUDA kernels are only compiled here (make cuda-check)')

CUDA = torch.device('cuda')


def to_cuda(name, tensor):
    return tensor.to(CUDA)


def cuda_inputs(problem, dtype=torch.float32):
    return {name: None if t is None else t.to(CUDA)
            for name, t in problem.make_inputs(dtype).items()}


# ----------------------------------------------------------------------------- parity with CPU
# The same float64 math summed in another order.
FLOAT64_PARITY = dict(rtol=1e-9, atol=1e-9)


@by_name(PROBLEMS + CUDA_PROBLEMS)
def test_float64_matches_cpu(problem):
    tensors = problem.make_inputs()
    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                             view=to_cuda)
    expected_output, expected = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    assert output.device.type == 'cuda'
    torch.testing.assert_close(output.cpu(), expected_output, **FLOAT64_PARITY)
    assert_gradients_close(gradients, expected, **FLOAT64_PARITY)


@by_name(problems_named('wide_k3_scope4', 'wide_scope5_groups2_kgroups2_dgroups3_dcn_mask',
                        'wide_k3x2_scope6x5_stride2_dil2_mask', 'wide_global_dcn_mask'))
@pytest.mark.parametrize('columns_per_chunk', [1, 7])
def test_chunked_float64_matches_cpu(problem, columns_per_chunk, monkeypatch):
    # Chunks that end inside image rows: the rigid-grid input gradient then gathers each
    # pixel from several chunks.
    tensors = problem.make_inputs()
    _, expected = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    column_bytes = problem.in_channels * problem.scope_size[0] * problem.scope_size[1] * 8
    monkeypatch.setenv('DK_OPS_MAX_COLUMN_BYTES', str(columns_per_chunk * column_bytes))
    _, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                        view=to_cuda)
    assert_gradients_close(gradients, expected, **FLOAT64_PARITY)


IMPLICIT_GEMM_PROBLEMS = problems_named(
    'k3_scope4_local', 'data_offset_mask_dgroups2_groups2', 'wide_k3_scope4',
    'wide_scope5_groups2_kgroups2_dgroups3_dcn_mask', 'wide_k3x2_scope6x5_stride2_dil2_mask')


def implicit_gemm_output_and_gradients(problem, tensors, monkeypatch):
    """The op's output and gradients on CUDA with the opt-in implicit GEMMs
    (DK_OPS_LOCAL_KERNELS=implicit_gemm), checking that they ran in place of the scope
    columns."""
    monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', 'implicit_gemm')
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                                 view=to_cuda)
    ranges = {event.name for event in profile.events()}
    assert {'dk_ops::implicit_gemm_forward', 'dk_ops::implicit_gemm_weight_grad'} <= ranges
    assert 'dk_ops::scatter_scope_columns' not in ranges
    assert output.device.type == 'cuda'
    return output, gradients


@by_name(IMPLICIT_GEMM_PROBLEMS)
def test_implicit_gemm_float64_matches_cpu(problem, monkeypatch):
    # The forward and the weight gradient by the implicit GEMMs, the other gradients through
    # grad Z; the CPU op has no implicit GEMM. tools/gpu_check.sh runs the wide problems under
    # memcheck too.
    tensors = problem.make_inputs()
    expected_output, expected = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    output, gradients = implicit_gemm_output_and_gradients(problem, tensors, monkeypatch)
    torch.testing.assert_close(output.cpu(), expected_output, **FLOAT64_PARITY)
    assert_gradients_close(gradients, expected, **FLOAT64_PARITY)


@by_name(IMPLICIT_GEMM_PROBLEMS[2:3])
def test_implicit_gemm_is_deterministic(problem, monkeypatch):
    # The weight gradient's column ranges are added up in a fixed order, without atomics.
    tensors = cuda_inputs(problem, torch.float32)
    with deterministic_algorithms():
        first_output, first = implicit_gemm_output_and_gradients(problem, tensors, monkeypatch)
        second_output, second = implicit_gemm_output_and_gradients(problem, tensors, monkeypatch)
    assert torch.equal(first_output, second_output)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@by_name(problems_named('k3_scope4_local', 'global', 'data_offset_mask_dgroups2_groups2',
                        'global_data_offset_mask_dgroups2'))
def test_non_contiguous_cuda_inputs(problem):
    tensors = problem.make_inputs()

    def scrambled_on_cuda(name, tensor):
        return non_contiguous(name, tensor.to(CUDA))

    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                             view=scrambled_on_cuda)
    expected_output, expected = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    torch.testing.assert_close(output.cpu(), expected_output, **FLOAT64_PARITY)
    assert_gradients_close(gradients, expected, **FLOAT64_PARITY)


@by_name(problems_named('data_offset_mask_dgroups2_groups2', 'global_data_offset_mask_dgroups2'))
def test_empty_batch_on_cuda(problem):
    problem = dataclasses.replace(problem, batch=0)
    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d,
                                             problem.make_inputs(), view=to_cuda)
    assert output.shape == (0, problem.out_channels, *problem.output_size)
    assert all(gradient is not None and not gradient.any() for gradient in gradients.values())


def test_mixed_devices_are_refused():
    problem = problems_named('k3_scope4_local')[0]
    tensors = cuda_inputs(problem)
    tensors['weight'] = tensors['weight'].cpu()
    with pytest.raises(ValueError, match='weight is on cpu but input is on cuda'):
        problem.call(dk_ops.deform_kernel_conv2d, tensors)


# ----------------------------------------------------------------------------- gradcheck
@by_name(problems_named('k3x2_scope5x4_stride2x1_dil1x2', 'depthwise', 'mask_only',
                        'data_offset_mask_dgroups2_groups2', 'global_scope5_groups2_kgroups2',
                        'global_data_offset_mask_dgroups2'))
def test_gradcheck_on_cuda(problem):
    tensors = cuda_inputs(problem, torch.float64)
    names = [name for name in TENSOR_ARGUMENTS if tensors[name] is not None]

    def op(*values):
        return problem.call(dk_ops.deform_kernel_conv2d, dict(tensors, **dict(zip(names, values))))

    leaves = [tensors[name].requires_grad_() for name in names]
    # With data offsets the input gradient is summed with atomics (see the determinism tests
    # below), so two backward passes may differ by float64 rounding in the order of the adds.
    nondet_tol = 1e-10 if problem.data_offset else 0.0
    assert torch.autograd.gradcheck(op, leaves, fast_mode=True, nondet_tol=nondet_tol)


# ----------------------------------------------------------------------------- half, bfloat16
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name(REDUCED_PRECISION_PROBLEMS)
def test_reduced_precision_close_to_float32(problem, dtype):
    assert_reduced_precision_close_to_float32(problem, dtype, view=to_cuda)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name(problems_named('data_offset_mask_dgroups2_groups2', 'wide_k3_scope4'))
def test_implicit_gemm_reduced_precision_close_to_float32(problem, dtype, monkeypatch):
    # The implicit GEMMs keep Z in float32 where the columns path rounds it to the dtype: the
    # same tolerance holds.
    monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', 'implicit_gemm')
    assert_reduced_precision_close_to_float32(problem, dtype, view=to_cuda)


# ----------------------------------------------------------------------------- registration
@pytest.mark.parametrize('requires_grad', [False, True], ids=['no_grad', 'requires_grad'])
@by_name(problems_named('k3x2_scope5x4_stride2x1_dil1x2', 'global',
                        'data_offset_mask_dgroups2_groups2'))
def test_opcheck_forward_on_cuda(problem, requires_grad):
    tensors = cuda_inputs(problem)
    for tensor in tensors.values():
        if tensor is not None:
            tensor.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d.default,
                          forward_op_args(problem, tensors))


@pytest.mark.parametrize('output_mask', [[True] * 5, [False, True, False, True, False]], ids=str)
@by_name(problems_named('global', 'data_offset_mask_dgroups2_groups2'))
def test_opcheck_backward_on_cuda(problem, output_mask):
    tensors = cuda_inputs(problem)
    grad_output = torch.randn(problem.batch, problem.out_channels, *problem.output_size,
                              device=CUDA)
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d_backward.default,
                          backward_op_args(problem, tensors, grad_output, output_mask))


def deform_kernel_then_sigmoid(*args, **kwargs):
    return dk_ops.deform_kernel_conv2d(*args, **kwargs).sigmoid()


@by_name(problems_named('data_offset_mask_dgroups2_groups2', 'global_data_offset_mask_dgroups2'))
def test_torch_compile_fullgraph_on_cuda(problem):
    tensors = cuda_inputs(problem)
    compiled = torch.compile(deform_kernel_then_sigmoid, fullgraph=True)
    output, gradients = output_and_gradients(problem, compiled, tensors, view=to_cuda)
    expected_output, expected = output_and_gradients(problem, deform_kernel_then_sigmoid, tensors,
                                                     view=to_cuda)
    torch.testing.assert_close(output, expected_output)
    # float32, and the data offsets' input gradient adds with atomics in no fixed order.
    assert_gradients_close(gradients, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize('autocast_dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name(problems_named('k3_scope4_local', 'global', 'data_offset_mask_dgroups2_groups2'))
def test_autocast_runs_in_the_autocast_dtype(problem, autocast_dtype):
    # Like conv2d: float32 tensors are cast to the autocast dtype and the op runs in it; the
    # float32 leaves get float32 gradients, those of the op cast up.
    tensors = cuda_inputs(problem, torch.float32)
    leaves = {name: t.requires_grad_() for name, t in tensors.items() if t is not None}
    with torch.autocast('cuda', dtype=autocast_dtype):
        output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    grad_output = torch.randn_like(output)
    output.backward(grad_output)

    cast = {name: None if t is None else t.detach().to(autocast_dtype).requires_grad_()
            for name, t in tensors.items()}
    expected_output = problem.call(dk_ops.deform_kernel_conv2d, cast)
    expected_output.backward(grad_output)
    assert output.dtype == autocast_dtype
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.float32, name
        # Equal up to the order of the atomic adds of the data offsets' input gradient.
        torch.testing.assert_close(leaf.grad, cast[name].grad.float(), rtol=1e-3,
                                   atol=1e-3 * cast[name].grad.abs().max().item(),
                                   msg=lambda message, name=name: f'{name}: {message}')


def test_autocast_unifies_float32_input_with_half_offsets():
    # In an --amp model the offsets come from a conv (float16) while the input may be float32.
    problem = problems_named('data_offset_mask_dgroups2_groups2')[0]
    tensors = cuda_inputs(problem, torch.float32)
    for name in ('kernel_offset', 'data_offset', 'mask'):
        tensors[name] = tensors[name].half()
    with pytest.raises(TypeError, match='kernel_offset has dtype'):
        problem.call(dk_ops.deform_kernel_conv2d, tensors)
    with torch.autocast('cuda', dtype=torch.float16):
        output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    half = {name: None if t is None else t.half() for name, t in tensors.items()}
    torch.testing.assert_close(output, problem.call(dk_ops.deform_kernel_conv2d, half),
                               rtol=0, atol=0)


def test_autocast_leaves_float64_alone():
    problem = problems_named('data_offset_mask_dgroups2_groups2')[0]
    tensors = cuda_inputs(problem, torch.float64)
    with torch.autocast('cuda', dtype=torch.float16):
        output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, problem.call(dk_ops.deform_kernel_conv2d, tensors),
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- determinism
@by_name(problems_named('k3_scope4_local', 'mask_only', 'wide_k3x2_scope6x5_stride2_dil2_mask'))
def test_rigid_grid_is_deterministic(problem):
    # Without data offsets every kernel has one writer per value, so deterministic mode
    # allows the op and two runs agree bit for bit.
    tensors = cuda_inputs(problem, torch.float32)
    with deterministic_algorithms():
        first_output, first = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                                   view=to_cuda)
        second_output, second = output_and_gradients(problem, dk_ops.deform_kernel_conv2d,
                                                     tensors, view=to_cuda)
    assert torch.equal(first_output, second_output)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_data_offset_input_gradient_is_not_deterministic():
    # With data offsets the input gradient adds with atomics: deterministic mode refuses
    # the backward (or warns with warn_only), as PyTorch's own ops do.
    problem = problems_named('data_offset_mask_dgroups2_groups2')[0]
    tensors = cuda_inputs(problem, torch.float32)
    message = 'dk_ops::deform_kernel_conv2d_backward does not have a deterministic implementation'
    with deterministic_algorithms():
        with pytest.raises(RuntimeError, match=message):
            output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors, view=to_cuda)
        # Gradients of everything but the input need no atomics.
        wrt = [name for name in TENSOR_ARGUMENTS if tensors[name] is not None and name != 'input']
        output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors, view=to_cuda, wrt=wrt)
    with deterministic_algorithms(warn_only=True):
        with pytest.warns(UserWarning, match=message):
            output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors, view=to_cuda)
