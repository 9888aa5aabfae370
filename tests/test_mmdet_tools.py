"""tools/train.py, tools/test.py and tools/dist_*.sh on a tiny generated shapes dataset (CPU).

One uninterrupted 4-iteration Faster R-CNN DK run is shared: test.py evaluates its
checkpoint, and the resumed runs must end with exactly its weights.
"""
import glob
import json
import os
import os.path as osp
import pickle
import runpy
import signal
import sys
import types

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.hooks import LoggerHook
from mmengine.registry import DefaultScope

import dk_mmdet.distributed as distributed
from dk_mmdet.checkpoints import CHECKPOINT_SAFE_GLOBALS
from dk_mmdet.config_loading import load_config
from mmdet_fixtures import (KILL_AFTER_ITER_ENV, METRIC_NAMES, assert_metrics_match_pycocotools,
                            free_port, reported_metrics, run, tool_environment, write_tiny_config)
from tool_modules import TOOLS_DIR

TRAIN = osp.join(TOOLS_DIR, 'train.py')
TEST = osp.join(TOOLS_DIR, 'test.py')
MAX_ITERS = 4


def train(config, work_dir, data_root, *extra, env=None, expect_success=True):
    return run([sys.executable, TRAIN, config, '--work-dir', work_dir, '--cfg-options',
                f'data_root={data_root}', *extra], env=env, expect_success=expect_success)


@pytest.fixture(scope='module')
def configs(shapes, tmp_path_factory):
    directory = tmp_path_factory.mktemp('configs')
    return {
        detector: write_tiny_config(str(directory / f'tiny_{detector}.py'),
                                    f'{detector}-rcnn_r50-dk-c3-c5_fpn_1x_coco.py', shapes[1],
                                    max_iters=MAX_ITERS)
        for detector in ('faster', 'mask')
    }


@pytest.fixture(scope='module')
def faster_run(shapes, configs, tmp_path_factory):
    """Work dir of an uninterrupted Faster R-CNN DK run of MAX_ITERS iterations."""
    work_dir = str(tmp_path_factory.mktemp('faster_uninterrupted'))
    train(configs['faster'], work_dir, shapes[0])
    return work_dir


def load_checkpoint_file(path):
    return torch.load(path, map_location='cpu')


def assert_same_training_state(checkpoint_path, reference_path):
    checkpoint = load_checkpoint_file(checkpoint_path)
    reference = load_checkpoint_file(reference_path)
    assert checkpoint['meta']['iter'] == reference['meta']['iter'] == MAX_ITERS
    assert checkpoint['state_dict'].keys() == reference['state_dict'].keys()
    for key, value in reference['state_dict'].items():
        assert torch.equal(checkpoint['state_dict'][key], value), key
    momenta = [state['momentum_buffer'] for state in reference['optimizer']['state'].values()]
    assert len(momenta) > 0
    for state, momentum in zip(checkpoint['optimizer']['state'].values(), momenta):
        assert torch.equal(state['momentum_buffer'], momentum)


def evaluate_checkpoint(config, checkpoint, data_root, classes, work_dir, iou_types):
    predictions = osp.join(work_dir, 'predictions.pkl')
    run([sys.executable, TEST, config, checkpoint, '--work-dir', work_dir, '--out', predictions,
         '--cfg-options', f'data_root={data_root}'])
    metrics = reported_metrics(work_dir)
    assert_metrics_match_pycocotools(metrics, predictions, data_root, classes, iou_types)
    return metrics


@pytest.fixture(scope='module')
def faster_metrics(shapes, configs, faster_run, tmp_path_factory):
    """What test.py reports for the uninterrupted run's checkpoint, checked with pycocotools."""
    return evaluate_checkpoint(configs['faster'], osp.join(faster_run, f'iter_{MAX_ITERS}.pth'),
                               *shapes, str(tmp_path_factory.mktemp('faster_test')), ['bbox'])


def test_faster_rcnn_dk_trains_then_tests_with_coco_metrics(faster_run, faster_metrics):
    checkpoint = load_checkpoint_file(osp.join(faster_run, f'iter_{MAX_ITERS}.pth'))
    assert checkpoint['meta']['iter'] == MAX_ITERS
    assert {f'coco/bbox_{name}' for name in METRIC_NAMES} <= faster_metrics.keys()


