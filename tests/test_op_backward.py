"""Gradients of ``dk_ops.deform_kernel_conv2d`` (finite differences, autograd through the
reference, mmcv's deformable convolutions), the explicit backward op, the refused double
backward, and the op's registration: ``torch.library.opcheck`` and
``torch.compile(fullgraph=True)``."""
import dataclasses

import pytest
import torch

import dk_ops
from dk_reference import (CHUNK_BOUNDARY_PROBLEMS, DCN_PROBLEMS, PROBLEMS, Problem, by_name,
                          deform_kernel_conv2d_reference, mmcv_deformable_conv, non_contiguous,
                          output_and_gradients, problems_named)
from op_arguments import TENSOR_ARGUMENTS, backward_op_args, forward_op_args
from op_comparison import TOLERANCE, assert_gradients_close, off_the_kinks


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(PROBLEMS)
def test_gradients_match_reference(problem, dtype):
    tensors = problem.make_inputs(dtype)
    _, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, tensors)
    assert all(gradients[name].dtype == dtype for name in gradients)
    assert_gradients_close(gradients, expected, **TOLERANCE[dtype])


@by_name(
    problems_named('k3x2_scope5x4_stride2x1_dil1x2', 'groups2_kgroups4', 'depthwise', 'mask_only',
                   'data_offset_mask_dgroups2_groups2', 'global_scope5_groups2_kgroups2',
                   'global_data_offset_mask_dgroups2'))
def test_gradcheck(problem):
    # Random offsets keep every sampling point off the integer kinks of bilinear sampling.
    tensors = problem.make_inputs()
    names = [name for name in TENSOR_ARGUMENTS if tensors[name] is not None]

    def op(*values):
        return problem.call(dk_ops.deform_kernel_conv2d, dict(tensors, **dict(zip(names, values))))

    leaves = [tensors[name].requires_grad_() for name in names]
    assert torch.autograd.gradcheck(op, leaves, fast_mode=True)


@by_name(problems_named('data_offset_mask_dgroups2_groups2', 'global_data_offset_mask_dgroups2'))
def test_gradient_of_one_argument_alone(problem):
    # Autograd then asks the backward op for that gradient only (output_mask).
    tensors = problem.make_inputs()
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, tensors)
    for name in expected:
        _, gradient = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                           wrt=[name])
        assert_gradients_close(gradient, {name: expected[name]})


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(DCN_PROBLEMS)
def test_data_offset_gradients_match_mmcv(problem, dtype):
    tensors = problem.make_inputs(dtype)
    wrt = [name for name in TENSOR_ARGUMENTS  # mmcv has no kernel offsets
           if tensors[name] is not None and name != 'kernel_offset']
    _, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors, wrt=wrt)
    _, expected = output_and_gradients(problem, mmcv_deformable_conv, tensors, wrt=wrt)
    assert_gradients_close(gradients, expected, **TOLERANCE[dtype])


@by_name([problem for problem in PROBLEMS if problem.global_offset])
def test_global_offset_gradients_equal_broadcast_local(problem):
    tensors = problem.make_inputs()

    def broadcast(name, tensor):
        if name != 'kernel_offset':
            return tensor
        return tensor[:, :, None, None].expand(-1, -1, *problem.output_size).contiguous()

    _, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    _, expected = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                       view=broadcast)
    assert_gradients_close(gradients, expected)


@by_name(problems_named('k3_scope4_local', 'global', 'data_offset_mask_dgroups2_groups2',
                        'global_data_offset_mask_dgroups2'))
def test_non_contiguous_gradients(problem):
    tensors = problem.make_inputs()
    _, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors,
                                        view=non_contiguous)
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, tensors)
    assert_gradients_close(gradients, expected)


@by_name(problems_named('data_offset_mask_dgroups2_groups2', 'global_data_offset_mask_dgroups2'))
def test_empty_batch_gradients(problem):
    problem = dataclasses.replace(problem, batch=0)
    tensors = problem.make_inputs()
    _, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    for name, gradient in gradients.items():
        assert gradient is not None, f'no gradient for {name}'
        assert gradient.shape == tensors[name].shape, name
        assert not gradient.any(), name


@pytest.mark.parametrize('columns_per_chunk', [1, 7])
@by_name(CHUNK_BOUNDARY_PROBLEMS)
def test_small_column_chunks_give_the_same_gradients(problem, columns_per_chunk, monkeypatch):
    # Chunks that end inside image rows and images: on a rigid grid the input gradient of
    # one pixel then sums columns of several chunks.
    tensors = problem.make_inputs()
    monkeypatch.delenv('DK_OPS_MAX_COLUMN_BYTES', raising=False)
    _, default = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    column_bytes = problem.in_channels * problem.scope_size[0] * problem.scope_size[1] * 8
    monkeypatch.setenv('DK_OPS_MAX_COLUMN_BYTES', str(columns_per_chunk * column_bytes))
    _, chunked = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    assert_gradients_close(chunked, default)


