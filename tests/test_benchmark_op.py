"""tools/analysis_tools/benchmark_op.py on a CPU at a tiny size: every case runs and gets a row,
and the verdicts against the GPU targets (docs/gpu.md#targets) are judged right. (The workspace column needs
CUDA; `tools/gpu_check.sh` runs the script there.)"""
import contextlib
import io
import os
import sys

import pytest
import torch

from tool_modules import load_tool

benchmark_op = load_tool('analysis_tools/benchmark_op.py')

DK_CASES = ['DK local, scope 3', 'DK local, scope 4', 'DK global, scope 4', 'DK+DCN, scope 4']


def run(monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['benchmark_op.py', *args])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        benchmark_op.main()
    return printed.getvalue().splitlines()


def test_every_case_gets_a_row_with_its_ratio_to_conv2d(monkeypatch):
    monkeypatch.delenv('DK_OPS_MAX_COLUMN_BYTES', raising=False)
    lines = run(monkeypatch, '--shrink', '8', '--stages', 'c5', '--repeats', '1',
                '--column-mib', '1')
    rows = [line.strip('|').split('|') for line in lines if line.startswith('| (2, 64, 3, 3)')]
    cells = {row[1].strip(): [cell.strip() for cell in row] for row in rows}
    assert list(cells)[:6] == ['F.conv2d', *DK_CASES[:2], 'DK local, scope 4, 1 MiB columns',
                               *DK_CASES[2:]]
    assert 'DK_OPS_MAX_COLUMN_BYTES' not in os.environ
    assert cells['F.conv2d'][3] == '1.00'
    assert {'DK global, scope 4, grouped', 'DK global, scope 4, per_image'} <= set(cells)
    for name, row in cells.items():
        assert float(row[2]) > 0 and float(row[3]) > 0, name
        assert row[4] == '-' and row[5] == '', name  # no workspace and no verdicts on a CPU
    assert lines[-1].startswith('The workspace is measured on CUDA only')


def test_targets_judge_time_and_workspace():
    workspaces = {'F.conv2d': 0.0, 'DK local, scope 4': 12.0, 'torchvision DCN': 10.0}
    assert benchmark_op.targets('DK local, scope 4', 1.9, workspaces) == (
        "time <= 2.0x: met; workspace <= torchvision DCN's: missed")
    assert benchmark_op.targets('DK local, scope 4', 2.1, dict(workspaces, **{
        'DK local, scope 4': 10.0})) == "time <= 2.0x: missed; workspace <= torchvision DCN's: met"
    assert benchmark_op.targets('DK global, scope 4', 1.3, {'DK global, scope 4': 1.0}) == (
        'time <= 1.3x: met')
    assert benchmark_op.targets('DK local, scope 4, 64 MiB columns', 2.1, {
        'DK local, scope 4, 64 MiB columns': 1.0}) == 'time <= 2.0x: missed'
    assert benchmark_op.targets('F.conv2d', 1.0, workspaces) == ''
    assert benchmark_op.targets('DK local, scope 4', 1.0, {}) == ''  # a CPU: nothing judged


def test_a_case_runs_with_its_environment(monkeypatch):
    monkeypatch.setenv('BENCHMARK_OP_TEST', 'before')
    x = torch.ones(3, requires_grad=True)
    scale = lambda x: x * float(len(os.environ['BENCHMARK_OP_TEST']))  # noqa: E731
    benchmark_op.ForwardBackward(scale, x, env={'BENCHMARK_OP_TEST': 'four'})()
    assert x.grad.tolist() == [4.0, 4.0, 4.0]
    assert os.environ['BENCHMARK_OP_TEST'] == 'before'


def test_cases_times_only_the_named_cases_beside_conv2d(monkeypatch):
    lines = run(monkeypatch, '--shrink', '8', '--stages', 'c5', '--repeats', '1',
                '--cases', 'DK global, scope 4')
    names = [line.strip('|').split('|')[1].strip() for line in lines
             if line.startswith('| (2, 64, 3, 3)')]
    assert names == ['F.conv2d', 'DK global, scope 4']


def test_an_unknown_case_is_refused_with_the_known_ones(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run(monkeypatch, '--shrink', '8', '--stages', 'c5', '--cases', 'DK global')
    error = capsys.readouterr().err
    assert "--cases ['DK global']: no such case" in error
    assert "'DK global, scope 4'" in error


def test_depthwise_cases_get_a_row_per_shape_with_their_ratios(monkeypatch):
    monkeypatch.delenv('DK_OPS_LOCAL_KERNELS', raising=False)
    lines = run(monkeypatch, '--depthwise', '--shrink', '8', '--repeats', '1')
    rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines
            if line.startswith('| (2, ')]
    shapes = [f'(2, {channels // 8}, {size // 8}, {size // 8}) k{kernel} scope {scope}'
              for channels, size, kernel, scope in benchmark_op.DEPTHWISE_SHAPES]
    names = ['F.conv2d', 'DK, one offset set', 'DK, one offset set per channel',
             'DK, one offset set, scope columns']
    assert [(row[0], row[1]) for row in rows] == [(shape, name) for shape in shapes
                                                  for name in names]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0, row
    assert {row[3] for row in rows if row[1] == 'F.conv2d'} == {'1.00'}
    assert 'DK_OPS_LOCAL_KERNELS' not in os.environ


def test_fused_cases_are_compared_with_the_columns_path_they_replace():
    seconds = {'F.conv2d': 1.0, 'DK local, scope 4': 3.0, 'DK local, scope 4, fused': 2.4,
               'DK+DCN, scope 4': 3.0, 'DK+DCN, scope 4, fused': 3.3,
               'DK local, scope 4, implicit GEMM': 9.0}
    assert benchmark_op.fused_against_columns('(2, 128, 100, 100)', seconds) == [
        '(2, 128, 100, 100) DK local, scope 4: fused / columns = 0.80, fused wins',
        '(2, 128, 100, 100) DK+DCN, scope 4: fused / columns = 1.10, columns wins']
