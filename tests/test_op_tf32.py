"""The float32 GEMMs of local DK on CUDA follow the TF32 switch of cuDNN's convolutions
(``torch.backends.cudnn.allow_tf32``, or ``torch.backends.cudnn.conv.fp32_precision``), not the
matmul one: DK stands in for a convolution.

Checked without a GPU through the emulated CUDA build (emulated_cuda.py), whose products round
their operands to TF32 (10-bit mantissa) where the switch asks for it, as tensor cores do. The
inputs make the scope columns Z exact in TF32: input values are multiples of 1/4 and the kernel
offsets multiples of 1/2, so every bilinear weight is 1, 1/2 or 1/4 and Z has at most 8
significant bits. Then only the weight and the output gradient are rounded, and the TF32 result
is the float64 reference evaluated at the weight and output gradient rounded to TF32."""
import dataclasses

import pytest
import torch

import dk_ops
from dk_reference import deform_kernel_conv2d_reference, problems_named
from emulated_cuda import EmulatedCudaKernels

PROBLEM = dataclasses.replace(problems_named('k3_scope4_local')[0], in_channels=8,
                              out_channels=6, bias=False)
# Float32 sums of exact products: far below the TF32 rounding of one operand (2**-11 relative).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def to_tf32(x):
    """x (float32) rounded to TF32's 10-bit mantissa, to nearest, ties to even."""
    bits = x.view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def exact_in_tf32_inputs():
    generator = torch.Generator().manual_seed(0)
    out_h, out_w = PROBLEM.output_size
    return dict(
        input=torch.randint(-8, 9, (PROBLEM.batch, PROBLEM.in_channels, *PROBLEM.input_size),
                            generator=generator).float() / 4,
        weight=torch.randn((PROBLEM.out_channels, PROBLEM.in_channels, *PROBLEM.scope_size),
                           generator=generator),
        kernel_offset=torch.randint(-2, 3, (PROBLEM.batch, 2 * PROBLEM.taps, out_h, out_w),
                                    generator=generator).float() / 2,
        grad_output=torch.randn((PROBLEM.batch, PROBLEM.out_channels, out_h, out_w),
                                generator=generator))


def output_and_gradients(function, tensors):
    """function's output and the input's and weight's gradients for tensors['grad_output']."""
    input = tensors['input'].clone().requires_grad_()
    weight = tensors['weight'].clone().requires_grad_()
    output = function(input, weight, tensors['kernel_offset'], None, data_offset=None, mask=None,
                      **PROBLEM.geometry())
    output.backward(tensors['grad_output'].to(output.dtype))
    return {'output': output.detach(), 'input': input.grad, 'weight': weight.grad}


def emulated(tensors):
    with EmulatedCudaKernels() as kernels:
        result = output_and_gradients(dk_ops.deform_kernel_conv2d, tensors)
    assert kernels.calls == {'deform_kernel_conv2d': 1, 'deform_kernel_conv2d_backward': 1}
    return result


def reference(tensors, tf32):
    """The float64 reference; with tf32, at the weight and output gradient rounded to TF32."""
    if tf32:
        tensors = dict(tensors, weight=to_tf32(tensors['weight']),
                       grad_output=to_tf32(tensors['grad_output']))
    return output_and_gradients(deform_kernel_conv2d_reference,
                                {name: t.double() for name, t in tensors.items()})


def assert_results_close(actual, expected):
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name], **TOLERANCE,
                                   msg=lambda message, name=name: f'{name}: {message}')


@pytest.fixture
def tf32_switches():
    """Sets the switches by name (see below); they are all as they were after the test."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    # What every legacy and per-operation switch is read from.
    saved = [(cudnn, 'fp32_precision'), (cudnn.conv, 'fp32_precision'),
             (cudnn.rnn, 'fp32_precision'), (matmul, 'fp32_precision')]
    saved = [(module, name, getattr(module, name)) for module, name in saved]
    legacy_allow_tf32 = cudnn.allow_tf32
    matmul_precision = torch.get_float32_matmul_precision()

    def set_switches(switch, tf32):
        if switch == 'allow_tf32':
            cudnn.allow_tf32 = tf32
        else:  # the per-operation switch, against that of cuDNN's RNNs
            cudnn.conv.fp32_precision = 'tf32' if tf32 else 'ieee'
            cudnn.rnn.fp32_precision = 'ieee' if tf32 else 'tf32'
        # The matmul switch says the opposite, and is not the one followed.
        matmul.fp32_precision = 'ieee' if tf32 else 'tf32'

    yield set_switches
    # The legacy flag first: it keeps a state of its own, and restoring only the per-operation
    # switches leaves torch seeing both APIs mixed, so that the next read of
    # cudnn.allow_tf32 (torch.export's, for one) raises.
    cudnn.allow_tf32 = legacy_allow_tf32
    for module, name, value in saved:
        setattr(module, name, value)
    torch.set_float32_matmul_precision(matmul_precision)


def test_the_inputs_tell_tf32_from_float32():
    tensors = exact_in_tf32_inputs()
    assert torch.equal(tensors['input'], to_tf32(tensors['input']))
    plain, tf32 = reference(tensors, tf32=False), reference(tensors, tf32=True)
    for name in plain:
        difference = (plain[name] - tf32[name]).abs().max().item()
        assert difference > 20 * TOLERANCE['atol'], (name, difference)


@pytest.mark.parametrize('switch', ['allow_tf32', 'conv.fp32_precision'])
@pytest.mark.parametrize('tf32', [True, False], ids=['tf32', 'ieee'])
def test_products_follow_the_convolutions_switch(switch, tf32, tf32_switches):
    tf32_switches(switch, tf32)
    tensors = exact_in_tf32_inputs()
    assert_results_close(emulated(tensors), reference(tensors, tf32=tf32))
