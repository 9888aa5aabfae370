"""ONNX export of Deformable Kernels (dk_ops/export.py, tools/deployment/export_onnx.py).

Truth is the PyTorch op (its kernels are tested against the float64 reference elsewhere):

- the decomposition into standard ATen ops equals the op in float64 over the op tests'
  problem matrix, non-finite offsets and an empty batch included;
- the ONNX graphs hold default-domain operators only and, run by onnxruntime (CPU) in float32,
  stay within 1e-4 of the op relative to the output's largest magnitude: the problem matrix,
  the four layer types with dynamic batch, height and width, and, through the export tool,
  the backbone and neck of configs/dk's DK ResNet-50-FPN traced at 800x1333.
"""
import dataclasses
import os.path as osp

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mmengine.registry import MODELS, init_default_scope
from torch import nn

import dk_ops
from dk_mmdet.config_loading import load_config
from dk_ops.export import ONNX_OPSET, deform_kernel_conv2d_decomposition, export_onnx
from dk_ops.modules import OffsetConv2d, OffsetLinear
from dk_reference import DCN_PROBLEMS, PROBLEMS, by_name
from mmdet_fixtures import CONFIG_DIR
from tool_modules import load_tool

ONNX_RELATIVE_TOLERANCE = 1e-4
DK_R50_CONFIG = osp.join(CONFIG_DIR, 'faster-rcnn_r50-dk-c3-c5_fpn_1x_coco.py')


def load_export_tool():
    return load_tool('deployment/export_onnx.py')


def decomposed(input, weight, kernel_offset, bias=None, *, kernel_size, stride, padding,
               dilation, groups, kernel_offset_groups, data_offset=None, mask=None,
               deform_groups=1):
    """The decomposition called like ``dk_ops.deform_kernel_conv2d``."""
    return deform_kernel_conv2d_decomposition(input, weight, kernel_offset, data_offset, mask,
                                              bias, kernel_size, stride, padding, dilation,
                                              groups, kernel_offset_groups, deform_groups)


def with_non_finite_offsets(tensors):
    """The tensors with NaN, +-inf and huge values among the kernel and data offsets."""
    tensors = dict(tensors)
    for name in ('kernel_offset', 'data_offset'):
        if tensors[name] is not None:
            flat = tensors[name].clone().view(-1)
            flat[0::7], flat[1::11], flat[2::13], flat[3::17] = (float('nan'), float('inf'),
                                                                 -float('inf'), 1e30)
            tensors[name] = flat.view(tensors[name].shape)
    return tensors


def assert_within_relative_tolerance(got, expected, name=''):
    """|got - expected| <= 1e-4 * (|expected| + max |expected|) everywhere."""
    got, expected = torch.as_tensor(got), torch.as_tensor(expected)
    scale = expected.abs().max().item()
    assert scale > 0, f'{name}: the expected output is all zeros, a vacuous comparison'
    torch.testing.assert_close(got, expected, rtol=ONNX_RELATIVE_TOLERANCE,
                               atol=ONNX_RELATIVE_TOLERANCE * scale, msg=lambda m: f'{name}: {m}')


def assert_standard_onnx(model: onnx.ModelProto, opset: int = ONNX_OPSET):
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {'', 'ai.onnx'}
    assert not model.functions
    assert [(entry.domain, entry.version) for entry in model.opset_import] == [('', opset)]


def ort_session(model) -> onnxruntime.InferenceSession:
    serialized = model if isinstance(model, str) else model.SerializeToString()
    return onnxruntime.InferenceSession(serialized, providers=['CPUExecutionProvider'])


# ----------------------------------------------------------------------------- decomposition
NON_FINITE_PROBLEMS = [problem for problem in PROBLEMS
                       if problem.name in ('data_offset_mask_dgroups2_groups2',
                                           'global_data_offset_mask_dgroups2', 'k3_scope3')]


@by_name(PROBLEMS + DCN_PROBLEMS)
def test_decomposition_equals_the_op_in_float64(problem):
    tensors = problem.make_inputs()
    torch.testing.assert_close(problem.call(decomposed, tensors),
                               problem.call(dk_ops.deform_kernel_conv2d, tensors),
                               rtol=1e-10, atol=1e-10)


@by_name(NON_FINITE_PROBLEMS)
def test_decomposition_with_non_finite_offsets_equals_the_op(problem):
    # The op documents that a non-finite offset puts its tap outside: it contributes zero.
    tensors = with_non_finite_offsets(problem.make_inputs())
    output = problem.call(decomposed, tensors)
    assert output.isfinite().all()
    torch.testing.assert_close(output, problem.call(dk_ops.deform_kernel_conv2d, tensors),
                               rtol=1e-10, atol=1e-10)


@by_name([problem for problem in PROBLEMS
          if problem.name in ('k3_scope4_local', 'global', 'data_offset_mask_dgroups2_groups2',
                              'global_data_offset_mask_dgroups2')])
