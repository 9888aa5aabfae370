"""How the op tests compare ``dk_ops.deform_kernel_conv2d`` with its truth: the tolerances of
float64 and float32, gradients by name, half and bfloat16 against float32, and offsets kept off
the kinks of bilinear sampling."""
import torch

import dk_ops
from dk_reference import output_and_gradients

TOLERANCE = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
}


def assert_gradients_close(actual, expected, **tolerance):
    """The same gradients by name, compared in float64 on the CPU, wherever each was computed."""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None, f'no gradient for {name}'
        torch.testing.assert_close(actual[name].double().cpu(), expected[name].double().cpu(),
                                   **tolerance, msg=lambda message, name=name: f'{name}: {message}')


def off_the_kinks(offset):
    """bfloat16 rounds some random offsets to multiples of 0.5, which put their sampling
    points on integers (tap positions are multiples of 0.5), where bilinear sampling
    has a kink and two valid one-sided derivatives: move those offsets off it."""
    on_kink = (offset.double() * 2).frac() == 0
    return torch.where(on_kink, offset + 0.125, offset)


# Each sum runs in float32; what separates the result from float32 on the same rounded inputs
# is the rounding of the scope columns, their gradient and the GEMM outputs to the dtype
# (unit roundoff 2**-11 for float16, 2**-8 for bfloat16), relative to the largest value.
REDUCED_PRECISION_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_reduced_precision_close_to_float32(problem, dtype, view,
                                              function=dk_ops.deform_kernel_conv2d):
    """The output and gradients of ``function`` (the op by default) in ``dtype`` against float32
    on the same rounded inputs, with ``view(name, tensor)`` putting each tensor where the
    kernels run."""
    tensors = {name: None if t is None else view(name, t)
               for name, t in problem.make_inputs(dtype).items()}
    for name in ('kernel_offset', 'data_offset'):  # rounding may put points on the kinks
        if tensors[name] is not None:
            tensors[name] = off_the_kinks(tensors[name])
    output, gradients = output_and_gradients(problem, function, tensors, view=view)
    as_float32 = {name: None if t is None else t.float() for name, t in tensors.items()}

    def rounded_grad_output(name, tensor):  # float32 sees the same rounded grad_output too
        return view(name, tensor.to(dtype).float() if name == 'grad_output' else tensor)

    expected_output, expected = output_and_gradients(problem, function, as_float32,
                                                     view=rounded_grad_output)
    assert output.dtype == dtype and all(g.dtype == dtype for g in gradients.values())
    tolerance = REDUCED_PRECISION_TOLERANCE[dtype]
    for name, actual, wanted in [('output', output, expected_output)] + [
            (name, gradients[name], expected[name]) for name in expected]:
        scale = wanted.abs().max().item()
        torch.testing.assert_close(actual.float(), wanted, rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda message, name=name: f'{name}: {message}')
