"""The two CPU formulations of global DK (one kernel offset per image): one convolution per image,
each image on one host thread, where the batch has an image for every thread; otherwise the batch
as one grouped convolution, as on a GPU. Each is checked against the float64 reference, forward
and every gradient, and the thread count picks the formulation but not the per-image results;
DK_OPS_GLOBAL_CONVOLUTION forces either."""
import collections
import contextlib
import dataclasses

import pytest
import torch

import dk_ops
from dk_reference import (by_name, deform_kernel_conv2d_reference, output_and_gradients,
                          problems_named)
from op_comparison import TOLERANCE, assert_gradients_close

# Batch 3: on two threads one takes two images, the other one.
PROBLEMS = [
    dataclasses.replace(problem, batch=3)
    for problem in problems_named('global', 'global_scope5_groups2_kgroups2',
                                  'global_groups2_kgroups4', 'global_depthwise_kgroups2',
                                  'global_k3x2_stride2')
]
# Threads -> convolutions per pass at batch 3: one per image while the batch has an image for
# every thread, one grouped convolution with more threads than images.
CONVOLUTIONS = {1: 3, 2: 3, 4: 1}


@contextlib.contextmanager
def threads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def op_with_convolution_counts(problem, tensors, thread_count):
    """The op's output and gradients on ``thread_count`` threads, and how many convolutions and
    convolution backwards its forward and backward ran (on every thread)."""
    with threads(thread_count), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        output, gradients = output_and_gradients(problem, dk_ops.deform_kernel_conv2d, tensors)
    counts = collections.Counter(event.name for event in profile.events())
    return output, gradients, (counts['aten::convolution'], counts['aten::convolution_backward'])


@pytest.mark.parametrize('thread_count', sorted(CONVOLUTIONS))
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@by_name(PROBLEMS)
def test_each_formulation_computes_the_reference(problem, dtype, thread_count):
    tensors = problem.make_inputs(dtype)
    output, gradients, convolutions = op_with_convolution_counts(problem, tensors, thread_count)
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     tensors)
    assert convolutions == (CONVOLUTIONS[thread_count], ) * 2
    torch.testing.assert_close(output.double(), expected_output, **TOLERANCE[dtype])
    assert_gradients_close(gradients, expected, **TOLERANCE[dtype])


@by_name(PROBLEMS)
def test_per_image_results_do_not_depend_on_the_thread_count(problem):
    # Each image's convolutions run on one thread, and the kernels' sums are split by channels
    # and parts fixed in advance, not by threads: the same bits on one thread as on two.
    tensors = problem.make_inputs(torch.float32)
    one_output, one_gradients, _ = op_with_convolution_counts(problem, tensors, 1)
    two_output, two_gradients, _ = op_with_convolution_counts(problem, tensors, 2)
    assert torch.equal(one_output, two_output)
    for name in one_gradients:
        assert torch.equal(one_gradients[name], two_gradients[name]), name


def test_large_images_get_their_whole_weight_gradient():
    # A shape at which oneDNN splits the weight gradient's sums between threads: planned for
    # more threads than a thread inside the op's parallel region gets, parts of it stayed
    # unwritten. Against the grouped convolution of the batch, which runs outside such a region.
    problem = dataclasses.replace(problems_named('global')[0], batch=2, in_channels=128,
                                  out_channels=128, input_size=(16, 16))
    tensors = problem.make_inputs(torch.float32)
    per_image_output, per_image, convolutions = op_with_convolution_counts(problem, tensors, 2)
    grouped_output, grouped, _ = op_with_convolution_counts(problem, tensors, 3)
    assert convolutions == (2, 2)
    torch.testing.assert_close(per_image_output, grouped_output)
    assert_gradients_close(per_image, grouped)


@pytest.mark.parametrize('formulation, thread_count, convolutions',
                         [('grouped', 1, 1), ('per_image', 4, 3)])
@by_name(problems_named('global_scope5_groups2_kgroups2'))
def test_the_switch_forces_a_formulation(problem, formulation, thread_count, convolutions,
                                         monkeypatch):
    # DK_OPS_GLOBAL_CONVOLUTION, for benchmarks: each formulation where the rule picks the other.
    problem = dataclasses.replace(problem, batch=3)
    tensors = problem.make_inputs(torch.float64)
    monkeypatch.setenv('DK_OPS_GLOBAL_CONVOLUTION', formulation)
    output, gradients, counts = op_with_convolution_counts(problem, tensors, thread_count)
    expected_output, expected = output_and_gradients(problem, deform_kernel_conv2d_reference,
                                                     tensors)
    assert counts == (convolutions, ) * 2
    torch.testing.assert_close(output, expected_output, **TOLERANCE[torch.float64])
    assert_gradients_close(gradients, expected, **TOLERANCE[torch.float64])


def test_the_switch_refuses_other_values(monkeypatch):
    problem = problems_named('global')[0]
    monkeypatch.setenv('DK_OPS_GLOBAL_CONVOLUTION', 'batched')
    with pytest.raises(ValueError, match="DK_OPS_GLOBAL_CONVOLUTION must be 'grouped' or "
                       "'per_image' \\(or unset\\), got 'batched'"):
        problem.call(dk_ops.deform_kernel_conv2d, problem.make_inputs())