@pytest.mark.parametrize('threads', [1, 4])
@by_name([
    dataclasses.replace(problem, batch=2, in_channels=8, out_channels=8, input_size=(21, 17))
    for problem in problems_named('k3_scope4_local', 'data_offset_mask_dgroups2_groups2')
])
def test_threads_compute_the_reference(problem, threads):
    # The CPU passes split columns, or for the rigid input gradient strips of 8 input pixels,
    # between threads (at::parallel_for): enough of both here (2 x 21 x 17 columns, 3 strips
    # a row) that several threads get some, against the 1-thread run as well.
    tensors = problem.make_inputs(torch.float64)
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     tensors)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(output, expected_output, **TOLERANCE[torch.float64])
    assert_gradients_close(gradients, expected, **TOLERANCE[torch.float64])


@by_name(problems_named('k3_scope4_local', 'global', 'data_offset_mask_dgroups2_groups2',
                        'global_data_offset_mask_dgroups2'))
def test_bfloat16_gradients_close_to_reference(problem):
    tensors = problem.make_inputs(torch.bfloat16)
    for name in ('kernel_offset', 'data_offset'):
        if tensors[name] is not None:
            tensors[name] = off_the_kinks(tensors[name])
    _, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    # The reference sees the same bfloat16-rounded values, in float64.
    rounded = {name: None if t is None else t.double() for name, t in tensors.items()}
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, rounded)
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.bfloat16, name
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(gradient.double(), expected[name], rtol=5e-2,
                                   atol=5e-2 * scale, msg=lambda m, name=name: f'{name}: {m}')


# The global fast path sums the weight gradient over images, and the kernel-offset gradient over
# the scope blocks of a kernel offset group (one per channel when depthwise). Same-signed
# terms (positive input, all-ones output gradient) make a bfloat16 running sum drift. Only
# CUDA runs the path in bfloat16 (the CPU computes in float32 throughout); its arithmetic
# emulated on a CPU, against the largest gradient: bfloat16 sums (and sampling coordinates)
# err by 1.7e-2 (weight, batch 128; offsets, depthwise) up to 0.76 (offsets, batch 128),
# float32 ones by 2.3e-3 to 4.8e-3.
MANY_TERM_SUMS = [
    Problem('global_batch128', batch=128, global_offset=True),
    Problem('global_depthwise64', in_channels=64, out_channels=64, groups=64, global_offset=True),
]


@pytest.mark.parametrize('device', [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason='no CUDA GPU on this machine')),
])
@by_name(MANY_TERM_SUMS)
def test_bfloat16_global_gradients_sum_in_float32(problem, device):
    tensors = problem.make_inputs(torch.bfloat16)
    tensors['input'] = tensors['input'].abs()
    tensors['kernel_offset'] = off_the_kinks(tensors['kernel_offset'])
    names = ('weight', 'kernel_offset')
    rounded = {name: None if t is None else t.double().requires_grad_(name in names)
               for name, t in tensors.items()}
    expected = torch.autograd.grad(problem.call(deform_kernel_conv2d_reference, rounded).sum(),
                                   [rounded[name] for name in names])
    on_device = {name: None if t is None else t.to(device).requires_grad_(name in names)
                 for name, t in tensors.items()}
    output = problem.call(dk_ops.deform_kernel_conv2d, on_device)
    gradients = torch.autograd.grad(output.sum(), [on_device[name] for name in names])
    for name, gradient, truth in zip(names, gradients, expected):
        assert gradient.dtype == torch.bfloat16, name
        scale = truth.abs().max().item()
        torch.testing.assert_close(gradient.double().cpu(), truth, rtol=0, atol=8e-3 * scale,
                                   msg=lambda m, name=name: f'{name}: {m}')


# ----------------------------------------------------------------------------- backward op
@by_name(problems_named('k3_scope4_local', 'data_offset_mask_dgroups2_groups2',
                        'global_data_offset_mask_dgroups2'))