def test_decomposition_of_an_empty_batch(problem):
    problem = dataclasses.replace(problem, batch=0)
    output = problem.call(decomposed, problem.make_inputs())
    assert output.shape == (0, problem.out_channels, *problem.output_size)


# ----------------------------------------------------------------------------- the op's matrix
class ProblemCalls(nn.Module):
    """Every problem's op call in one module, so that one export covers the whole matrix."""

    def __init__(self, problems, tensor_names):
        super().__init__()
        self.problems = problems
        self.tensor_names = tensor_names  # per problem, the names of its non-None tensors

    def forward(self, *flat_tensors):
        outputs, flat = [], iter(flat_tensors)
        for problem, names in zip(self.problems, self.tensor_names):
            tensors = dict.fromkeys(('input', 'weight', 'kernel_offset', 'bias', 'data_offset',
                                     'mask'))
            tensors.update((name, next(flat)) for name in names)
            outputs.append(problem.call(dk_ops.deform_kernel_conv2d, tensors))
        return tuple(outputs)


MATRIX = ([(problem.name, problem, False) for problem in PROBLEMS + DCN_PROBLEMS] +
          [(problem.name + '_non_finite', problem, True) for problem in NON_FINITE_PROBLEMS])


@pytest.fixture(scope='module')
def exported_matrix():
    """The problem matrix exported once: the ONNX model, its outputs and the op's, by name."""
    problems, tensor_names, flat = [], [], []
    for _, problem, non_finite in MATRIX:
        tensors = problem.make_inputs(torch.float32)
        if non_finite:
            tensors = with_non_finite_offsets(tensors)
        names = [name for name, tensor in tensors.items() if tensor is not None]
        problems.append(problem)
        tensor_names.append(names)
        flat += [tensors[name] for name in names]
    module = ProblemCalls(problems, tensor_names)
    model = export_onnx(module, tuple(flat)).model_proto
    session = ort_session(model)
    feeds = {entry.name: tensor.numpy() for entry, tensor in zip(session.get_inputs(), flat)}
    got = session.run(None, feeds)
    expected = module(*flat)
    return model, {name: (got[index], expected[index])
                   for index, (name, _, _) in enumerate(MATRIX)}


def test_problem_matrix_graph_is_standard_onnx(exported_matrix):
    model, _ = exported_matrix
    assert_standard_onnx(model)
    # The sampling of the data offsets is the standard GridSample (opset >= 16).
    assert 'GridSample' in {node.op_type for node in model.graph.node}


@pytest.mark.parametrize('name', [name for name, _, _ in MATRIX])
def test_onnxruntime_matches_the_op(exported_matrix, name):
    _, outputs = exported_matrix
    got, expected = outputs[name]
    assert np.isfinite(got).all()
    assert_within_relative_tolerance(got, expected, name)


# ----------------------------------------------------------------------------- layer types
def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn from N(0, 0.3^2), offset generators included (offsets of a few
    pixels, scope cells)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module.eval()


class EveryLayerType(nn.Module):
    """Local DK, global DK, DK + DCN, DK + DCNv2 and depthwise local DK side by side, with
    varied geometry."""

    def __init__(self):
        super().__init__()
        self.local = dk_ops.DeformKernel2d(8, 8, 3, stride=2, padding=1)
        self.global_ = dk_ops.GlobalDeformKernel2d(8, 8, 3, padding=1, kernel_offset_groups=2,
                                                   scope_size=5)
        self.dcn = dk_ops.DeformKernelConv2d(8, 4, 3, padding=2, dilation=2, deform_groups=2)
        self.dcnv2 = dk_ops.DeformKernelConv2d(8, 8, 3, padding=1, groups=2,
                                               kernel_offset_groups=2, modulated=True)
        self.depthwise = dk_ops.DeformKernel2d(8, 8, 5, padding=2, groups=8, scope_size=6)

    def forward(self, x):
        return self.local(x), self.global_(x), self.dcn(x), self.dcnv2(x), self.depthwise(x)


def test_every_layer_type_with_dynamic_batch_and_size():
    module = randomise(EveryLayerType())
    dims = {0: torch.export.Dim('batch', min=1, max=64),
            2: torch.export.Dim('height', min=4, max=4096),
            3: torch.export.Dim('width', min=4, max=4096)}
    model = export_onnx(module, (torch.randn(2, 8, 13, 11), ), dynamic_shapes={'x': dims},
                        input_names=['x']).model_proto
    assert_standard_onnx(model)
    input_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [bool(dim.dim_param) for dim in input_dims] == [True, False, True, True]
    session = ort_session(model)
    generator = torch.Generator().manual_seed(1)
    for shape in [(2, 8, 13, 11), (1, 8, 20, 7), (3, 8, 6, 9)]:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = module(x)
        for name, got, want in zip(('local', 'global', 'dcn', 'dcnv2', 'depthwise'),
                                   session.run(None, {'x': x.numpy()}), expected):
            assert got.shape == tuple(want.shape)
            assert_within_relative_tolerance(got, want, f'{name} at {shape}')


