"""Sizes that can be zero: ``dk_ops.deform_kernel_conv2d`` works where F.conv2d's formula does
and raises a clear ValueError where F.conv2d refuses the input.

Without input channels the sum over channels and taps has no terms: the output is the bias
(zeros without one), the bias gradient the sum of the output gradient, and every other gradient
zero, of its argument's shape. Checked against the float64 reference on the CPU kernels (through
autograd) and on the CUDA kernels executed on a CPU (their forward and backward ops), with each
strategy the driver could pick. The errors for zero sizes F.conv2d refuses (no output channels,
an image without pixels) are in test_op_errors.py; the modules' and the fake kernel's are here.
"""
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dk_ops
import dk_ops._C_emulated_cuda  # noqa: F401  (registers torch.ops.dk_ops_emulated_cuda)
from dk_reference import Problem, by_name, deform_kernel_conv2d_reference, output_and_gradients

# No input channels on every path: local and global kernel offsets (the latter the global path's
# problem without data offsets), data offsets with a mask, groups, offset groups, no bias, and
# the 1 x 0 x 6 x 6 input with a 4-channel 4 x 4 scope of a 3 x 3 kernel that once killed the
# process (SIGFPE).
NO_INPUT_CHANNEL_PROBLEMS = [
    Problem('in0_local', batch=1, in_channels=0, input_size=(6, 6), padding=(0, 0)),
    Problem('in0_no_bias', in_channels=0, bias=False),
    Problem('in0_global', in_channels=0, global_offset=True),
    Problem('in0_global_data_offset_mask', in_channels=0, global_offset=True, data_offset=True,
            mask=True),
    Problem('in0_groups2_kgroups2_dgroups2_dcn_mask', in_channels=0, groups=2,
            kernel_offset_groups=2, deform_groups=2, data_offset=True, mask=True),
]


def assert_bias_only(problem, output, gradients, tensors):
    """The output and gradients against the reference, and what the reference must give."""
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     tensors)
    torch.testing.assert_close(output.double(), expected_output)
    bias = tensors['bias'] if problem.bias else torch.zeros(problem.out_channels)
    assert torch.equal(expected_output, bias.double()[None, :, None, None].expand_as(output))
    for name, gradient in gradients.items():
        assert gradient.shape == tensors[name].shape, name
        assert gradient.dtype == tensors[name].dtype, name
        torch.testing.assert_close(gradient, expected[name].to(gradient.dtype),
                                   msg=lambda message, name=name: f'{name}: {message}')
        if name != 'bias':
            assert not gradient.any(), name


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16], ids=str)
@by_name(NO_INPUT_CHANNEL_PROBLEMS)
def test_no_input_channels_give_the_bias_on_the_cpu(problem, dtype):
    tensors = problem.make_inputs(dtype)
    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    assert output.dtype == dtype
    assert_bias_only(problem, output, gradients, tensors)


def emulated_cuda_output_and_gradients(problem, tensors):
    """The output and the gradients of every tensor from the CUDA kernels' forward and backward
    ops, for the grad_output ``output_and_gradients`` uses; the bias's is the sum of it."""
    geometry = [list(problem.kernel_size), list(problem.stride), list(problem.padding),
                list(problem.dilation), problem.groups, problem.kernel_offset_groups,
                problem.deform_groups]
    ops = torch.ops.dk_ops_emulated_cuda
    output = ops.deform_kernel_conv2d(tensors['input'], tensors['weight'], tensors['kernel_offset'],
                                      tensors['data_offset'], tensors['mask'], tensors['bias'],
                                      *geometry)
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    grad_output = grad_output.to(output.dtype)
    names = ('input', 'weight', 'kernel_offset', 'data_offset', 'mask')
    grads = ops.deform_kernel_conv2d_backward(grad_output, *(tensors[name] for name in names[:5]),
                                              *geometry, [True] * 5)
    gradients = {name: grad for name, grad in zip(names, grads) if tensors[name] is not None}
    if problem.bias:
        gradients['bias'] = grad_output.sum((0, 2, 3))
    return output, gradients


@pytest.mark.parametrize('local_kernels', ['columns', 'implicit_gemm'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16], ids=str)
@by_name(NO_INPUT_CHANNEL_PROBLEMS)
def test_no_input_channels_give_the_bias_on_the_emulated_cuda_kernels(problem, dtype,
                                                                      local_kernels, monkeypatch):
    monkeypatch.setenv('DK_OPS_LOCAL_KERNELS', local_kernels)
    tensors = problem.make_inputs(dtype)
    output, gradients = emulated_cuda_output_and_gradients(problem, tensors)
    assert output.dtype == dtype
    assert_bias_only(problem, output, gradients, tensors)


@pytest.mark.parametrize('problem', [
    Problem('batch0_in0', batch=0, in_channels=0),
    Problem('batch0_in0_global', batch=0, in_channels=0, global_offset=True),
], ids=lambda problem: problem.name)
def test_no_images_and_no_input_channels(problem):
    tensors = problem.make_inputs()
    output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    assert output.shape == (0, problem.out_channels, *problem.output_size)
    for name, gradient in gradients.items():
        assert gradient.shape == tensors[name].shape and not gradient.any(), name


# ----------------------------------------------------------------------------- fake kernel
def test_zero_stride_raises_a_value_error_in_the_fake_kernel():
    # torch.compile traces the op with its fake kernel, which divides by the stride.
    problem = Problem('base')
    with FakeTensorMode() as mode:
        tensors = {name: None if t is None else mode.from_tensor(t)
                   for name, t in problem.make_inputs().items()}
        with pytest.raises(ValueError, match=r'stride[\s\S]*\[1, 0\]'):
            dataclasses.replace(problem, stride=(1, 0)).call(dk_ops.deform_kernel_conv2d,
                                                             tensors)


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize('module', [dk_ops.DeformKernel2d, dk_ops.GlobalDeformKernel2d,
                                    dk_ops.DeformKernelConv2d], ids=lambda m: m.__name__)
@pytest.mark.parametrize('argument,value', [
    ('in_channels', 0), ('out_channels', 0), ('groups', 0), ('groups', -2),
    ('kernel_offset_groups', 0),
])
def test_module_refuses_zero_channels_and_groups(module, argument, value):
    arguments = dict(in_channels=4, out_channels=4, kernel_size=3, groups=1,
                     kernel_offset_groups=1)
    arguments[argument] = value
    with pytest.raises(ValueError, match=rf'{argument}[\s\S]*{value}'):
        module(**arguments)


def test_module_refuses_zero_deform_groups():
    with pytest.raises(ValueError, match=r'deform_groups[\s\S]*0'):
        dk_ops.DeformKernelConv2d(4, 4, 3, deform_groups=0)
