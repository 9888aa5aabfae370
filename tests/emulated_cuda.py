"""The CUDA kernels of ``dk_ops.deform_kernel_conv2d`` executed on a CPU, for the tests.

The emulated CUDA extension imported below is the GPU's kernel source
(dk_ops/csrc/cuda/deform_kernel_conv2d_cuda.cu) compiled for host threads: every thread of each
launch runs, with the lanes of a warp in lock-step at their shuffles, the threads of a block in
another order from launch to launch, and shared memory NaN when a block starts
(dk_ops/csrc/emulated_cuda/emulated_cuda.h). It registers its launchers, the emulation's own test
kernels and its schedule's test hook as the ops of ``EMULATED_OPS``."""
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dk_ops
import dk_ops._C_emulated_cuda  # noqa: F401  (registers the ops below)
from dk_reference import deform_kernel_conv2d_reference, output_and_gradients
from op_comparison import assert_gradients_close

EMULATED_OPS = torch.ops.dk_ops_emulated_cuda

# The orders in which the threads of a block can take their turns between barriers; 'rotate',
# the default, takes them in turn, launch after launch.
THREAD_ORDERS = ('forward', 'reversed', 'random')


@contextlib.contextmanager
def emulation_schedule(thread_order, seed=0, max_blocks=0):
    """The emulated launches under it run the threads of each block in ``thread_order`` (one of
    ``THREAD_ORDERS`` or 'rotate'; the random orders drawn from ``seed``) and at most
    ``max_blocks`` blocks each (0: every block they ask for), so that every thread goes round
    its grid-stride loop several times."""
    previous = EMULATED_OPS.emulation_schedule()
    EMULATED_OPS.set_emulation_schedule(thread_order, seed, max_blocks)
    try:
        yield
    finally:
        EMULATED_OPS.set_emulation_schedule(*previous)


class EmulatedCudaKernels(TorchDispatchMode):
    """Runs the ``torch.ops.dk_ops`` ops called under it on the emulated CUDA launchers of
    ``EMULATED_OPS`` instead of the CPU kernels, and counts them; under the mode ``inside`` if
    given, which then sees the ATen ops those launchers call (a mode is off while its own
    handler runs, and so are those below it)."""

    def __init__(self, inside=None):
        super().__init__()
        self.calls = collections.Counter()
        self.inside = inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != 'dk_ops':
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        emulated = getattr(EMULATED_OPS, name).default
        if self.inside is None:
            return emulated(*args, **(kwargs or {}))
        with self.inside:  # straight to the kernel, so that `inside` sees what it calls
            return emulated.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args,
                                       **(kwargs or {}))


@contextlib.contextmanager
def ieee_float32_gemms():
    """The driver's float32 GEMMs in full float32 under it. They follow the TF32 switch of
    cuDNN's convolutions, on by default, as on a GPU; emulated, TF32 rounds their operands
    (tests/test_op_tf32.py), which float32's tolerance against the reference does not allow."""
    convolutions = torch.backends.cudnn.conv
    saved, convolutions.fp32_precision = convolutions.fp32_precision, 'ieee'
    try:
        yield
    finally:
        convolutions.fp32_precision = saved


def emulated_output_and_gradients(problem, tensors, **kwargs):
    """``output_and_gradients`` of the op, its forward and backward run by the CUDA kernels
    with float32 GEMMs."""
    with EmulatedCudaKernels() as emulated, ieee_float32_gemms():
        result = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors, **kwargs)
    assert emulated.calls == {'deform_kernel_conv2d': 1, 'deform_kernel_conv2d_backward': 1}
    return result


def assert_matches_reference(problem, tensors, tolerance, **kwargs):
    """The op's output and gradients by the emulated CUDA kernels against the float64
    reference."""
    output, gradients = emulated_output_and_gradients(problem, tensors, **kwargs)
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     tensors, **kwargs)
    assert output.dtype == tensors['input'].dtype
    torch.testing.assert_close(output.double(), expected_output, **tolerance)
    assert_gradients_close(gradients, expected, **tolerance)