def test_verify_measures_the_difference_from_pytorch(tmp_path):
    layer = randomise(dk_ops.DeformKernel2d(4, 4, 3, padding=1))
    image = torch.randn(2, 4, 6, 7)
    out = str(tmp_path / 'layer.onnx')
    export_onnx(layer, (image, ), out, input_names=['image'])
    differences = load_export_tool().relative_differences

    def outputs(x):  # the tool's modules return a tuple of feature maps
        return (layer(x), )

    assert max(differences(outputs, out, image)) < 1e-5
    with torch.no_grad():
        layer.weight.add_(0.1)  # PyTorch's model is no longer the exported one
    assert min(differences(outputs, out, image)) > 1e-3


def test_every_layer_type_at_a_later_opset():
    module = randomise(EveryLayerType())
    x = torch.randn(2, 8, 9, 10)
    model = export_onnx(module, (x, ), input_names=['x'], opset_version=21).model_proto
    assert_standard_onnx(model, 21)
    with torch.no_grad():
        expected = module(x)
    for name, got, want in zip(('local', 'global', 'dcn', 'dcnv2', 'depthwise'),
                               ort_session(model).run(None, {'x': x.numpy()}), expected):
        assert_within_relative_tolerance(got, want, name)


def test_an_opset_the_converter_cannot_reach_is_an_error():
    # torch.onnx keeps opset 18 (logging a warning) where the onnx version converter fails,
    # as it does for the ReduceMean of the global layer's offset generator going to 16;
    # export_onnx raises instead.
    layer = randomise(dk_ops.GlobalDeformKernel2d(4, 4, 3, padding=1))
    with pytest.raises(ValueError, match='opset_version=16 was asked for'):
        export_onnx(layer, (torch.randn(2, 4, 6, 6), ), opset_version=16)


# ----------------------------------------------------------------------------- detectors
def give_offsets(detector: nn.Module, image_size=(128, 160)) -> None:
    """Offset generators drawn at random and scaled so that their outputs have unit standard
    deviation (offsets of about a pixel and a scope cell) on a random image.

    A freshly built detector has zero offsets: its DK layers would sample the scope at its
    rigid taps only, and the export would not be tested off the grid.
    """
    generator = torch.Generator().manual_seed(0)

    def to_unit_deviation(module, inputs, output):
        scale = output.std()
        with torch.no_grad():
            module.weight /= scale
        return output / scale

    hooks = []
    for module in detector.modules():
        if isinstance(module, (OffsetConv2d, OffsetLinear)):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
            hooks.append(module.register_forward_hook(to_unit_deviation))
    assert hooks, 'the detector has no DK layer'
    with torch.no_grad():
        detector.extract_feat(torch.randn(1, 3, *image_size, generator=generator))
    for hook in hooks:
        hook.remove()


def build_detector(config: str, cfg_options=None) -> nn.Module:
    cfg = load_config(config, cfg_options)
    cfg.model.backbone.init_cfg = None  # no ImageNet weights here
    init_default_scope('mmdet')
    torch.manual_seed(0)
    detector = MODELS.build(cfg.model).eval()
    give_offsets(detector)
    return detector


def test_export_tool_on_the_dk_resnet50_fpn_at_800x1333(tmp_path, capsys):
    # configs/dk's local-DK ResNet-50-FPN at its real widths, traced on 800x1333 images with
    # dynamic batch, height and width (the tool's default). The slowest test here: about a
    # minute of CPU time, half of it the dynamic-shape export, a sixth the PyTorch forward.
    detector = build_detector(DK_R50_CONFIG)
    checkpoint = str(tmp_path / 'dk_r50.pth')
    torch.save({'state_dict': detector.state_dict()}, checkpoint)
    out = str(tmp_path / 'dk_r50.onnx')
    assert load_export_tool().main([DK_R50_CONFIG, checkpoint, '--out', out]) == 0
    assert 'opset 18, dynamic batch, height, width' in capsys.readouterr().out

    model = onnx.load(out)
    assert_standard_onnx(model)
    assert [entry.name for entry in model.graph.output] == [f'feature{i}' for i in range(5)]
    dk_layers = [name for name, layer in detector.backbone.named_modules()
                 if isinstance(layer, dk_ops.DeformKernel2d)]
    assert len(dk_layers) == 4 + 6 + 3  # the conv2 of every Bottleneck in c3-c5
    session = ort_session(out)
    generator = torch.Generator().manual_seed(1)
    # The traced size, another batch and size, and a size below the 65 rows and columns that
    # torch.export assumed (its guards are not in the ONNX graph, which works at any size).
    for shape in [(1, 3, 800, 1333), (2, 3, 320, 480), (1, 3, 64, 96)]:
        image = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = detector.extract_feat(image)
        got = session.run(None, {'image': image.numpy()})
        assert len(got) == len(expected) == 5
        for level, (level_got, level_expected) in enumerate(zip(got, expected)):
            assert_within_relative_tolerance(level_got, level_expected, f'level {level} {shape}')