def test_backward_op_honours_output_mask(problem):
    tensors = problem.make_inputs()
    tensors['bias'] = None
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, tensors)
    grad_output = torch.randn(problem.batch, problem.out_channels, *problem.output_size,
                              generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = TENSOR_ARGUMENTS[:5]
    for wanted in [[True] * 5] + [[name == only for name in names] for only in names]:
        results = torch.ops.dk_ops.deform_kernel_conv2d_backward(
            *backward_op_args(problem, tensors, grad_output, wanted))
        assert len(results) == 5
        for name, is_wanted, result in zip(names, wanted, results):
            if is_wanted and tensors[name] is not None:
                torch.testing.assert_close(result, expected[name],
                                           msg=lambda m, name=name: f'{name}: {m}')
            else:
                assert result.numel() == 0, f'{name} was not asked for but has {result.shape}'


# ----------------------------------------------------------------------------- double backward
@pytest.mark.filterwarnings('ignore:Using backward\\(\\) with create_graph=True')
@pytest.mark.parametrize('backward', ['autograd.grad', 'Tensor.backward'])
@by_name(problems_named('global', 'data_offset_mask_dgroups2_groups2'))
def test_double_backward_raises(problem, backward):
    # Documented: first derivatives only. Differentiating the gradients (a gradient penalty,
    # create_graph=True then a second backward) must fail loudly, not give wrong numbers.
    tensors = problem.make_inputs()
    leaves = [t.requires_grad_() for t in tensors.values() if t is not None]
    loss = problem.call(dk_ops.deform_kernel_conv2d, tensors).square().sum()
    with pytest.raises(NotImplementedError, match='double backward'):
        if backward == 'autograd.grad':
            gradients = torch.autograd.grad(loss, leaves, create_graph=True)
            torch.autograd.grad(sum(gradient.square().sum() for gradient in gradients), leaves)
        else:
            loss.backward(create_graph=True)
            tensors['input'].grad.square().sum().backward()


def test_create_graph_alone_gives_the_first_derivatives():
    problem = problems_named('data_offset_mask_dgroups2_groups2')[0]
    tensors = problem.make_inputs()
    _, expected = output_and_gradients(problem, deform_kernel_conv2d_reference, tensors)
    leaves = {name: t.requires_grad_() for name, t in tensors.items() if t is not None}
    output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    gradients = torch.autograd.grad(output, list(leaves.values()), grad_output,
                                    create_graph=True)
    assert_gradients_close(dict(zip(leaves, gradients)), expected)


# ----------------------------------------------------------------------------- registration
def contiguous(name, tensor):
    return tensor


# The fake kernels must give the real kernels' strides for any input layout: compiled graphs
# are laid out from them. non_contiguous makes input and weight channels-last.
LAYOUTS = pytest.mark.parametrize('layout', [contiguous, non_contiguous],
                                  ids=['contiguous', 'non_contiguous'])


def laid_out(layout, tensors):
    return {name: None if t is None else layout(name, t) for name, t in tensors.items()}


@LAYOUTS
@pytest.mark.parametrize('requires_grad', [False, True], ids=['no_grad', 'requires_grad'])
@by_name(problems_named('k3x2_scope5x4_stride2x1_dil1x2', 'global',
                        'data_offset_mask_dgroups2_groups2'))
def test_opcheck_forward(problem, requires_grad, layout):
    tensors = laid_out(layout, problem.make_inputs(torch.float32))
    for tensor in tensors.values():
        if tensor is not None:
            tensor.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d.default,
                          forward_op_args(problem, tensors))


@LAYOUTS
@pytest.mark.parametrize('output_mask', [[True] * 5, [False, True, False, True, False]], ids=str)
@by_name(problems_named('global', 'data_offset_mask_dgroups2_groups2'))
def test_opcheck_backward(problem, output_mask, layout):
    tensors = laid_out(layout, problem.make_inputs(torch.float32))
    grad_output = layout('grad_output', torch.randn(problem.batch, problem.out_channels,
                                                    *problem.output_size))
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d_backward.default,
                          backward_op_args(problem, tensors, grad_output, output_mask))


def deform_kernel_then_sigmoid(*args, **kwargs):
    return dk_ops.deform_kernel_conv2d(*args, **kwargs).sigmoid()


@pytest.mark.filterwarnings('ignore:dynamo_pgo force disabled')
@LAYOUTS
@by_name(problems_named('global', 'data_offset_mask_dgroups2_groups2',
                        'global_data_offset_mask_dgroups2'))
def test_torch_compile_fullgraph_matches_eager(problem, layout):
    tensors = problem.make_inputs(torch.float32)
    compiled = torch.compile(deform_kernel_then_sigmoid, fullgraph=True)
    # Inductor's caches key on the graph, not on the fake kernels' Python code: a graph cached
    # before a change to them would still be laid out by the old ones.
    with torch._inductor.config.patch(force_disable_caches=True):
        output, gradients = output_and_gradients(problem, compiled, tensors, view=layout)
    expected_output, expected = output_and_gradients(problem, deform_kernel_then_sigmoid, tensors,
                                                     view=layout)
    torch.testing.assert_close(output, expected_output)
    # float32 tolerances: inductor fuses the sigmoid's backward and rounds differently.
    assert_gradients_close(gradients, expected, rtol=1.3e-6, atol=1e-5)
