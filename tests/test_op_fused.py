"""The fused Triton path (``dk_ops.fused``): its output and every gradient against the float64
reference, on the op tests' problems and on problems made to end mid-tile; float16 and bfloat16
against float32; zero sizes; its argument checks; the switch that routes
``dk_ops.deform_kernel_conv2d`` to it; and mutations of the kernels that the comparison must
catch.

The kernels run on CUDA tensors where a GPU is, and otherwise on CPU tensors in Triton's
interpreter: ``make cuda-check`` runs this file with ``TRITON_INTERPRET=1`` in .venv-cuda (whose
torch brings Triton). Without Triton, or with neither a GPU nor the interpreter, the module is
skipped, saying so. In the interpreter the tiles are 64 locations x 16 output channels x 4 input
channels (``dk_ops.fused.op.INTERPRETER_TILE``), which the tile-tail problems below cut.
"""
import dataclasses
import os

import pytest
import torch

pytest.importorskip('triton', reason='Triton is not installed: make cuda-check runs these '
                    'tests in .venv-cuda, whose CUDA build of torch brings it')
INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'
pytestmark = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason='the fused kernels need a CUDA GPU or TRITON_INTERPRET=1 (make cuda-check sets it)')

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import dk_ops  # noqa: E402
import dk_ops.fused  # noqa: E402
from determinism import deterministic_algorithms  # noqa: E402
from dk_ops.fused import kernels  # noqa: E402
from dk_ops.fused import op as fused_op  # noqa: E402
from dk_reference import (PROBLEMS, REDUCED_PRECISION_PROBLEMS, Problem, by_name,  # noqa: E402
                          deform_kernel_conv2d_reference, output_and_gradients, problems_named)
from op_arguments import forward_op_args  # noqa: E402
from op_comparison import (TOLERANCE, assert_gradients_close,  # noqa: E402
                           assert_reduced_precision_close_to_float32)

DEVICE = torch.device('cpu' if INTERPRETED else 'cuda')

# Problems that end mid-tile on every axis of the interpreter's tiles: locations past one tile
# of 64 and not a multiple of it, output channels past one tile of 16, input channels not a
# multiple of the 4 of a channel block (and segments of 2 or 3 channels where conv, kernel-offset
# and deform groups cut each other), scopes of 9, 16 and 25 cells padded to 16 and 32 rows.
TILE_TAIL_PROBLEMS = [
    Problem('tails_scope3', in_channels=6, out_channels=20, input_size=(9, 10),
            scope_size=(3, 3)),
    Problem('tails_scope4_k3x2_stride2x1_dil1x2', in_channels=7, out_channels=17,
            kernel_size=(3, 2), input_size=(15, 10), stride=(2, 1), padding=(1, 0),
            dilation=(1, 2)),
    Problem('tails_scope5_groups2_kgroups3_dgroups2_dcn_mask', batch=1, in_channels=12,
            out_channels=18, input_size=(6, 5), scope_size=(5, 5), groups=2,
            kernel_offset_groups=3, deform_groups=2, data_offset=True, mask=True),
    Problem('tails_kgroups2_dgroups3_dcn', batch=1, in_channels=6, out_channels=5,
            input_size=(6, 7), kernel_offset_groups=2, deform_groups=3, data_offset=True,
            bias=False),
]
EMPTY_BATCH = Problem('empty_batch', batch=0, data_offset=True, mask=True)