def test_mask_rcnn_dk_trains_then_tests_with_coco_metrics(shapes, configs, tmp_path):
    work_dir = str(tmp_path / 'train')
    train(configs['mask'], work_dir, shapes[0])
    checkpoint = osp.join(work_dir, f'iter_{MAX_ITERS}.pth')
    evaluate_checkpoint(configs['mask'], checkpoint, *shapes, str(tmp_path / 'test'),
                           ['bbox', 'segm'])


def test_resume_after_stopping_matches_an_uninterrupted_run(shapes, configs, faster_run,
                                                           tmp_path):
    work_dir = str(tmp_path)
    train(configs['faster'], work_dir, shapes[0], 'train_cfg.max_iters=2')
    assert osp.exists(osp.join(work_dir, 'iter_2.pth'))
    assert not osp.exists(osp.join(work_dir, 'iter_3.pth'))
    train(configs['faster'], work_dir, shapes[0], '--resume')
    assert_same_training_state(osp.join(work_dir, f'iter_{MAX_ITERS}.pth'),
                               osp.join(faster_run, f'iter_{MAX_ITERS}.pth'))


def test_resume_after_kill_matches_an_uninterrupted_run(shapes, configs, faster_run, tmp_path):
    work_dir = str(tmp_path)
    env = tool_environment()
    env[KILL_AFTER_ITER_ENV] = '3'  # one iteration past the last checkpoint, which is lost
    killed = train(configs['faster'], work_dir, shapes[0], env=env, expect_success=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(glob.glob(osp.join(work_dir, 'iter_*.pth'))) == [
        osp.join(work_dir, 'iter_2.pth')]

    resumed = osp.join(work_dir, 'iter_2.pth')
    train(configs['faster'], work_dir, shapes[0], '--resume', resumed)
    assert_same_training_state(osp.join(work_dir, f'iter_{MAX_ITERS}.pth'),
                               osp.join(faster_run, f'iter_{MAX_ITERS}.pth'))


def test_resumable_fine_tuning_starts_from_load_from(shapes, configs, faster_run, tmp_path):
    """``--resume`` with nothing to resume starts from the config's load_from (mmdet's script
    dropped it and trained from scratch); once stopped, the run resumes its own checkpoint."""
    start = 'load_from=' + osp.join(faster_run, f'iter_{MAX_ITERS}.pth')
    uninterrupted, stopped = str(tmp_path / 'uninterrupted'), str(tmp_path / 'stopped')
    train(configs['faster'], uninterrupted, shapes[0], start)
    train(configs['faster'], stopped, shapes[0], start, 'train_cfg.max_iters=2', '--resume')
    train(configs['faster'], stopped, shapes[0], start, '--resume')
    assert_same_training_state(osp.join(stopped, f'iter_{MAX_ITERS}.pth'),
                               osp.join(uninterrupted, f'iter_{MAX_ITERS}.pth'))


def test_only_the_main_process_writes_the_test_metrics_file(monkeypatch, tmp_path):
    # mmengine's LoggerHook dumps the test metrics on every rank into one file, where the ranks'
    # writes race and can leave a corrupt file: only the main process writes it.
    hook = LoggerHook()
    hook.json_log_path = 'metrics.json'
    logged = []
    runner = types.SimpleNamespace(
        hooks=[hook], log_dir=str(tmp_path), test_dataloader=[0, 1],
        log_processor=types.SimpleNamespace(
            get_log_after_epoch=lambda *args, **kwargs: ({'coco/bbox_mAP': 0.5}, 'bbox_mAP 0.5')),
        logger=types.SimpleNamespace(info=logged.append))
    monkeypatch.setattr(distributed, 'is_main_process', lambda: False)
    distributed.write_test_metrics_on_main_process(runner)
    hook.after_test_epoch(runner)
    assert logged == ['bbox_mAP 0.5']
    assert not (tmp_path / 'metrics.json').exists()

    monkeypatch.setattr(distributed, 'is_main_process', lambda: True)
    main_hook = LoggerHook()
    main_hook.json_log_path = 'metrics.json'
    runner.hooks = [main_hook]
    distributed.write_test_metrics_on_main_process(runner)
    main_hook.after_test_epoch(runner)
    assert json.loads((tmp_path / 'metrics.json').read_text()) == {'coco/bbox_mAP': 0.5}


def test_two_process_gloo_training_and_testing(shapes, configs, faster_run, faster_metrics,
                                               tmp_path):
    env = tool_environment()
    env['PORT'] = str(free_port())
    work_dir = str(tmp_path / 'train')
    run(['bash', osp.join(TOOLS_DIR, 'dist_train.sh'), configs['faster'], '2', '--work-dir',
         work_dir, '--cfg-options', f'data_root={shapes[0]}'], env=env)
    ranks = [torch.load(osp.join(work_dir, f'rank{rank}_of_2.pth')) for rank in (0, 1)]
    assert [rank['iter'] for rank in ranks] == [MAX_ITERS, MAX_ITERS]
    for key, value in ranks[0]['state_dict'].items():
        assert torch.equal(ranks[1]['state_dict'][key], value), key

    # Testing on 2 processes (each on half of the images) reports what one process reports.
    env['PORT'] = str(free_port())
    checkpoint = osp.join(faster_run, f'iter_{MAX_ITERS}.pth')
    run(['bash', osp.join(TOOLS_DIR, 'dist_test.sh'), configs['faster'], checkpoint, '2',
         '--work-dir', str(tmp_path / 'dist_test'), '--cfg-options', f'data_root={shapes[0]}'],
        env=env)
    distributed = reported_metrics(str(tmp_path / 'dist_test'))
    for name in METRIC_NAMES:
        assert distributed[f'coco/bbox_{name}'] == faster_metrics[f'coco/bbox_{name}']


def test_bad_dk_options_are_reported_by_train(shapes, configs, tmp_path):
    bad = tmp_path / 'bad_option.py'
    bad.write_text(f'_base_ = {configs["faster"]!r}\n'
                   "model = dict(backbone=dict(dcn=dict(offset_lr_mult=0.1)))\n")
    result = train(str(bad), str(tmp_path / 'work'), shapes[0], expect_success=False)
    assert result.returncode != 0
    assert ("DK got unknown option(s) ['offset_lr_mult']; the options of DK are "
            "['scope_size', 'kernel_offset_groups']") in result.stderr


def test_scope_smaller_than_kernel_fails_to_build(configs, tmp_path):
    bad = tmp_path / 'small_scope.py'
    bad.write_text(f'_base_ = {configs["faster"]!r}\n'
                   "model = dict(backbone=dict(dcn=dict(scope_size=2)))\n")
    cfg = load_config(str(bad))
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ValueError,
                           match=r'scope_size=\(2, 2\) must be at least kernel_size=\(3, 3\)'):
            MODELS.build(cfg.model)


