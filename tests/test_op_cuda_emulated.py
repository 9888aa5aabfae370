"""The CUDA kernels of ``dk_ops.deform_kernel_conv2d`` executed on a CPU (emulated_cuda.py),
against the float64 reference over the op tests' problem matrix.

The op runs as users call it, through ``dk_ops.deform_kernel_conv2d``, its autograd formula and
the shared driver; only the forward and backward ops, below autograd, are sent to the emulated
CUDA launchers."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dk_ops
from determinism import deterministic_algorithms
from dk_reference import (CHUNK_BOUNDARY_PROBLEMS, CUDA_PROBLEMS, DCN_PROBLEMS, PROBLEMS,
                          REDUCED_PRECISION_PROBLEMS, by_name, deform_kernel_conv2d_reference,
                          output_and_gradients, problems_named)
from emulated_cuda import (EmulatedCudaKernels, assert_matches_reference,
                           emulated_output_and_gradients)
from op_arguments import TENSOR_ARGUMENTS
from op_comparison import (TOLERANCE, assert_gradients_close,
                           assert_reduced_precision_close_to_float32)


# PROBLEMS has every feature of the op at 4 channels (its global problems without data offsets
# or mask run the driver's global path, which calls no column kernel); CUDA_PROBLEMS the work
# split of the kernels: offset groups of more channels than a warp has lanes, scopes of two
# passes of the scope-column kernel. These in float64 only: the reference is slow at 40-72
# channels, and float32 runs the same code as on PROBLEMS.
@pytest.mark.parametrize('problem,dtype', [
    pytest.param(problem, dtype, id=f'{problem.name}-{dtype}')
    for problem in PROBLEMS for dtype in (torch.float64, torch.float32)
] + [pytest.param(problem, torch.float64, id=f'{problem.name}-torch.float64')
     for problem in CUDA_PROBLEMS])
def test_output_and_gradients_match_reference(problem, dtype):
    assert_matches_reference(problem, problem.make_inputs(dtype), TOLERANCE[dtype])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(DCN_PROBLEMS)
def test_deformable_convolutions_match_reference(problem, dtype):
    # Their zero kernel offsets put every scope sample on a kink of bilinear sampling, where
    # the kernel offset gradient is either one-sided derivative: not compared (nor by
    # test_op_backward.py).
    tensors = problem.make_inputs(dtype)
    wrt = [name for name in TENSOR_ARGUMENTS
           if tensors[name] is not None and name != 'kernel_offset']
    assert_matches_reference(problem, tensors, TOLERANCE[dtype], wrt=wrt)


@pytest.mark.parametrize('columns_per_chunk', [1, 7])
@by_name(CHUNK_BOUNDARY_PROBLEMS + problems_named('wide_k3x2_scope6x5_stride2_dil2_mask'))
def test_column_chunks_match_reference(problem, columns_per_chunk, monkeypatch):
    # Chunks that end inside image rows and images: the rigid-grid input gradient then gathers
    # each pixel from the columns of several chunks, and skips those of the other chunks.
    column_bytes = problem.in_channels * problem.scope_size[0] * problem.scope_size[1] * 8
    monkeypatch.setenv('DK_OPS_MAX_COLUMN_BYTES', str(columns_per_chunk * column_bytes))
    assert_matches_reference(problem, problem.make_inputs(), TOLERANCE[torch.float64])


@by_name(problems_named('data_offset_mask_dgroups2_groups2', 'global_data_offset_mask_dgroups2',
                        'wide_scope5_groups2_kgroups2_dgroups3_dcn_mask'))
def test_gradient_of_one_argument_alone(problem):
    # The backward op then gets an output_mask asking for that gradient only, and the
    # launchers hand the kernels null pointers for the others.
    tensors = problem.make_inputs()
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, tensors)
    for name in expected:
        _, gradient = emulated_output_and_gradients(problem, tensors, wrt=[name])
        assert_gradients_close(gradient, {name: expected[name]}, **TOLERANCE[torch.float64])


@by_name(problems_named('data_offset_mask_dgroups2_groups2', 'global_data_offset_mask_dgroups2'))
def test_empty_batch(problem):
    problem = dataclasses.replace(problem, batch=0)
    tensors = problem.make_inputs()
    output, gradients = emulated_output_and_gradients(problem, tensors)
    assert output.shape == (0, problem.out_channels, *problem.output_size)
    for name, gradient in gradients.items():
        assert gradient is not None and gradient.shape == tensors[name].shape, name
        assert not gradient.any(), name


class ProductOperandDtypes(TorchDispatchMode):
    """The dtypes of the operands of every matrix product and convolution run under it."""

    PRODUCTS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.convolution,
                torch.ops.aten.convolution_backward)

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.PRODUCTS:
            self.dtypes |= {arg.dtype for arg in args if isinstance(arg, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name(REDUCED_PRECISION_PROBLEMS)
def test_reduced_precision_close_to_float32(problem, dtype):
    # The kernels' half and bfloat16 instances and the driver's float32 sums around them: the
    # CUDA kernels take these dtypes (the CPU kernels get float32 copies), so the products
    # around them run in the dtype too.
    products = ProductOperandDtypes()
    with EmulatedCudaKernels(inside=products):
        output_and_gradients(problem, dk_ops.deform_kernel_conv2d, problem.make_inputs(dtype))
    assert products.dtypes == {dtype}
    with EmulatedCudaKernels() as emulated:
        assert_reduced_precision_close_to_float32(problem, dtype, view=lambda name, t: t)
    assert emulated.calls == {'deform_kernel_conv2d': 2, 'deform_kernel_conv2d_backward': 2}


def test_data_offset_input_gradient_is_refused_in_deterministic_mode():
    # The CUDA launcher adds the input gradient with atomics when there are data offsets, and
    # says so to deterministic mode; the other gradients need no atomics.
    problem = problems_named('data_offset_mask_dgroups2_groups2')[0]
    tensors = problem.make_inputs()
    with deterministic_algorithms():
        with pytest.raises(RuntimeError, match='does not have a deterministic implementation'):
            emulated_output_and_gradients(problem, tensors)
        emulated_output_and_gradients(
            problem, tensors, wrt=[name for name in TENSOR_ARGUMENTS if name != 'input'])
