"""The global-offset fast path of ``dk_ops.deform_kernel_conv2d`` is a handful of launches, whatever
the batch and the groups.

On a GPU every ATen op is at least one kernel launch, and at detection shapes the global path
is launch-bound. Its forward samples every image's kernel in one dk_ops kernel and runs the
batch as one grouped convolution; its backward is that convolution's backward and one dk_ops
kernel each for the weight's and the offsets' gradients. Counted here on the CPU kernels, which
run the same driver code as the CUDA ones: the ATen ops that do work are the convolution, its
backward and the bias's repeat; the rest are allocations and views. The CPU kernels convolve
image by image where the batch has an image for every thread, so the counts are taken with more
threads than images, where they run the GPU's grouped convolution."""
import collections
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dk_ops
from dk_reference import by_name, problems_named

# The ATen ops of forward + backward that launch work on a GPU, each once.
WORKING_OPS = {'aten.convolution.default', 'aten.convolution_backward.default',
               'aten.repeat.default'}
ALLOCATIONS_AND_VIEWS = {'aten.empty.memory_format', 'aten.empty_like.default',
                         'aten.reshape.default', 'aten.view.default', 'aten.view_as.default',
                         'aten.contiguous.default'}
# Every op, allocations and views included: 15 at most in the cases below, whatever the batch.
MOST_OPS = 16


class AtenOpsOfDkOps(TorchDispatchMode):
    """Counts, by name, the ATen ops that the kernels of the ``torch.ops.dk_ops`` ops called
    under it dispatch.

    A mode is off while its own handler runs, so it never sees the ops a kernel calls: each
    dk_ops op goes straight to its CPU kernel under a second mode that records them."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != 'dk_ops':
            return func(*args, **kwargs)
        with _Recorder(self.counts):
            return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args,
                                   **kwargs)


class _Recorder(TorchDispatchMode):

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def aten_ops_of_forward_and_backward(problem):
    tensors = problem.make_inputs(torch.float32)
    leaves = [t.requires_grad_() for t in tensors.values() if t is not None]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(problem.batch + 1)
    try:
        with AtenOpsOfDkOps() as counter:
            output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
            torch.autograd.grad(output.sum(), leaves)
    finally:
        torch.set_num_threads(previous_threads)
    return counter.counts


@by_name(problems_named('global', 'global_scope5_groups2_kgroups2', 'global_depthwise_kgroups2'))
def test_global_path_is_a_handful_of_launches(problem):
    counts = {batch: aten_ops_of_forward_and_backward(dataclasses.replace(problem, batch=batch))
              for batch in (1, 2, 8)}
    for batch in (2, 8):
        assert counts[batch] == counts[1], (f'batch {batch} against batch 1: '
                                            f'{counts[batch] - counts[1]} more, '
                                            f'{counts[1] - counts[batch]} fewer')
    working = {op: n for op, n in counts[1].items() if op not in ALLOCATIONS_AND_VIEWS}
    assert working == dict.fromkeys(WORKING_OPS, 1), counts[1]
    assert sum(counts[1].values()) <= MOST_OPS, counts[1]