@pytest.fixture(autouse=True)
def ieee_float32_products():
    """Float32 products in full precision: TF32 would miss the reference by about 1e-3."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def on_device(name, tensor):
    return tensor.to(DEVICE)


def fused_and_reference(problem):
    """The fused path's output and gradients in float32, and the reference's in float64."""
    tensors = problem.make_inputs(torch.float32)
    result = output_and_gradients(problem, dk_ops.fused.deform_kernel_conv2d, tensors,
                                  view=on_device)
    return result, output_and_gradients(problem, deform_kernel_conv2d_reference, tensors)


def assert_matches_reference(problem):
    (output, gradients), (expected_output, expected) = fused_and_reference(problem)
    assert output.dtype == torch.float32 and output.device.type == DEVICE.type
    torch.testing.assert_close(output.double().cpu(), expected_output, **TOLERANCE[torch.float32])
    assert_gradients_close(gradients, expected, **TOLERANCE[torch.float32])


@by_name(PROBLEMS + TILE_TAIL_PROBLEMS + [EMPTY_BATCH])
def test_output_and_gradients_match_reference(problem):
    assert_matches_reference(problem)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@by_name(REDUCED_PRECISION_PROBLEMS[:3])
def test_reduced_precision_matches_float32(problem, dtype):
    assert_reduced_precision_close_to_float32(problem, dtype, on_device,
                                              function=dk_ops.fused.deform_kernel_conv2d)


def test_autocast_runs_in_the_autocast_dtype():
    # As conv2d does: the float32 tensors are cast to bfloat16 and the op runs in it.
    problem = PROBLEMS[0]
    tensors = {name: None if t is None else t.to(DEVICE)
               for name, t in problem.make_inputs(torch.float32).items()}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        output = problem.call(dk_ops.fused.deform_kernel_conv2d, tensors)
    expected = problem.call(dk_ops.fused.deform_kernel_conv2d,
                            {name: None if t is None else t.bfloat16()
                             for name, t in tensors.items()})
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, expected)


@pytest.mark.parametrize('float32_products, allow_tf32',
                         [('tf32', True), ('ieee', False)])
def test_float32_products_follow_the_cudnn_tf32_switch(monkeypatch, float32_products,
                                                       allow_tf32):
    # DK replaces a convolution: its float32 products are TF32 where cuDNN's would be.
    launched = []
    launch = fused_op._launch
    monkeypatch.setattr(fused_op, '_launch', lambda kernel, grid, *args, **constants: (
        launched.append(constants['DOT_PRECISION']), launch(kernel, grid, *args, **constants)))
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', allow_tf32)
    problem = PROBLEMS[0]
    output_and_gradients(problem, dk_ops.fused.deform_kernel_conv2d,
                         problem.make_inputs(torch.float32), view=on_device)
    assert launched == [float32_products] * 3  # forward, weight gradient, sampling gradients
    launched.clear()
    output_and_gradients(problem, dk_ops.fused.deform_kernel_conv2d,
                         problem.make_inputs(torch.bfloat16), view=on_device)
    assert launched == ['ieee'] * 3


def test_no_input_channels_give_the_bias():
    assert_matches_reference(dataclasses.replace(PROBLEMS[0], name='in0', in_channels=0))


@pytest.mark.parametrize('change, error, message', [
    (dict(input=lambda t: t[0]), ValueError, 'must be 4-D'),
    (dict(weight=lambda t: t.double()), TypeError, 'one dtype'),
    (dict(kernel_offset=lambda t: t[:, 1:]), ValueError, 'kernel_offset must have shape'),
    (dict(mask=lambda t: t[:, :, 1:]), ValueError, 'mask must have shape'),
    (dict(weight=lambda t: t[:, :, :2, :2]), ValueError, 'must hold kernel_size'),
    (dict(input=lambda t: t[:, :, :0]), ValueError, 'smaller than'),
], ids=['input_3d', 'float64_weight', 'kernel_offset_channels', 'mask_rows', 'scope_too_small',
        'input_smaller_than_kernel'])
def test_bad_arguments_raise_naming_them(change, error, message):
    problem = dataclasses.replace(PROBLEMS[0], mask=True)
    tensors = {name: None if t is None else t.to(DEVICE)
               for name, t in problem.make_inputs(torch.float32).items()}
    tensors.update({name: edit(tensors[name]) for name, edit in change.items()})
    with pytest.raises(error, match=message):
        problem.call(dk_ops.fused.deform_kernel_conv2d, tensors)


@pytest.mark.parametrize('warn_only', [False, True], ids=['raises', 'warns'])
def test_deterministic_mode_refuses_the_atomic_backward(warn_only):
    problem = PROBLEMS[0]
    with deterministic_algorithms(warn_only=warn_only):
        with (pytest.warns(UserWarning, match='atomics') if warn_only else
              pytest.raises(RuntimeError, match='atomics')):
            output_and_gradients(problem, dk_ops.fused.deform_kernel_conv2d,
                                 problem.make_inputs(torch.float32), view=on_device)


def test_switch_leaves_the_cpu_op_alone_and_refuses_unknown_values(monkeypatch):
    problem = PROBLEMS[0]
    tensors = problem.make_inputs(torch.float32)
    expected = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    monkeypatch.setattr(fused_op, '_launch', lambda *args, **kwargs: pytest.fail('fused ran'))
    monkeypatch.setenv('DK_OPS_CUDA_PATH', 'fused')
    assert torch.equal(problem.call(dk_ops.deform_kernel_conv2d, tensors), expected)
    monkeypatch.setenv('DK_OPS_CUDA_PATH', 'fast')
    with pytest.raises(ValueError, match="DK_OPS_CUDA_PATH must be 'columns' or 'fused'"):
        problem.call(dk_ops.deform_kernel_conv2d, tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='routes CUDA tensors: needs a GPU')
def test_switch_routes_cuda_tensors_to_the_fused_kernels(monkeypatch):
    problem = PROBLEMS[0]
    tensors = {name: None if t is None else t.cuda()
               for name, t in problem.make_inputs(torch.float32).items()}
    launched = []
    launch = fused_op._launch
    monkeypatch.setattr(fused_op, '_launch', lambda kernel, grid, *args, **constants: (
        launched.append(kernel), launch(kernel, grid, *args, **constants)))
    monkeypatch.setenv('DK_OPS_CUDA_PATH', 'fused')
    output = problem.call(dk_ops.deform_kernel_conv2d, tensors)
    assert len(launched) == 1
    torch.testing.assert_close(output.double().cpu(),
                               problem.call(deform_kernel_conv2d_reference, tensors).cpu(),
                               **TOLERANCE[torch.float32])


@pytest.mark.skipif(INTERPRETED, reason="under TRITON_INTERPRET=1 torch.library.wrap_triton hands "
                    "back the plain kernel, which fake tensors cannot trace: needs a GPU")
def test_opcheck_and_compile():
    problem = problems_named('data_offset_mask_dgroups2_groups2')[0]
    tensors = {name: None if t is None else t.to(DEVICE)
               for name, t in problem.make_inputs(torch.float32).items()}
    torch.library.opcheck(torch.ops.dk_ops.fused_deform_kernel_conv2d.default,
                          forward_op_args(problem, tensors))
    compiled = torch.compile(dk_ops.fused.deform_kernel_conv2d, fullgraph=True)
    torch.testing.assert_close(problem.call(compiled, tensors),
                               problem.call(dk_ops.fused.deform_kernel_conv2d, tensors))


# --------------------------------------------------------------------------- mutations
# Each mutation breaks the kernels in one way that the comparison with the reference must see,
# on a problem where it matters (test_output_and_gradients_match_reference passes there without
# it). The interpreter looks up the kernels' helper functions when it runs them, so replacing one
# in the kernels module changes what runs; compiled GPU kernels would not see it.
interpreter_only = pytest.mark.skipif(not INTERPRETED,
                                      reason='mutations replace helpers the interpreter runs')


def floor_tile_count(size, tile):
    return size // tile


original_input_samples = kernels.input_samples
original_channel_block = kernels.channel_block


@triton.jit
def input_samples_without_bottom_right(input, n, channels, channels_valid, top, left, frac_y,
                                       frac_x, in_channels, height, width,
                                       WITH_SLOPES: tl.constexpr):
    value, d_y, d_x = original_input_samples(input, n, channels, channels_valid, top, left,
                                             frac_y, frac_x, in_channels, height, width,
                                             WITH_SLOPES)
    plane = input + (n * in_channels + channels).to(tl.int64)[:, None] * height * width
    corner = kernels.load_pixels(plane, channels_valid, top + 1, left + 1, height, width)
    fy = frac_y[None, :]
    fx = frac_x[None, :]
    return value - fy * fx * corner, d_y - fx * corner, d_x - fy * corner


@triton.jit
def channel_block_never_the_first(block, group, group_channels, segment_channels,
                                  kernel_group_channels, deform_group_channels,
                                  BLOCK_C: tl.constexpr):
    """The second block in place of the first: K step 0 skipped, step 1 taken twice."""
    return original_channel_block(tl.maximum(block, 1), group, group_channels, segment_channels,
                                  kernel_group_channels, deform_group_channels, BLOCK_C)


@interpreter_only
@pytest.mark.parametrize('module, name, mutation, problem', [
    # 90 locations: a tile of 64 and a tail of 26.
    (fused_op, 'tile_count', floor_tile_count, TILE_TAIL_PROBLEMS[0]),
    # Data offsets: the input points fall between pixels, where every corner weighs.
    (kernels, 'input_samples', input_samples_without_bottom_right,
     problems_named('data_offset')[0]),
    # 6 input channels: two channel blocks, two steps along K.
    (kernels, 'channel_block', channel_block_never_the_first, TILE_TAIL_PROBLEMS[0]),
], ids=['dropped_tile_tail', 'dropped_bilinear_corner', 'skipped_k_step'])
def test_mutation_fails_the_comparison(monkeypatch, module, name, mutation, problem):
    monkeypatch.setattr(module, name, mutation)
    with pytest.raises(AssertionError, match='not close'):
        assert_matches_reference(problem)
