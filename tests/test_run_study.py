"""tools/run_study.py: the study's runs, the configs it writes, that every fine-tuned variant
starts as the stage-1 rigid detector, that finished steps are stamped and skipped, and what it
collects; dk_mmdet/results/shapes_study.py: the compact tables."""
import json
import os
import os.path as osp
import stat
import statistics
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint

import dk_mmdet  # noqa: F401  (registers the DK layers)
from dk_mmdet.results import shapes_study
from mmdet_fixtures import build_with_seed
from tool_modules import load_tool
from tools.analysis_tools import collect_results
from work_dir_fixtures import read_csv, write_seeds

run_study = load_tool('run_study.py')

FINETUNE_MODELS = sorted({run.model for run in run_study.study_runs(run_study.SHORT, 3)
                          if run.protocol == 'finetune'})


def test_the_study_pairs_every_variant_with_its_rigid_baseline():
    runs = run_study.study_runs(run_study.SHORT, seeds=3)
    stage1 = [run for run in runs if run.protocol == 'stage1']
    assert [run.model for run in stage1] == list(run_study.BASELINES)
    per_model = {}
    for run in runs:
        per_model.setdefault((run.protocol, run.model), []).append(run.seed)
    finetune_faster = {model for protocol, model in per_model
                       if protocol == 'finetune' and model.startswith('faster')}
    assert len(finetune_faster) == 6  # rigid, DCN, DCNv2, DK, global DK, DK + DCN
    for (protocol, model), seeds in per_model.items():
        assert seeds == ([0] if protocol == 'stage1' else [0, 1, 2])
    for run in runs:
        if run.protocol == 'finetune':
            assert run.load_from.model.split('_')[0] == run.model.split('_')[0]
            assert run.load_from in stage1
        else:
            assert run.load_from is None


def test_the_converged_study_finetunes_five_faster_rcnn_variants_on_the_large_data():
    study = run_study.CONVERGED
    runs = run_study.study_runs(study, seeds=4)
    stage1, *finetune = runs
    assert (stage1.protocol, stage1.model, stage1.schedule) == (
        'stage1', run_study.BASELINES[0], study.stage1)
    assert {run.protocol for run in finetune} == {'finetune'}
    assert {shapes_study.variant_label(run.model) for run in finetune} == {
        'rigid', 'DCNv2', 'DK', 'DK-global', 'DK+DCN'}
    assert sorted(run.seed for run in finetune if 'dk-c3' in run.model) == [0, 1, 2, 3]
    assert {run.load_from for run in finetune} == {stage1}
    assert {run.data_root for run in runs} == {study.data_root} != {run_study.SHORT.data_root}
    # each schedule's last fifth runs at the low rate, so that a plateau there is meaningful
    assert study.stage1.step_at <= 0.8 and study.finetune.step_at <= 0.8


def test_a_converged_run_trains_and_evaluates_on_its_own_data(tmp_path):
    """The learning curve: val AP every val_interval iterations, on the study's val split."""
    stage1 = run_study.study_runs(run_study.CONVERGED, seeds=1)[0]
    schedule = stage1.schedule
    config = Config.fromfile(run_study.write_config(stage1, str(tmp_path)))
    data_root = run_study.CONVERGED.data_root
    assert config.train_dataloader.dataset.data_root == data_root
    assert config.train_dataloader.dataset.ann_file == 'annotations/instances_train.json'
    assert config.train_cfg.val_interval == schedule.val_interval
    assert config.val_cfg.type == 'ValLoop'
    val = config.val_dataloader.dataset
    assert (val.data_root, val.ann_file, val.data_prefix.img) == (
        data_root, 'annotations/instances_val.json', 'val/')
    assert val.pipeline == config.test_dataloader.dataset.pipeline
    assert config.val_evaluator.ann_file == data_root + 'annotations/instances_val.json'
    assert config.default_hooks.checkpoint.interval == schedule.val_interval
    assert config.default_hooks.logger.log_metric_by_epoch is False  # the curve's x: iterations
    _, steps = config.param_scheduler
    assert steps.milestones == [round(schedule.iters * 2 / 3)]
    # tools/test.py on test_hard reads the same data root
    options = dict(option.split('=', 1) for option in run_study.data_options(data_root,
                                                                             'test_hard'))
    assert options == {
        'test_dataloader.dataset.data_root': data_root,
        'test_dataloader.dataset.ann_file': 'annotations/instances_test_hard.json',
        'test_dataloader.dataset.data_prefix.img': 'test_hard/',
        'test_evaluator.ann_file': data_root + 'annotations/instances_test_hard.json'}