def test_dk_on_basic_block_resnet_is_reported_by_train(configs, tmp_path, monkeypatch):
    bad = tmp_path / 'resnet18_dk.py'
    bad.write_text(f'_base_ = {configs["faster"]!r}\n'
                   'model = dict(backbone=dict(depth=18))\n')
    monkeypatch.setattr(sys, 'argv', [TRAIN, str(bad), '--work-dir', str(tmp_path / 'work')])
    with pytest.raises(ValueError, match='ResNet depth=18 is built from BasicBlocks, which take '
                       'no dcn'):
        runpy.run_path(TRAIN, run_name='__main__')


class RunsACommand:
    """Unpickling it would run a shell command: what weights_only loading must refuse."""

    def __reduce__(self):
        return (os.system, ('true', ))


def test_checkpoints_load_with_weights_only_and_untrusted_code_stays_refused(
        faster_run, tmp_path):
    checkpoint = osp.join(faster_run, f'iter_{MAX_ITERS}.pth')
    # In a fresh process, where nothing is allowlisted yet.
    load = f'import torch; torch.load({checkpoint!r})'
    list_needs = ('import json, torch; print(json.dumps(torch.serialization.'
                  f'get_unsafe_globals_in_checkpoint({checkpoint!r})))')
    refused = run([sys.executable, '-c', load], expect_success=False)
    assert refused.returncode != 0 and 'Unsupported global' in refused.stderr
    # What the file needs beyond torch's defaults is all on our list: no getattr, no function.
    needed = set(json.loads(run([sys.executable, '-c', list_needs]).stdout))
    allowed = {f'{item.__module__}.{item.__qualname__}' for item in CHECKPOINT_SAFE_GLOBALS}
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in needed
    assert needed <= allowed, needed - allowed
    # Importing the package, as a config's custom_imports does, is all it takes.
    run([sys.executable, '-c', f'import dk_mmdet; {load}'])

    untrusted = str(tmp_path / 'untrusted.pth')
    torch.save({'state_dict': {}, 'meta': RunsACommand()}, untrusted)
    with pytest.raises(pickle.UnpicklingError, match=rf'GLOBAL {os.system.__module__}\.system'):
        torch.load(untrusted)
