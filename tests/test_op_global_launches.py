"""The global-offset fast path of ``dk_ops.deform_kernel_conv2d`` dispatches a number of ATen
ops that does not depend on the batch size (issue 15).

On a GPU every ATen op is at least one kernel launch, and at detection shapes the global path
is launch-bound: its forward folds the batch into the groups of one convolution, and its
backward must take the batch in whole-batch GEMMs too, not image by image. Counted here on the
CPU kernels, which run the same driver code as the CUDA ones."""
import collections
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dk_ops
from test_op_backward import by_name, problems_named

# Forward + backward of one scope block (groups = kernel_offset_groups = 1) dispatched 237 ATen
# ops, views included, when this test was written (the per-image backward: 360 at batch 1, 437
# at batch 8); each further block adds about 22. The bound leaves room for a few more ops, not
# for a loop over anything.
MOST_OPS_ONE_BLOCK = 250


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
    with AtenOpsOfDkOps() as counter:
        output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
        torch.autograd.grad(output.sum(), leaves)
    return counter.counts


@by_name(problems_named('global', 'global_scope5_groups2_kgroups2'))
def test_global_path_ops_do_not_grow_with_the_batch(problem):
    counts = {batch: aten_ops_of_forward_and_backward(dataclasses.replace(problem, batch=batch))
              for batch in (1, 2, 8)}
    assert counts[1]['aten.convolution.default'] == 1, 'not the global path'
    for batch in (2, 8):
        assert counts[batch] == counts[1], (f'batch {batch} against batch 1: '
                                            f'{counts[batch] - counts[1]} more, '
                                            f'{counts[1] - counts[batch]} fewer')
    if problem.groups == problem.kernel_offset_groups == 1:
        assert sum(counts[1].values()) <= MOST_OPS_ONE_BLOCK, counts[1]