def test_offset_generators_can_learn_at_a_multiple_of_the_rate(tmp_path):
    """The multiplier reaches every offset generator's parameters and nothing else."""
    fake_stage1(str(tmp_path), run_study.BASELINES[0], str(tmp_path / 'stage1.pth'))
    run = finetune_run('faster-rcnn_r50-dk-dconv-c3-c5_fpn_shapes')
    assert 'paramwise_cfg' not in Config.fromfile(
        run_study.write_config(run, str(tmp_path))).optim_wrapper
    faster = run_study.dataclasses.replace(run, schedule=run_study.dataclasses.replace(
        run.schedule, offset_lr_mult=10.0))
    config = Config.fromfile(run_study.write_config(faster, str(tmp_path)))
    init_default_scope('mmdet')
    model = MODELS.build(config.model)
    wrapper = build_optim_wrapper(model, config.optim_wrapper)
    rates = {}
    for group in wrapper.optimizer.param_groups:
        for parameter in group['params']:
            rates[id(parameter)] = group['lr']
    for name, parameter in model.named_parameters():
        generator = 'kernel_offset_conv' in name or 'data_offset_conv' in name
        assert rates[id(parameter)] == pytest.approx(
            run.schedule.lr * (10 if generator else 1)), name


def fake_stage1(root, model, checkpoint):
    work_dir = run_study.Run('stage1', model, 0, run_study.SHORT.stage1).work_dir(root)
    os.makedirs(work_dir)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(checkpoint)


def finetune_run(model):
    stage1_model = run_study.BASELINES[0 if model.startswith('faster') else 1]
    return run_study.Run('finetune', model, 0, run_study.SHORT.finetune,
                         load_from=run_study.Run('stage1', stage1_model, 0, run_study.SHORT.stage1))


def test_written_config_is_the_variant_with_the_protocols_schedule(tmp_path):
    root = str(tmp_path)
    fake_stage1(root, run_study.BASELINES[0], str(tmp_path / 'iter_800.pth'))
    model = 'faster-rcnn_r50-dk-c3-c5_fpn_shapes'
    written = Config.fromfile(run_study.write_config(finetune_run(model), root))
    variant = Config.fromfile(osp.join(run_study.SHAPES_CONFIGS, f'{model}.py'))
    assert written.model == variant.model
    assert osp.abspath(osp.join(run_study.REPO_ROOT, written.load_from)) == str(
        tmp_path / 'iter_800.pth')
    schedule = run_study.SHORT.finetune
    assert written.train_cfg.max_iters == schedule.iters
    assert written.train_cfg.type == 'IterBasedTrainLoop'
    assert written.optim_wrapper.optimizer.lr == schedule.lr
    assert written.optim_wrapper.optimizer.type == 'AdamW'
    warmup, steps = written.param_scheduler
    assert (warmup.end, warmup.start_factor) == (schedule.warmup_iters, schedule.warmup_start)
    assert (steps.end, steps.milestones) == (schedule.iters, [int(schedule.iters * 0.8)])
    scratch = run_study.Run('scratch', model, 1, run_study.SHORT.scratch)
    assert Config.fromfile(run_study.write_config(scratch, root)).load_from is None


@pytest.mark.parametrize('model', FINETUNE_MODELS)
def test_every_finetuned_variant_starts_as_the_stage1_detector(model, tmp_path):
    """load_from maps the rigid checkpoint into each layer: same features (DCNv2: half)."""
    root = str(tmp_path)
    run = finetune_run(model)
    rigid_cfg = Config.fromfile(osp.join(run_study.SHAPES_CONFIGS, f'{run.load_from.model}.py'))
    rigid = build_with_seed(rigid_cfg.model)
    torch.manual_seed(1)  # a trained model: BatchNorm statistics away from (0, 1)
    for module in rigid.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
    checkpoint = str(tmp_path / 'iter_800.pth')
    torch.save({'state_dict': rigid.state_dict(), 'meta': {}}, checkpoint)
    fake_stage1(root, run.load_from.model, checkpoint)

    config = Config.fromfile(run_study.write_config(run, root))
    variant = build_with_seed(config.model)
    # as mmengine's Runner does for load_from
    load_checkpoint(variant, osp.join(run_study.REPO_ROOT, config.load_from),
                    map_location='cpu', strict=False)

    image = torch.randn(1, 3, 128, 128)  # mmcv's DCN needs stage c5 at least 3x3
    with torch.no_grad():
        if 'mdconv' in model:  # mmcv's DCNv2 starts with mask sigmoid(0) = 1/2 in every tap
            rigid_conv2 = rigid.backbone.layer2[1].conv2
            variant_conv2 = variant.backbone.layer2[1].conv2
            probe = torch.randn(1, rigid_conv2.in_channels, 16, 16)
            torch.testing.assert_close(variant_conv2(probe), rigid_conv2(probe) / 2,
                                       rtol=1e-4, atol=1e-5)
            return
        for rigid_level, variant_level in zip(rigid.extract_feat(image),
                                              variant.extract_feat(image)):
            torch.testing.assert_close(variant_level, rigid_level, rtol=1e-4, atol=1e-5)


