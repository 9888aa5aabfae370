"""The names of the op's tensor arguments, and the argument lists of its registered forward
and backward ops (``torch.ops.dk_ops``), for the tests that call them below autograd."""
TENSOR_ARGUMENTS = ('input', 'weight', 'kernel_offset', 'data_offset', 'mask', 'bias')


def forward_op_args(problem, tensors):
    return (tensors['input'], tensors['weight'], tensors['kernel_offset'],
            tensors['data_offset'], tensors['mask'], tensors['bias'], list(problem.kernel_size),
            list(problem.stride), list(problem.padding), list(problem.dilation), problem.groups,
            problem.kernel_offset_groups, problem.deform_groups)


def backward_op_args(problem, tensors, grad_output, output_mask):
    return (grad_output, tensors['input'], tensors['weight'], tensors['kernel_offset'],
            tensors['data_offset'], tensors['mask'], list(problem.kernel_size),
            list(problem.stride), list(problem.padding), list(problem.dilation), problem.groups,
            problem.kernel_offset_groups, problem.deform_groups, output_mask)
