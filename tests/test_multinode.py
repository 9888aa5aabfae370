"""tools/dist_*.sh on two "machines", and tools/slurm_*.sh against a stub srun (CPU).

Two launches of a dist script with NNODES=2 and NODE_RANK 0 and 1, one process each, meet at
MASTER_ADDR=127.0.0.1 like two machines would and talk gloo over loopback. Each node runs in a
directory of its own (its working directory, work dir and outputs): only the data, the config
and the checkpoint are at the same paths on both, as on machines that share no disk.
"""
import json
import os
import os.path as osp
import pickle
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch

from mmdet_fixtures import (assert_metrics_match_pycocotools, free_port, reported_metrics,
                            tool_environment, write_tiny_config)
from tool_modules import TOOLS_DIR

MAX_ITERS = 2
NODE_TIMEOUT_S = 300


def stop(process):
    """SIGKILL a node: its launcher and every process under it (torchrun starts its workers
    in sessions of their own, so they are not in the launcher's process group)."""
    try:
        processes = [psutil.Process(process.pid)]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        processes = []
    for each in processes:
        try:
            each.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def run_two_nodes(script, args, directories):
    """``bash script *args`` as node 0 and node 1 of a 2-node job, node i in ``directories[i]``.

    Fails if either node fails or both have not finished within NODE_TIMEOUT_S; both nodes
    are stopped before this returns, whatever happens.
    """
    env = tool_environment()
    # One thread per process: the two nodes share this machine's cores.
    env.update(NNODES='2', MASTER_ADDR='127.0.0.1', PORT=str(free_port()), OMP_NUM_THREADS='1')
    nodes, logs = [], []
    try:
        for node_rank, directory in enumerate(directories):
            logs.append(osp.join(directory, 'launch.log'))
            with open(logs[-1], 'w') as log:
                nodes.append(subprocess.Popen(
                    ['bash', script, *args], cwd=directory, stdout=log, stderr=subprocess.STDOUT,
                    env=dict(env, NODE_RANK=str(node_rank))))
        deadline = time.monotonic() + NODE_TIMEOUT_S
        while True:
            exit_codes = [node.poll() for node in nodes]
            if None not in exit_codes or any(exit_codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                stop(node)
    exit_codes = [node.returncode for node in nodes]
    if exit_codes != [0, 0]:
        tails = ''
        for rank, log in enumerate(logs):
            with open(log) as f:
                tails += f'\n--- node {rank} ({log}):\n{f.read()[-5000:]}'
        raise AssertionError(f'{script} {args} on two nodes: exit codes {exit_codes} (-9: '
                             f'stopped here, after {NODE_TIMEOUT_S} s or when the other node '
                             f'failed){tails}')


def node_dirs(parent):
    dirs = [osp.join(parent, f'node{rank}') for rank in (0, 1)]
    for directory in dirs:
        os.makedirs(directory)
    return dirs


@pytest.fixture(scope='module')
def config(shapes, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('configs') / 'tiny_faster.py')
    return write_tiny_config(path, 'faster-rcnn_r50-dk-c3-c5_fpn_1x_coco.py', shapes[1],
                             max_iters=MAX_ITERS, checkpoint_interval=MAX_ITERS)


@pytest.fixture(scope='module')
def trained_nodes(shapes, config, tmp_path_factory):
    """The directories of the two nodes of a MAX_ITERS-iteration training (work dir 'work')."""
    nodes = node_dirs(str(tmp_path_factory.mktemp('train')))
    run_two_nodes(osp.join(TOOLS_DIR, 'dist_train.sh'),
                  [config, '1', '--work-dir', 'work', '--cfg-options', f'data_root={shapes[0]}'],
                  nodes)
    return nodes


def test_two_nodes_train_to_identical_weights(trained_nodes):
    # SaveRankWeightsHook (tiny config) dumps every rank's weights in its node's work dir.
    ranks = [torch.load(osp.join(node, 'work', f'rank{rank}_of_2.pth'))
             for rank, node in enumerate(trained_nodes)]
    assert [rank['iter'] for rank in ranks] == [MAX_ITERS, MAX_ITERS]
    assert ranks[0]['state_dict'].keys() == ranks[1]['state_dict'].keys()
    for key, value in ranks[0]['state_dict'].items():
        assert torch.equal(ranks[1]['state_dict'][key], value), key

    # Only rank 0 saves checkpoints (mmengine); its checkpoint holds those weights.
    checkpoint = torch.load(osp.join(trained_nodes[0], 'work', f'iter_{MAX_ITERS}.pth'))
    assert checkpoint['state_dict'].keys() == ranks[1]['state_dict'].keys()
    for key, value in checkpoint['state_dict'].items():
        assert torch.equal(ranks[1]['state_dict'][key], value), key


def test_two_nodes_resume_from_the_checkpoint_of_node_0(shapes, config, trained_nodes,
                                                      tmp_path):
    # Only rank 0 saves checkpoints: node 1 has no work dir, hence no last_checkpoint, of its
    # own. It must resume from the checkpoint node 0 finds (read at node 0's path here, as
    # from a shared disk or a copy), or it trains from iteration 0 out of step with node 0.
    nodes = node_dirs(str(tmp_path))
    work_dir = osp.join(nodes[0], 'work')
    os.makedirs(work_dir)
    checkpoint = shutil.copy(osp.join(trained_nodes[0], 'work', f'iter_{MAX_ITERS}.pth'), work_dir)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(checkpoint)
    run_two_nodes(osp.join(TOOLS_DIR, 'dist_train.sh'),
                  [config, '1', '--work-dir', 'work', '--resume', '--cfg-options',
                   f'data_root={shapes[0]}', f'train_cfg.max_iters={MAX_ITERS + 1}'], nodes)

    ranks = [torch.load(osp.join(node, 'work', f'rank{rank}_of_2.pth'))
             for rank, node in enumerate(nodes)]
    assert [rank['iter'] for rank in ranks] == [MAX_ITERS + 1, MAX_ITERS + 1]
    for key, value in ranks[0]['state_dict'].items():
        assert torch.equal(ranks[1]['state_dict'][key], value), key


def test_two_nodes_test_every_image_of_a_checkpoint(shapes, config, trained_nodes, tmp_path):
    checkpoint = osp.join(trained_nodes[0], 'work', f'iter_{MAX_ITERS}.pth')
    nodes = node_dirs(str(tmp_path))
    run_two_nodes(osp.join(TOOLS_DIR, 'dist_test.sh'),
                  [config, checkpoint, '1', '--work-dir', 'work', '--out', 'predictions.pkl',
                   '--cfg-options', f'data_root={shapes[0]}'], nodes)

    # Each node tested one of the two images; node 0 gathered both, reported their metrics
    # and dumped their predictions.
    predictions = osp.join(nodes[0], 'predictions.pkl')
    with open(predictions, 'rb') as f:
        image_ids = sorted(prediction['img_id'] for prediction in pickle.load(f))
    with open(osp.join(shapes[0], 'annotations', 'instances_val.json')) as f:
        assert image_ids == sorted(image['id'] for image in json.load(f)['images'])
    assert_metrics_match_pycocotools(reported_metrics(osp.join(nodes[0], 'work')), predictions,
                                     *shapes, ['bbox'])


# Stands in for Slurm's srun: records the command line and environment it was given.
STUB_SRUN = """\
#!{python}
import json, os, sys
with open(os.environ['SRUN_STUB_RECORD'], 'w') as f:
    json.dump(dict(argv=sys.argv[1:], env=dict(os.environ)), f)
sys.exit(int(os.environ.get('SRUN_STUB_EXIT_CODE', '0')))
"""


def run_with_stub_srun(tmp_path, script, args, **variables):
    """Runs ``tools/<script>`` with ``variables`` set and a stub srun first on PATH; returns
    (the finished process, what srun received or None if it was not called)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / 'srun'
    srun.write_text(STUB_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    record = tmp_path / 'srun.json'
    env = {name: value for name, value in os.environ.items()
           if name not in ('GPUS', 'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS', 'PYTHON')}
    env.update(variables, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
               SRUN_STUB_RECORD=str(record))
    finished = subprocess.run(['bash', osp.join(TOOLS_DIR, script), *args], env=env,
                              capture_output=True, text=True, timeout=60)
    received = json.loads(record.read_text()) if record.exists() else None
    return finished, received


def test_slurm_train_asks_srun_for_its_tasks_and_passes_arguments_through(tmp_path):
    finished, srun = run_with_stub_srun(
        tmp_path, 'slurm_train.sh',
        ['gpu_part', 'dk_job', 'configs/dk/x.py', 'work dirs/x', '--resume',
         '--cfg-options', 'data_root=/data/my coco', 'train_cfg.max_epochs=1'],
        GPUS='16', GPUS_PER_NODE='4', CPUS_PER_TASK='3', SRUN_ARGS='--time=10 --qos=low',
        PYTHON='/opt/venv/bin/python', PYTHONPATH='/opt/extra', DK_SOME_SETTING='on')
    assert finished.returncode == 0, finished.stderr
    assert srun['argv'] == [
        '-p', 'gpu_part', '--job-name=dk_job', '--gres=gpu:4', '--ntasks=16',
        '--ntasks-per-node=4', '--cpus-per-task=3', '--kill-on-bad-exit=1', '--time=10',
        '--qos=low', '/opt/venv/bin/python', '-u', osp.join(TOOLS_DIR, 'train.py'),
        'configs/dk/x.py', '--work-dir=work dirs/x', '--launcher=slurm', '--resume',
        '--cfg-options', 'data_root=/data/my coco', 'train_cfg.max_epochs=1']
    # srun hands its environment to every task.
    assert srun['env']['PYTHONPATH'] == '/opt/extra'
    assert srun['env']['DK_SOME_SETTING'] == 'on'


def test_slurm_test_asks_srun_for_its_tasks_and_passes_arguments_through(tmp_path):
    finished, srun = run_with_stub_srun(
        tmp_path, 'slurm_test.sh',
        ['gpu_part', 'dk_eval', 'configs/dk/x.py', 'work_dirs/x/epoch_12.pth',
         '--out', 'results.pkl', '--cfg-options', 'test_evaluator.classwise=True'])
    assert finished.returncode == 0, finished.stderr
    # The defaults: one node of 8 GPUs, 5 cores per task, the python on PATH.
    assert srun['argv'] == [
        '-p', 'gpu_part', '--job-name=dk_eval', '--gres=gpu:8', '--ntasks=8',
        '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1', 'python', '-u',
        osp.join(TOOLS_DIR, 'test.py'), 'configs/dk/x.py', 'work_dirs/x/epoch_12.pth',
        '--launcher=slurm', '--out', 'results.pkl', '--cfg-options',
        'test_evaluator.classwise=True']


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
def test_slurm_scripts_exit_with_the_status_of_srun_or_on_a_usage_error(tmp_path, script):
    (tmp_path / 'failing').mkdir()
    finished, _ = run_with_stub_srun(tmp_path / 'failing', script, ['p', 'job', 'config.py', 'x'],
                                     SRUN_STUB_EXIT_CODE='3')
    assert finished.returncode == 3

    (tmp_path / 'usage').mkdir()
    finished, srun = run_with_stub_srun(tmp_path / 'usage', script, ['p', 'job', 'config.py'])
    assert finished.returncode == 2
    assert f'usage: {osp.join(TOOLS_DIR, script)} PARTITION JOB_NAME CONFIG' in finished.stderr
    assert srun is None
