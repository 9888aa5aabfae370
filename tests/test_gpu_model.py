"""tools/analysis_tools/gpu_model.py, the GPU performance model of docs/gpu.md: one row of its
table recomputed by hand from the H100 SXM datasheet figures and the passes its docstring
lists (c4: 256 channels, 50 x 50; batch 2; float32 with TF32 GEMMs; local DK, scope 4)."""
import pytest

from tool_modules import load_tool

gpu_model = load_tool('analysis_tools/gpu_model.py')

TF32_DENSE, FP32, HBM = 989e12 / 2, 67e12, 3.35e12
M, C, S, TAPS = 2 * 50 * 50, 256, 16, 9


@pytest.fixture(scope='module')
def row():
    [row] = [r for r in gpu_model.rows([2], dtypes=['float32'])
             if r.stage == 'c4' and r.case.name == 'DK local, scope 4']
    return row


def test_the_convolution(row):
    pass_flops = 2 * M * C * C * TAPS
    pass_bytes = 3 * M * C * 4
    flops, megabytes, seconds = row.totals(row.conv)
    assert flops == pytest.approx(3 * pass_flops / 1e9)
    assert megabytes == pytest.approx(3 * pass_bytes / 1e6)
    assert seconds == pytest.approx(3 * max(pass_flops / TF32_DENSE, pass_bytes / HBM))


def test_the_fused_path_against_the_convolution(row):
    gemm = 2 * M * C * S * C
    sampling = M * C * TAPS * (2 + 8)  # a rigid-grid pixel, then 4 scope corners
    activations, offsets = M * C * 4, 2 * TAPS * M * 4
    seconds = (max(gemm / TF32_DENSE + sampling / FP32, (2 * activations + offsets) / HBM) * 2 +
               max(gemm / TF32_DENSE + 2 * sampling / FP32,
                   (3 * activations + 3 * offsets) / HBM))
    conv = 3 * max(2 * M * C * C * TAPS / TF32_DENSE, 3 * M * C * 4 / HBM)
    assert row.totals(row.fused)[2] / row.totals(row.conv)[2] == pytest.approx(seconds / conv)
    # Scope 4 multiplies 16/9 of the convolution's products: the floor of any local DK path.
    assert seconds / conv > 16 / 9


def test_the_columns_path_moves_z_seven_times(row):
    # Z written by the two scope-column passes and as grad Z, read by the two GEMMs with Z and
    # the input- and offset-gradient passes; besides it, 16 activation-sized reads and writes
    # and 3 of the float32 input gradient (the same size in float32), and the offsets 5 times.
    z_bytes, activations, offsets = M * S * C * 4, M * C * 4, 2 * TAPS * M * 4
    _, megabytes, _ = row.totals(row.columns)
    assert megabytes == pytest.approx((7 * z_bytes + 19 * activations + 5 * offsets) / 1e6)


def test_the_table_has_every_benchmark_case():
    table = gpu_model.markdown_table(gpu_model.rows([2, 8]))
    rows = table.splitlines()[2:]
    assert len(rows) == 2 * 2 * 3 * 4  # dtypes, batches, stages, cases
    assert all(row.count('|') == 14 for row in rows)
