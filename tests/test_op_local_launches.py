"""A local DK layer's training step (forward + backward) on a GPU is a fixed number of kernel
launches, whatever the batch.

Counted through the emulated CUDA build (emulated_cuda.py), which runs the CUDA build's driver
and launchers on a CPU: its launch helper counts the dk_ops kernels, and a dispatch mode under
the launchers counts the ATen ops that do work, each at least one launch on a GPU. At the
ResNet-50 c3 shape the emulated kernels would run for hours, so they are counted and skipped,
and so are the GEMMs: what is launched depends on the shapes only, not on the values."""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dk_ops
from emulated_cuda import EMULATED_OPS, EmulatedCudaKernels, ieee_float32_gemms

# ResNet-50's c3 3x3 convolution on an 800 x 800 image: 128 channels, 100 x 100.
CHANNELS, SIZE = 128, 100
ALLOCATIONS = {'aten.empty.memory_format', 'aten.empty_like.default',
               'aten.empty_strided.default'}
# Scope 4 of a 3x3 kernel: the columns in 2 chunks, 4 dk_ops kernels a chunk (the forward's and
# the backward's scope columns, the input gradient, the kernel offset gradient), 3 GEMMs a chunk
# and 14 layout copies and zero fills: 28.
MOST_LAUNCHES = 30


def storages(value):
    tensors = value if isinstance(value, (tuple, list)) else [value]
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


class WorkingAtenOps(TorchDispatchMode):
    """Counts, by name, the ATen ops that do work: those that write a tensor they are given
    (in-place and out= ops) and those that return a new tensor other than an allocation; an
    op that returns its input or a view of it (a reshape, a contiguous() of a contiguous
    tensor) does none. The GEMMs are counted and left uncomputed: they return `out` or their
    first argument as it was."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name == 'aten.mm.out':
            result = kwargs['out']
        elif name == 'aten.addmm_.default':
            result = args[0]
        else:
            result = func(*args, **kwargs)
        writes_an_argument = func._schema.is_mutable
        new_tensor = not storages(result) <= storages(list(args) + list(kwargs.values()))
        if writes_an_argument or (new_tensor and name not in ALLOCATIONS):
            self.counts[name] += 1
        return result


def launches_of_a_training_step(batch):
    """(dk_ops kernel launches, ATen ops that do work by name) of one forward + backward."""
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(batch, CHANNELS, SIZE, SIZE, generator=generator, requires_grad=True)
    weight = torch.randn(CHANNELS, CHANNELS, 4, 4, generator=generator, requires_grad=True)
    kernel_offset = torch.rand(batch, 18, SIZE, SIZE, generator=generator, requires_grad=True)
    aten_ops = WorkingAtenOps()
    before = EMULATED_OPS.launch_count()
    EMULATED_OPS.run_launches(False)
    try:
        with EmulatedCudaKernels(inside=aten_ops):
            output = dk_ops.deform_kernel_conv2d(input, weight, kernel_offset, kernel_size=3,
                                                 padding=1)
            output.backward(torch.ones_like(output))
    finally:
        EMULATED_OPS.run_launches(True)
    return EMULATED_OPS.launch_count() - before, aten_ops.counts


def test_launches_do_not_grow_with_the_batch(monkeypatch):
    monkeypatch.delenv('DK_OPS_MAX_COLUMN_BYTES', raising=False)
    # The emulated TF32 rounds the GEMMs' operands with ATen ops that a GPU does not run.
    with ieee_float32_gemms():
        counts = {batch: launches_of_a_training_step(batch) for batch in (2, 16)}
    assert counts[16] == counts[2], counts
    kernel_launches, aten_ops = counts[16]
    assert aten_ops['aten.mm.out'] + aten_ops['aten.addmm_.default'] == 2 * 3, aten_ops
    assert kernel_launches == 2 * 4
    assert kernel_launches + sum(aten_ops.values()) <= MOST_LAUNCHES, aten_ops


def test_skipped_launches_are_counted_and_then_run_again():
    before = EMULATED_OPS.launch_count()
    EMULATED_OPS.run_launches(False)
    try:
        skipped = EMULATED_OPS.emulation_self_test('rotate_through_shared')
    finally:
        EMULATED_OPS.run_launches(True)
    ran = EMULATED_OPS.emulation_self_test('rotate_through_shared')
    assert EMULATED_OPS.launch_count() - before == 2
    assert not skipped.any()  # its zeros, as allocated
    thread = torch.arange(ran.numel())
    assert torch.equal(ran, ((thread % 64 + 1) % 64 + thread // 64 * 64).float())
