"""tools/analysis_tools/benchmark_rtmdet.py on a CPU, at a tiny size: the backbone is mmdet's
RTMDet-s CSPNeXt, every variant replaces each CSPNeXt block's 5x5 depthwise conv, starts as the
rigid network (the same step-0 loss) and gets a row of the table."""
import contextlib
import io
import math

import pytest
import torch

import dk_ops
from tool_modules import load_tool

benchmark_rtmdet = load_tool('analysis_tools/benchmark_rtmdet.py')

LAYER_CLASSES = {'rigid': torch.nn.Conv2d, 'dk_local': dk_ops.DeformKernel2d,
                 'dk_global': dk_ops.GlobalDeformKernel2d}
# mmdet's CSPNeXt P5 arch has 3, 6, 6 and 3 CSPNeXt blocks in stages 1-4; RTMDet-s's
# deepen_factor 0.33 makes them max(round(n * 0.33), 1): 1, 2, 2 and 1.
RTMDET_S_BLOCKS = 1 + 2 + 2 + 1
# The blocks' hidden channels: half of each stage's 128/256/512/1024 times widen_factor 0.5.
DEPTHWISE_CHANNELS = [32, 64, 64, 128, 128, 256]
TINY = ['--device', 'cpu', '--batch', '1', '--image-size', '64', '64', '--repeats', '1']


@pytest.fixture(scope='module')
def rows_and_table():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = benchmark_rtmdet.main(TINY)
    return rows, printed.getvalue()


def test_table_has_a_row_per_variant(rows_and_table):
    rows, table = rows_and_table
    assert [row['variant'] for row in rows] == ['rigid', 'dk_local', 'dk_global']
    lines = [line for line in table.splitlines() if line.startswith('| ') and
             not line.startswith('| RTMDet-s')]
    assert [line.split('|')[1].strip() for line in lines] == ['rigid', 'local DK', 'global DK']
    for line, row in zip(lines, rows):
        cells = [cell.strip() for cell in line.strip('|').split('|')]
        assert math.isfinite(float(cells[3])) and float(cells[3]) > 0  # step time, x rigid
        assert cells[4] == 'not measured'  # peak memory: on CUDA only
        assert math.isfinite(row['last_loss']), row
    assert 'measured on CUDA only' in table
    local_dk = next(line for line in lines if line.startswith('| local DK'))
    assert local_dk.rstrip(' |').endswith('not judged on a CPU')


def test_every_variant_starts_as_rigid(rows_and_table):
    # Step 0 runs the same function in every variant: the scopes fit the rigid kernels exactly
    # and all offsets start at zero, so only float32 rounding differs.
    rows, _ = rows_and_table
    for row in rows:
        assert row['layers'] == {LAYER_CLASSES[row['variant']].__name__: RTMDET_S_BLOCKS}
        assert row['first_loss'] == pytest.approx(rows[0]['first_loss'], rel=1e-5), row


def test_replaced_layers_are_the_depthwise_5x5_convs_of_the_blocks():
    models = benchmark_rtmdet.build_variants(['rigid', 'dk_local'])
    rigid_layers = [m.conv for m in benchmark_rtmdet.depthwise_modules(models['rigid'])]
    dk_layers = [m.conv for m in benchmark_rtmdet.depthwise_modules(models['dk_local'])]
    assert len(rigid_layers) == len(dk_layers) == RTMDET_S_BLOCKS
    for rigid, dk, channels in zip(rigid_layers, dk_layers, DEPTHWISE_CHANNELS):
        assert type(rigid) is torch.nn.Conv2d
        assert isinstance(dk, dk_ops.DeformKernel2d)
        for layer in (rigid, dk):
            assert layer.in_channels == layer.out_channels == layer.groups == channels
            assert layer.kernel_size == (5, 5) and layer.padding == (2, 2)
        assert dk.scope_size == (6, 6) and dk.kernel_offset_groups == 1
    # No other conv is replaced: both networks have the same nn.Conv2d count but for those.
    count = [sum(type(m) is torch.nn.Conv2d for m in model.modules()) for model in models.values()]
    assert count[0] - count[1] == RTMDET_S_BLOCKS


def test_backbone_is_mmdet_rtmdet_s_cspnext():
    # The same modules under the same names as mmdet's CSPNeXt with RTMDet-s's settings: its
    # weights load strictly and give the same outputs.
    cspnext = pytest.importorskip('mmdet.models.backbones.cspnext',
                                  reason='mmdet is not installed')
    torch.manual_seed(0)
    reference = cspnext.CSPNeXt(arch='P5', deepen_factor=0.33, widen_factor=0.5,
                                expand_ratio=0.5, channel_attention=True)
    reference.eval()  # mmdet's train() returns None
    backbone = benchmark_rtmdet.CSPNeXt(**benchmark_rtmdet.RTMDET_S).eval()
    backbone.load_state_dict(reference.state_dict(), strict=True)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, outputs = reference(images), backbone(images)
    assert len(outputs) == len(expected) == 3
    for output, level in zip(outputs, expected):
        torch.testing.assert_close(output, level)
