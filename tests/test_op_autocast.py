"""``dk_ops.deform_kernel_conv2d`` under ``torch.autocast('cpu')``: like ``conv2d``, the op
runs in the autocast dtype (bfloat16 by default) whatever mix of float32 and autocast-dtype
tensors it gets, leaves float64 alone, and a DK layer after a conv trains under autocast, as
mmengine's AmpOptimWrapper runs it on a CPU. The CUDA autocast kernel is tested in
test_op_cuda.py."""
import functools

import pytest
import torch
from torch import nn

import dk_ops
from dk_reference import (by_name, deform_kernel_conv2d_reference, output_and_gradients,
                          problems_named)


def cast_to(dtype, tensors):
    return {name: None if t is None else t.to(dtype) for name, t in tensors.items()}


def autocast_bfloat16():
    return torch.autocast('cpu', dtype=torch.bfloat16)


def test_autocast_kernels_are_registered_for_cpu_and_cuda():
    # Both in every build: the file compiles without CUDA and each key only sees its device.
    for key in ('AutocastCPU', 'AutocastCUDA'):
        assert torch._C._dispatch_has_kernel_for_dispatch_key('dk_ops::deform_kernel_conv2d',
                                                              key), key


@by_name(problems_named('k3_scope4_local', 'global', 'data_offset_mask_dgroups2_groups2'))
def test_float32_runs_in_bfloat16_with_float32_gradients(problem):
    exact = problem.make_inputs(torch.float64)
    # The backward too runs inside the autocast region, as autograd then runs it with autocast
    # on: the global path's ATen GEMMs must still sum in float32.
    with autocast_bfloat16():
        output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d,
                                                 cast_to(torch.float32, exact))
    assert output.dtype == torch.bfloat16
    # The same as casting every tensor to bfloat16 by hand, gradients included (the float32
    # leaves get the bfloat16 gradients of the op, cast up).
    by_hand, by_hand_gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d,
                                                      cast_to(torch.bfloat16, exact))
    torch.testing.assert_close(output, by_hand, rtol=0, atol=0)
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.float32, name
        torch.testing.assert_close(gradient, by_hand_gradients[name].float(), rtol=0, atol=0,
                                   msg=lambda message, name=name: f'{name}: {message}')
    # And close to the float64 op at bfloat16's precision (about 3 significant digits, lost
    # in the inputs' rounding and in the output's).
    expected = problem.call(deform_kernel_conv2d_reference, exact)
    scale = expected.abs().max().item()
    torch.testing.assert_close(output.double(), expected, rtol=3e-2, atol=3e-2 * scale)


@by_name(problems_named('data_offset_mask_dgroups2_groups2'))
def test_float32_input_with_bfloat16_offsets_is_unified(problem):
    # Under autocast the offsets come from a conv (bfloat16) while the input may be float32.
    tensors = problem.make_inputs(torch.float32)
    for name in ('kernel_offset', 'data_offset', 'mask'):
        tensors[name] = tensors[name].bfloat16()
    with pytest.raises(TypeError, match='kernel_offset has dtype'):
        problem.call(dk_ops.deform_kernel_conv2d, tensors)
    with autocast_bfloat16():
        output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    by_hand = problem.call(dk_ops.deform_kernel_conv2d, cast_to(torch.bfloat16, tensors))
    torch.testing.assert_close(output, by_hand, rtol=0, atol=0)


@by_name(problems_named('data_offset_mask_dgroups2_groups2'))
def test_float64_is_left_alone(problem):
    tensors = problem.make_inputs(torch.float64)
    with autocast_bfloat16():
        output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, problem.call(dk_ops.deform_kernel_conv2d, tensors),
                               rtol=0, atol=0)


MODULES = {
    'local': dk_ops.DeformKernel2d,
    'global': dk_ops.GlobalDeformKernel2d,
    'dk_dcn_modulated': functools.partial(dk_ops.DeformKernelConv2d, modulated=True),
}


@pytest.mark.parametrize('kind', MODULES)
def test_layer_after_a_conv_trains_a_step(kind):
    # The conv's output is bfloat16 under autocast, the DK layer's parameters float32.
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                            MODULES[kind](4, 6, 3, padding=1, kernel_offset_groups=2))
    images = torch.randn(2, 3, 8, 7)

    def loss_and_gradients(autocast):
        network.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            output = network(images)
        loss = output.float().square().mean()
        loss.backward()
        return output.dtype, loss, {name: p.grad for name, p in network.named_parameters()}

    float32_dtype, float32_loss, float32_gradients = loss_and_gradients(autocast=False)
    output_dtype, loss, gradients = loss_and_gradients(autocast=True)
    assert (float32_dtype, output_dtype) == (torch.float32, torch.bfloat16)
    torch.testing.assert_close(loss, float32_loss, rtol=3e-2, atol=0)
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.float32, name
        # Every parameter, the zero-initialised offset generators' included, gets the float32
        # gradient up to bfloat16's precision.
        scale = float32_gradients[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(gradient, float32_gradients[name], rtol=5e-2,
                                   atol=5e-2 * scale,
                                   msg=lambda message, name=name: f'{name}: {message}')
    before = [p.detach().clone() for p in network.parameters()]
    torch.optim.SGD(network.parameters(), lr=0.1).step()
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert all(not torch.equal(p, b) for p, b in zip(network.parameters(), before))
