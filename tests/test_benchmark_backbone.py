"""tools/analysis_tools/benchmark_backbone.py on a CPU, at a tiny size: every variant is built
with its layers really replaced, starts as the rigid network (the same loss at step 0 as the
plain torchvision model, up to float32 rounding), trains, and gets a row of finite ratios.

It needs torchvision, whose PyPI wheels are CUDA builds that import only beside a CUDA build of
torch: `make cuda-check` runs it in that venv (.venv-cuda), on the CPU; the CPU venv skips it.
"""
import contextlib
import io
import math

import pytest
import torch

torchvision = pytest.importorskip(
    'torchvision', reason='torchvision is not installed: its wheels need a CUDA build of torch '
    '(make cuda-check runs this test in .venv-cuda)')

import dk_ops  # noqa: E402
from tool_modules import load_tool  # noqa: E402

benchmark_backbone = load_tool('analysis_tools/benchmark_backbone.py')

# The class of the conv2 of layer2-4 in each variant.
LAYER_CLASSES = {
    'rigid': torch.nn.Conv2d,
    'dk_local': dk_ops.DeformKernel2d,
    'dk_global': dk_ops.GlobalDeformKernel2d,
    'dk_dcn': dk_ops.DeformKernelConv2d,
    'torchvision_dcn': benchmark_backbone.TorchvisionDCN,
}
# ResNet-50 has (3, 4, 6, 3) Bottlenecks in layer1-4: 4 + 6 + 3 conv2 in layer2-4.
CONV2_IN_LAYER2_TO_4 = 13
TINY = ['--device', 'cpu', '--batch', '1', '--image-size', '64', '64', '--repeats', '1']


@pytest.fixture(scope='module')
def rows_and_table():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = benchmark_backbone.main(TINY)
    return rows, printed.getvalue()


def test_every_variant_trains_and_starts_as_rigid(rows_and_table):
    rows, _ = rows_and_table
    ran = {(row['model'], row['variant']) for row in rows}
    assert ran == {(model, variant) for model in ('resnet50', 'faster_rcnn')
                   for variant in benchmark_backbone.LABELS}
    rigid_loss = {row['model']: row['first_loss'] for row in rows if row['variant'] == 'rigid'}
    for row in rows:
        assert row['layers'] == {LAYER_CLASSES[row['variant']].__name__: CONV2_IN_LAYER2_TO_4}
        # Step 0 runs the same function as the torchvision network: the scope fits the rigid
        # kernel exactly and all offsets start at zero, so only float32 rounding differs.
        assert row['first_loss'] == pytest.approx(rigid_loss[row['model']], rel=1e-4), row
        assert math.isfinite(row['last_loss']), row
        assert math.isfinite(row['time_ratio']) and row['time_ratio'] > 0, row
        assert row['peak_mib'] is None  # measured on CUDA only


def test_table_has_a_row_of_finite_ratios_per_variant(rows_and_table):
    rows, table = rows_and_table
    lines = [line for line in table.splitlines() if line.startswith('| resnet50 |') or
             line.startswith('| faster_rcnn |')]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        assert cells[1] == benchmark_backbone.LABELS[row['variant']]
        assert math.isfinite(float(cells[4]))  # step time, x rigid
        assert cells[5] == 'not measured'
    assert 'measured on CUDA only' in table


def test_float16_amp_step_with_a_gradient_scaler_on_rigid_and_dk():
    # On a CPU rigid and the DK variants have autocast kernels; this runs the AMP path and its
    # loss scaling, and the DK layers after the (float16) convs of the network.
    dk_variants = ['dk_local', 'dk_global', 'dk_dcn']
    rows = benchmark_backbone.main(
        TINY + ['--models', 'resnet50', '--variants', 'rigid', *dk_variants, '--amp', 'float16'])
    assert [row['variant'] for row in rows] == ['rigid', *dk_variants]
    for row in rows:
        assert row['layers'] == {LAYER_CLASSES[row['variant']].__name__: CONV2_IN_LAYER2_TO_4}
        assert math.isfinite(row['last_loss']), row


def test_amp_refuses_torchvision_dcn_on_the_cpu():
    # torchvision's deform_conv2d has no AutocastCPU kernel; dk_ops' op has one.
    with pytest.raises(ValueError, match=r"\['torchvision_dcn'\] have no AutocastCPU"):
        benchmark_backbone.main(
            TINY + ['--amp', 'bfloat16', '--variants', 'dk_local', 'torchvision_dcn'])


def test_image_too_small_for_batchnorm_is_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark_backbone.main(['--device', 'cpu', '--batch', '1', '--image-size', '32', '32'])
    assert '--image-size [32, 32] with --batch 1' in capsys.readouterr().err