STUB_PYTHON = """#!{python}
# Stands in for the Python interpreter: records each tool call; fails when FAIL_STEP names it.
import json, os, sys
tool, config = sys.argv[1], sys.argv[2]
work_dir = sys.argv[sys.argv.index('--work-dir') + 1] if '--work-dir' in sys.argv else None
with open(os.environ['CALLS'], 'a') as f:
    f.write(json.dumps(sys.argv[1:]) + '\\n')
if os.environ.get('FAIL_STEP') and os.environ['FAIL_STEP'] in ' '.join(sys.argv[1:]):
    sys.exit(3)
if tool.endswith('train.py'):
    with open(os.path.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(os.path.join(work_dir, 'iter_400.pth'))
"""


def write_stub_python(tmp_path, monkeypatch):
    """STUB_PYTHON as an executable, and the file where it records its calls."""
    stub = tmp_path / 'python'
    stub.write_text(STUB_PYTHON.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / 'calls.jsonl'
    monkeypatch.setenv('CALLS', str(calls))
    return stub, calls


def test_finished_steps_are_stamped_and_skipped(tmp_path, monkeypatch):
    stub, calls = write_stub_python(tmp_path, monkeypatch)
    root = str(tmp_path / 'study')
    run = run_study.Run('scratch', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes', 2,
                        run_study.SHORT.scratch)

    def called():
        return [json.loads(line) for line in calls.read_text().splitlines()] \
            if calls.exists() else []

    monkeypatch.setenv('FAIL_STEP', 'instances_test_hard')  # the test_hard test fails
    with pytest.raises(subprocess.CalledProcessError):
        run_study.run_steps(run, root, str(stub), threads=1)
    first = called()
    assert [call[0] for call in first] == ['tools/train.py', 'tools/test.py', 'tools/test.py']
    train, test_val, test_hard = first
    assert ['--resume', '--cfg-options', 'randomness.seed=2'] == train[4:]
    work_dir = run.work_dir(root)
    assert test_val[1] == train[1] == run.config_file(root)
    assert test_val[2] == osp.join(work_dir, 'iter_400.pth')
    assert f'test_evaluator.outfile_prefix={work_dir}/detections/val' in test_val
    assert f'test_evaluator.outfile_prefix={work_dir}/detections/test_hard' in test_hard
    stamp = json.load(open(osp.join(work_dir, 'study_stamp.json')))
    assert set(stamp['steps']) == {'train', 'test_val'}
    assert stamp['steps']['train']['threads'] == 1 and stamp['seed'] == 2

    monkeypatch.delenv('FAIL_STEP')
    run_study.run_steps(run, root, str(stub), threads=1)  # only the failed step runs again
    assert called()[len(first):] == [test_hard]
    run_study.run_steps(run, root, str(stub), threads=1)  # nothing left to do
    assert len(called()) == len(first) + 1
    stamp = json.load(open(osp.join(work_dir, 'study_stamp.json')))
    assert set(stamp['steps']) == {'train', 'test_val', 'test_test_hard'}


RESULTS_CSV = """split,task,metric,bin,ground_truths,model,seeds,mean,sd,baseline,pairs,difference,ci95_low,ci95_high
val,bbox,AP,,,faster-rcnn_r50_fpn_shapes,3,23.6,0.3,,,,,
val,bbox,AP,,,faster-rcnn_r50-dk-c3-c5_fpn_shapes,3,24.1,0.5,faster-rcnn_r50_fpn_shapes,3,0.5,-0.7,1.7
val,bbox,AP50,,,faster-rcnn_r50-dk-c3-c5_fpn_shapes,3,50.0,0.5,faster-rcnn_r50_fpn_shapes,3,9.9,9.0,9.9
val,bbox,AP,size < 30,116,faster-rcnn_r50-dk-c3-c5_fpn_shapes,3,1.0,0.1,faster-rcnn_r50_fpn_shapes,3,9.9,9.0,9.9
test_hard,bbox,AP,,,faster-rcnn_r50_fpn_shapes,3,11.0,0.2,,,,,
test_hard,bbox,AP,,,faster-rcnn_r50-dk-c3-c5_fpn_shapes,3,10.0,0.4,faster-rcnn_r50_fpn_shapes,3,-1.0,-1.9,-0.1
"""


def test_summary_tables_hold_ap_and_paired_differences(tmp_path):
    for protocol in ('finetune', 'scratch'):
        (tmp_path / protocol).mkdir()
        (tmp_path / protocol / 'results.csv').write_text(
            RESULTS_CSV if protocol == 'finetune' else RESULTS_CSV.split('\n')[0] + '\n')
    lines = shapes_study.summary_tables(str(tmp_path)).splitlines()
    assert lines[0] == 'finetune, faster-rcnn, bbox AP:'
    assert lines[4] == '| rigid | 3 | 23.6 ± 0.3 |  | 11.0 ± 0.2 |  |'
    # AP only (not AP50, not a bin); the difference with its interval, signed, in bold when
    # the interval excludes 0
    assert lines[5] == ('| DK | 3 | 24.1 ± 0.5 | +0.5 [-0.7, +1.7] | 10.0 ± 0.4 | '
                        '**-1.0 [-1.9, -0.1]** |')
    assert len(lines) == 6  # no scratch rows, no Mask R-CNN table


def test_collect_writes_every_seeds_value_beside_the_tables(tmp_path):
    root = str(tmp_path)
    models = (run_study.BASELINES[0], 'faster-rcnn_r50-dk-c3-c5_fpn_shapes')
    runs = [run_study.Run('scratch', model, seed, run_study.SHORT.scratch)
            for model in models for seed in range(2)]
    write_seeds(runs[0].model_dir(root), [0.40, 0.41])
    write_seeds(runs[2].model_dir(root), [0.43, 0.42])
    arguments = run_study.collect_arguments(runs, root, 'scratch')
    assert arguments[0] == 'tools/analysis_tools/collect_results.py'
    # the arguments as run_study passes them; the MACs need real configs, these have none
    collect_results.main(arguments[1:] + ['--no-complexity'])
    values = {(row['model'], row['seed']): float(row['value'])
              for row in read_csv(osp.join(root, 'scratch', 'results_runs.csv'))
              if row['metric'] == 'AP'}
    assert values == {(models[0], '0'): 40.0, (models[0], '1'): 41.0,
                      (models[1], '0'): 43.0, (models[1], '1'): 42.0}
    summary = read_csv(osp.join(root, 'scratch', 'results.csv'))
    assert {(row['model'], row['metric'], row['baseline']) for row in summary
            } >= {(models[1], 'AP', models[0])}


def test_a_finetuned_dynamic_variant_measures_its_offsets_and_rigid_does_not(tmp_path,
                                                                             monkeypatch):
    stub, calls = write_stub_python(tmp_path, monkeypatch)
    root = str(tmp_path / 'study')
    stage1, *finetune = run_study.study_runs(run_study.CONVERGED, seeds=1)
    fake_stage1(root, stage1.model, str(tmp_path / 'stage1.pth'))
    for run in finetune:
        run_study.run_steps(run, root, str(stub), threads=1)
    called = [json.loads(line) for line in calls.read_text().splitlines()]
    offsets = [call for call in called if call[0].endswith('offset_magnitudes.py')]
    assert len(offsets) == len(finetune) - 1  # every variant but rigid
    dk = next(run for run in finetune if run.model == 'faster-rcnn_r50-dk-c3-c5_fpn_shapes')
    call = next(call for call in offsets if call[1] == dk.config_file(root))
    assert call[2] == osp.join(dk.work_dir(root), 'iter_400.pth')  # its last checkpoint
    assert call[call.index('--images') + 1] == 'data/shapes_large/val'
    assert call[call.index('--out') + 1] == osp.join(dk.work_dir(root), 'offsets.csv')


def test_offsets_are_collected_per_seed_and_summarised_over_seeds(tmp_path):
    root = str(tmp_path)
    runs = [run_study.Run('finetune', 'faster-rcnn_r50-dk-c3-c5_fpn_shapes', seed,
                          run_study.CONVERGED.finetune) for seed in range(3)]
    moves = {0: (0.10, 0.40), 1: (0.20, 0.50), 2: (0.30, 0.90)}
    for run in runs:
        os.makedirs(run.work_dir(root))
        with open(osp.join(run.work_dir(root), 'offsets.csv'), 'w') as f:
            f.write('model,stage,kind,mean_move,images\n' + ''.join(
                f'DK,{stage},kernel,{move},50\n'
                for stage, move in zip(('c3', 'c5'), moves[run.seed])))
    run_study.collect_offsets(runs, root)
    rows = read_csv(osp.join(root, 'finetune', 'offsets_runs.csv'))
    assert [(row['seed'], row['stage'], row['mean_move']) for row in rows] == [
        (str(seed), stage, str(move)) for seed in range(3)
        for stage, move in zip(('c3', 'c5'), moves[seed])]
    assert rows[0]['model'] == 'faster-rcnn_r50-dk-c3-c5_fpn_shapes'
    table = open(osp.join(root, 'finetune', 'offsets.md')).read()
    c5 = [0.40, 0.50, 0.90]
    assert (f'| DK | kernel offsets (scope cells) | 3 | 0.200 ± 0.100 | '
            f'{statistics.mean(c5):.3f} ± {statistics.stdev(c5):.3f} |') in table
