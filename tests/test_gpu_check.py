"""tools/gpu_check.sh: its total time budget and its report, without building anything, and the
problems its compute-sanitizer steps run.

The whole dry run (docs/gpu.md) compiles dk_ops and runs the CPU op tests that `make test`
runs anyway, minutes on a small machine, so it is run by hand; this runs the script with no time
left for any step, which still goes through the machine description, the budget and the report.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_spent_budget_skips_every_step_and_still_writes_the_report(tmp_path):
    log_dir, build_dir = tmp_path / 'logs', tmp_path / 'build'
    env = dict(os.environ, PYTHON=sys.executable, TOTAL_BUDGET='0', BUILD_DIR=str(build_dir))
    result = subprocess.run(['bash', osp.join(REPO_ROOT, 'tools', 'gpu_check.sh'), '--dry-run',
                             str(log_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr  # a skipped step fails the check
    report = (log_dir / 'report.md').read_text()
    assert '| mode | dry run on the CPU' in report
    assert f'| torch | {torch.__version__}, CUDA {torch.version.cuda}' in report
    # the build's budget of 180 s, three times as long in a dry run
    assert '| build | skipped: the 0 s budget was spent | 0 | 540 | - |' in report
    assert 'nothing else can run' in result.stderr
    assert not build_dir.exists()
    # the tests and every benchmark have their section, saying that they did not run
    for name in ('Op tests', 'bench_op_float32', 'bench_op_tf32', 'bench_op_bfloat16_batch8',
                 'bench_op_depthwise', 'bench_backbone_float32', 'bench_backbone_amp_bfloat16',
                 'bench_rtmdet_float32'):
        assert f'## {name}' in report
    assert report.count('(not run)') == 8


def test_sanitizer_problems_run_every_path_on_the_cpu():
    # What racecheck, synccheck and initcheck run on a GPU, here on the CPU with this checkout's
    # dk_ops: a script that fails here would only fail there, in scarce GPU time.
    with open(osp.join(REPO_ROOT, 'tools', 'gpu_check.sh')) as script_file:
        script = re.search(r"^SANITIZER_PROBLEMS=\$\(cat <<'EOF'\n(.*?)^EOF\n\)$",
                           script_file.read(), re.DOTALL | re.MULTILINE).group(1)
    result = subprocess.run([sys.executable, '-c', script, 'cpu'], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(':')[0] for line in result.stdout.splitlines()] == [
        'columns, rigid data grid', 'columns, data offsets and mask',
        'implicit GEMM, data offsets and mask', 'global']
