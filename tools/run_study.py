"""The seeded comparison study on the shapes data (`make compare`): each conv variant of stages
c3-c5, two training protocols, several seeds, each model tested on val and test_hard, then the
tables of tools/analysis_tools/collect_results.py (mean ± sd, paired differences to rigid with
95% intervals, AP per deformation bin) per protocol.

    python tools/run_study.py [--root work_dirs/study] [--jobs 2] [--threads 1] [--dry-run]

Protocols (docs/shapes.md says why these schedules):

- ``finetune``, the paper's protocol in miniature. Stage 1 trains the rigid detector from
  scratch with the quickstart's schedule (configs/shapes, 800 iterations, seed 0): the
  "pretrained" model. Stage 2 starts every variant from that checkpoint through ``load_from``
  (each layer maps the rigid conv2 weights into itself as from an ImageNet checkpoint, offset
  generators start at zero, so every variant starts as the same function; mmcv's DCNv2 starts
  at half scale, its mask being sigmoid(0)) and trains ``FINETUNE`` iterations; rigid simply
  continues. Seed k fixes the data order and sampling of every variant's stage 2.
- ``scratch``: every variant from its own initialisation, which for seed k equals the rigid
  model's (tests/test_init_parity.py), with the quickstart's schedule cut to 600 iterations
  (at 300, every variant stayed near 3 val AP: too short to compare anything).

Each run is an ordinary work_dir, ``ROOT/<protocol>/<model>/seed<k>/``, trained by
tools/train.py from a config this script writes next to it (``ROOT/<protocol>/<model>/
<model>.py``: the configs/shapes variant plus the protocol's schedule), then tested by
tools/test.py on both splits with the detections kept for the per-bin tables. At the end, the
tables (``ROOT/<protocol>/results.{md,csv}``, every seed's values in
``ROOT/<protocol>/results_runs.csv``, the compact tables of docs/shapes.md in
``ROOT/summary.md``) and the slope of ERF radius on object size of
every fine-tuned Faster R-CNN (erf_seeds.py, ``ROOT/finetune/erf_seeds/``). Every finished step
is recorded in the run's ``study_stamp.json`` (commit, machine, threads, seconds) and skipped
the next time (the ERF step once its table exists); an interrupted training resumes from its
last checkpoint.
"""
import argparse
import csv
import dataclasses
import datetime
import importlib.util
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Tuple

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, REPO_ROOT)

from mmengine.config import Config  # noqa: E402

from dk_mmdet.results.shapes_study import (OFFSET_RUN_FIELDS, RIGID,  # noqa: E402
                                           offset_table, shapes_config_name, summary_tables,
                                           variant_label)

SHAPES_CONFIGS = osp.join(REPO_ROOT, 'configs', 'shapes')

DK_VARIANTS = ('r50-dk-c3-c5_fpn', 'r50-dk-global-c3-c5_fpn', 'r50-dk-dconv-c3-c5_fpn')
# mmcv's deformable convs: on a CPU one training iteration costs about 3-8x a rigid one, so they
# run only where the comparison needs them most, the Faster R-CNN fine-tuning.
MMCV_DCN_VARIANTS = ('r50-dconv-c3-c5_fpn', 'r50-mdconv-c3-c5_fpn')
BASELINES = ('faster-rcnn_r50_fpn_shapes', 'mask-rcnn_r50_fpn_shapes')
# The ERF analysis: the fine-tuned Faster R-CNNs, at the val objects, the units of stage c4.
ERF_LAYER = 'backbone.layer3'
ERF_MAX_OBJECTS = 100
OFFSET_IMAGES = 50  # val images over which the offsets' moves are averaged


@dataclass(frozen=True)
class Schedule:
    """Iterations, peak AdamW learning rate, linear warm-up; the rate drops 10x at ``step_at``
    of the schedule. With ``val_interval``, the run also evaluates on val every that many
    iterations: its learning curve. The offset generators (every parameter whose name holds
    ``offset``: DK's kernel and data offsets, mmcv's DCN offsets) learn at ``offset_lr_mult``
    times the rate, as mmdet's ``dcn_offset_lr_mult`` does for DCN."""
    iters: int
    lr: float
    warmup_iters: int
    warmup_start: float
    step_at: float = 0.8
    val_interval: Optional[int] = None
    offset_lr_mult: float = 1.0


@dataclass(frozen=True)
class Study:
    """What a study trains: its data, its schedules, and which variants of which detector each
    protocol compares (stage 1, the rigid "pretrained" model of every fine-tuned detector, is
    implied)."""
    name: str
    data_root: str  # make_shapes.py --out
    num_images: Tuple[int, int, int]  # train, val, test_hard
    stage1: Schedule
    finetune: Schedule
    scratch: Optional[Schedule]
    comparisons: Tuple[Tuple[str, str, Tuple[str, ...]], ...]  # (protocol, detector, variants)
    seeds: int


# The short-schedule study (docs/shapes.md, "The seeded study"): what a 2-core machine runs in
# about two hours, not converged.
SHORT = Study(
    name='short', data_root='data/shapes/', num_images=(400, 100, 100),
    stage1=Schedule(iters=800, lr=1e-3, warmup_iters=100, warmup_start=0.01),  # the quickstart's
    finetune=Schedule(iters=200, lr=3e-4, warmup_iters=20, warmup_start=0.1),
    scratch=Schedule(iters=600, lr=1e-3, warmup_iters=100, warmup_start=0.01),
    comparisons=(('finetune', 'faster-rcnn', (RIGID, *MMCV_DCN_VARIANTS, *DK_VARIANTS)),
                 ('finetune', 'mask-rcnn', (RIGID, *DK_VARIANTS)),
                 ('scratch', 'faster-rcnn', (RIGID, *DK_VARIANTS))),
    seeds=3)
# The study at convergence (docs/shapes.md, "The converged study"): five times the training
# images and val / test_hard splits five times as large (evaluation is cheap next to training),
# stage 1 and stage 2 each long enough that val AP plateaus (their curves show it), one rate
# drop at two thirds so that the last fifth of each schedule runs at the low rate. Fine-tuned
# Faster R-CNN only: rigid, the three DK variants and mmcv's DCNv2.
CONVERGED = Study(
    name='converged', data_root='data/shapes_large/', num_images=(2000, 500, 500),
    stage1=Schedule(iters=10000, lr=1e-3, warmup_iters=100, warmup_start=0.01, step_at=2 / 3,
                    val_interval=1000),
    finetune=Schedule(iters=3000, lr=3e-4, warmup_iters=100, warmup_start=0.1, step_at=2 / 3,
                      val_interval=500),
    scratch=None,
    comparisons=(('finetune', 'faster-rcnn',
                  (RIGID, 'r50-mdconv-c3-c5_fpn', *DK_VARIANTS)),),
    seeds=11)
STUDIES = {study.name: study for study in (SHORT, CONVERGED)}




def data_options(data_root: str, split: str) -> List[str]:
    """--cfg-options that test on ``split`` ('val' or 'test_hard') of the data in ``data_root``."""
    annotations = f'annotations/instances_{split}.json'
    return [f'test_dataloader.dataset.data_root={data_root}',
            f'test_dataloader.dataset.ann_file={annotations}',
            f'test_dataloader.dataset.data_prefix.img={split}/',
            f'test_evaluator.ann_file={data_root}{annotations}']


@dataclass(frozen=True)
class Run:
    protocol: str  # 'stage1', 'finetune' or 'scratch'
    model: str  # the configs/shapes name, e.g. faster-rcnn_r50-dk-c3-c5_fpn_shapes
    seed: int
    schedule: Schedule
    load_from: Optional['Run'] = None  # the stage-1 run whose last checkpoint starts this one
    data_root: str = SHORT.data_root

    def model_dir(self, root: str) -> str:
        return osp.join(root, self.protocol, self.model)

    def work_dir(self, root: str) -> str:
        return osp.join(self.model_dir(root), f'seed{self.seed}')

    def config_file(self, root: str) -> str:
        return osp.join(self.model_dir(root), f'{self.model}.py')

    def cost(self) -> float:
        """Relative cost, to start the longest runs of a protocol first."""
        slow = any(variant in self.model for variant in MMCV_DCN_VARIANTS)
        return self.schedule.iters * (8 if slow else 1) * (1.3 if 'mask' in self.model else 1)


def study_runs(study: Study, seeds: int) -> List[Run]:
    """Every run of the study, in the order they start: stage 1, then the comparisons in order
    of importance (if the machine is needed back, the main comparison is complete first), each
    longest run first."""
    detectors = dict.fromkeys(detector for protocol, detector, _ in study.comparisons
                              if protocol == 'finetune')
    stage1 = {detector: Run('stage1', shapes_config_name(detector, RIGID), 0, study.stage1,
                            data_root=study.data_root) for detector in detectors}
    runs = list(stage1.values())
    for protocol, detector, variants in study.comparisons:
        schedule, start = ((study.finetune, stage1[detector]) if protocol == 'finetune' else
                           (study.scratch, None))
        group = [Run(protocol, shapes_config_name(detector, variant), seed, schedule,
                     load_from=start, data_root=study.data_root)
                 for variant in variants for seed in range(seeds)]
        runs += sorted(group, key=Run.cost, reverse=True)
    return runs


def write_config(run: Run, root: str) -> str:
    """The configs/shapes variant with the run's schedule (and starting checkpoint)."""
    path = run.config_file(root)
    schedule = run.schedule
    base = osp.relpath(osp.join(SHAPES_CONFIGS, f'{run.model}.py'), osp.dirname(path))
    lines = [
        f'# Written by tools/run_study.py: the {run.protocol} protocol of the shapes study.',
        f"_base_ = '{base}'",
    ]
    if run.load_from is not None:
        start = last_checkpoint(run.load_from.work_dir(root))
        lines.append(f"load_from = '{osp.relpath(start, REPO_ROOT)}'")
    lines += [
        f'max_iters = {schedule.iters}',
        'train_cfg = dict(max_iters=max_iters'
        + (f', val_interval={schedule.val_interval})' if schedule.val_interval else ')'),
        f'optim_wrapper = dict(optimizer=dict(lr={schedule.lr}){offset_rate(schedule)})',
        'param_scheduler = [',
        f"    dict(type='LinearLR', start_factor={schedule.warmup_start}, by_epoch=False,",
        f'         begin=0, end={schedule.warmup_iters}),',
        f"    dict(type='MultiStepLR', by_epoch=False, begin=0, end={schedule.iters},",
        f'         milestones=[{round(schedule.iters * schedule.step_at)}], gamma=0.1),',
        ']',
        f'default_hooks = dict(checkpoint=dict(interval={checkpoint_interval(schedule)})'
        # val metrics logged at their training iteration (by default: at epoch 0, every one)
        + (', logger=dict(log_metric_by_epoch=False))' if schedule.val_interval else ')'),
    ]
    if run.data_root != SHORT.data_root:
        lines += [
            f"train_dataloader = dict(dataset=dict(data_root='{run.data_root}'))",
            f"test_dataloader = dict(dataset=dict(data_root='{run.data_root}'))",
            f"test_evaluator = dict(ann_file='{run.data_root}annotations/instances_val.json')",
        ]
    if schedule.val_interval:
        lines += val_loop_lines(run)
    os.makedirs(osp.dirname(path), exist_ok=True)
    text = '\n'.join(lines) + '\n'
    if not osp.exists(path) or open(path).read() != text:
        with open(path, 'w') as f:
            f.write(text)
    return path


def offset_rate(schedule: Schedule) -> str:
    """The optimiser's paramwise_cfg for ``offset_lr_mult``, if it is not 1."""
    if schedule.offset_lr_mult == 1:
        return ''
    return (", paramwise_cfg=dict(custom_keys={'offset': "
            f'dict(lr_mult={schedule.offset_lr_mult})}})')


def val_loop_lines(run: Run) -> List[str]:
    """Evaluation on val during training, for the learning curve: the variant's own test
    loader and evaluator on the run's data."""
    variant = Config.fromfile(osp.join(SHAPES_CONFIGS, f'{run.model}.py'))
    loader, evaluator = variant.test_dataloader.to_dict(), variant.test_evaluator.to_dict()
    loader['dataset']['data_root'] = run.data_root
    evaluator['ann_file'] = f'{run.data_root}annotations/instances_val.json'
    # _delete_: the base config has None for both
    return [f'val_dataloader = {dict(_delete_=True, **loader)!r}',
            f'val_evaluator = {dict(_delete_=True, **evaluator)!r}',
            "val_cfg = dict(_delete_=True, type='ValLoop')"]


def checkpoint_interval(schedule: Schedule) -> int:
    """A checkpoint at every evaluation, else four a run: a killed run resumes from there."""
    return schedule.val_interval or schedule.iters // 4


def last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        path = f.read().strip()
    return path if osp.isabs(path) else osp.join(REPO_ROOT, path)


def commit() -> str:
    result = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    return result.stdout.strip() or 'unknown'


def run_steps(run: Run, root: str, python: str, threads: int) -> None:
    """Train, test on val, test on test_hard and, for a fine-tuned dynamic variant, measure
    how far its offsets moved; each step once (the stamp records it)."""
    work_dir = run.work_dir(root)
    os.makedirs(work_dir, exist_ok=True)
    stamp_file = osp.join(work_dir, 'study_stamp.json')
    stamp = {'protocol': run.protocol, 'model': run.model, 'seed': run.seed,
             'schedule': vars(run.schedule), 'steps': {}}
    if osp.exists(stamp_file):
        with open(stamp_file) as f:
            stamp = json.load(f)
    config = write_config(run, root)
    seed_option = [f'randomness.seed={run.seed}']
    steps = [('train', ['tools/train.py', config, '--work-dir', work_dir, '--resume',
                        '--cfg-options', *seed_option])]
    for split in ('val', 'test_hard'):
        prefix = osp.join(work_dir, 'detections', split)
        steps.append((f'test_{split}', ['tools/test.py', config, None, '--work-dir', work_dir,
                                        '--cfg-options', *data_options(run.data_root, split),
                                        f'test_evaluator.outfile_prefix={prefix}']))
    if run.protocol == 'finetune' and variant_label(run.model) != 'rigid':
        steps.append(('offsets', [
            'tools/analysis_tools/offset_magnitudes.py', config, None,
            '--images', f'{run.data_root}val',
            '--ann', f'{run.data_root}annotations/instances_val.json',
            '--max-images', str(OFFSET_IMAGES), '--names', variant_label(run.model),
            '--out', osp.join(work_dir, 'offsets.csv')]))
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for name, arguments in steps:
        if name in stamp['steps']:
            continue
        arguments = [last_checkpoint(work_dir) if a is None else a for a in arguments]
        started = time.time()
        log(f'{run.protocol}/{run.model}/seed{run.seed}: {name}')
        with open(osp.join(work_dir, f'{name}.out'), 'w') as output:
            subprocess.run([python, *arguments], cwd=REPO_ROOT, env=environment, check=True,
                           stdout=output, stderr=subprocess.STDOUT)
        stamp['steps'][name] = {
            'finished': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'seconds': round(time.time() - started, 1), 'commit': commit(),
            'machine': f'{platform.node()} ({os.cpu_count()} cores)', 'threads': threads}
        with open(stamp_file, 'w') as f:
            json.dump(stamp, f, indent=1)


def log(message: str) -> None:
    print(f'[{datetime.datetime.now():%H:%M:%S}] {message}', flush=True)


def run_all(runs: List[Run], root: str, python: str, jobs: int, threads: int) -> List[str]:
    """Every run, ``jobs`` at a time, in the order given (a fine-tuning run waits for its
    stage 1); the failures."""
    failures = []
    finished = {run: threading.Event() for run in runs if run.protocol == 'stage1'}

    def attempt(run: Run) -> None:
        try:
            if run.load_from in finished:  # else stage 1 ran before (or --only left it out)
                finished[run.load_from].wait()
            run_steps(run, root, python, threads)
        except (subprocess.CalledProcessError, OSError) as error:
            failures.append(f'{run.work_dir(root)}: {error}')
            log(f'FAILED {run.work_dir(root)}: {error}')
        finally:
            if run in finished:
                finished[run].set()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(attempt, runs))
    return failures


def collect_arguments(runs: List[Run], root: str, protocol: str) -> List[str]:
    """collect_results.py for one protocol: the tables ROOT/<protocol>/results.{md,csv} and
    every seed's values, ROOT/<protocol>/results_runs.csv."""
    model_dirs = sorted({run.model_dir(root) for run in runs if run.protocol == protocol})
    out = osp.join(root, protocol, 'results')
    baselines = [name for name in BASELINES
                 if name in {osp.basename(model_dir) for model_dir in model_dirs}]
    return ['tools/analysis_tools/collect_results.py', *model_dirs, '--baseline', *baselines,
            '--out', f'{out}.md', '--csv', f'{out}.csv', '--runs-csv', f'{out}_runs.csv']


def collect(runs: List[Run], root: str, python: str) -> None:
    for protocol in dict.fromkeys(run.protocol for run in runs if run.protocol != 'stage1'):
        subprocess.run([python, *collect_arguments(runs, root, protocol)], cwd=REPO_ROOT,
                       check=True)


def learning_curves(runs: List[Run], root: str, python: str) -> None:
    """learning_curves.py on the runs that evaluated during training: stage 1 in
    ROOT/stage1/curves/, seed 0 of every fine-tuned variant in ROOT/finetune/curves/."""
    for protocol in ('stage1', 'finetune'):
        chosen = [run for run in runs if run.protocol == protocol and run.seed == 0
                  and run.schedule.val_interval]
        if chosen:
            names = [f"{run.model.split('_')[0]} {variant_label(run.model)}" for run in chosen]
            subprocess.run([python, 'tools/analysis_tools/learning_curves.py',
                            *[run.work_dir(root) for run in chosen], '--names', *names,
                            '--out', osp.join(root, protocol, 'curves')],
                           cwd=REPO_ROOT, check=True)


def collect_offsets(runs: List[Run], root: str) -> None:
    """Every fine-tuned run's offsets.csv in ROOT/finetune/offsets_runs.csv (with its seed), and
    their mean ± sd over seeds in ROOT/finetune/offsets.md."""
    rows = []
    for run in runs:
        path = osp.join(run.work_dir(root), 'offsets.csv')
        if run.protocol == 'finetune' and osp.exists(path):
            with open(path) as f:
                rows += [dict(row, model=run.model, seed=run.seed) for row in csv.DictReader(f)]
    if not rows:
        return
    with open(osp.join(root, 'finetune', 'offsets_runs.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=OFFSET_RUN_FIELDS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    with open(osp.join(root, 'finetune', 'offsets.md'), 'w') as f:
        f.write(offset_table(rows))


def erf_slopes(runs: List[Run], root: str, python: str, data_root: str) -> None:
    """erf_seeds.py on every fine-tuned Faster R-CNN: ROOT/finetune/erf_seeds/."""
    out = osp.join(root, 'finetune', 'erf_seeds')
    if osp.exists(osp.join(out, 'erf_seeds.md')):
        return
    models = []
    for run in runs:
        if run.protocol == 'finetune' and run.model.startswith('faster-rcnn'):
            models += ['--model', variant_label(run.model), run.config_file(root),
                       last_checkpoint(run.work_dir(root))]
    subprocess.run([python, 'tools/analysis_tools/erf_seeds.py', *models, '--baseline', 'rigid',
                    '--images', f'{data_root}val', '--layer', ERF_LAYER,
                    '--max-objects', str(ERF_MAX_OBJECTS),
                    '--out', out], cwd=REPO_ROOT, check=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--study', choices=sorted(STUDIES), default=SHORT.name,
                        help='the short-schedule study or the one at convergence')
    parser.add_argument('--root', help='where the runs go (default: work_dirs/<study name>)')
    parser.add_argument('--seeds', type=int, help="seeds per model (default: the study's)")
    parser.add_argument('--only', nargs='+', choices=('stage1', 'finetune', 'scratch'),
                        help='run only these protocols, and collect nothing')
    parser.add_argument('--offset-lr-mult', type=float,
                        help="the fine-tuning rate of the offset generators, times the model's "
                        "(default: the study's)")
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run')
    parser.add_argument('--python', default=sys.executable)
    parser.add_argument('--dry-run', action='store_true', help='list the runs and stop')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    study = STUDIES[args.study]
    if args.offset_lr_mult is not None:
        study = dataclasses.replace(study, finetune=dataclasses.replace(
            study.finetune, offset_lr_mult=args.offset_lr_mult))
    if not osp.exists(osp.join(REPO_ROOT, study.data_root, 'annotations',
                               'instances_test_hard.json')):
        sys.exit(f'run_study.py: no data in {study.data_root}; `make compare` generates it')
    root = args.root or osp.join('work_dirs', 'study' if study is SHORT else f'study_{study.name}')
    root = osp.join(REPO_ROOT, root) if not osp.isabs(root) else root
    runs = study_runs(study, args.seeds or study.seeds)
    if args.only:
        runs = [run for run in runs if run.protocol in args.only]
    if args.dry_run:
        for run in runs:
            print(run.work_dir(root), f'{run.schedule.iters} iterations',
                  f'from {run.load_from.work_dir(root)}' if run.load_from else '')
        return 0
    failures = run_all(runs, root, args.python, args.jobs, args.threads)
    if failures:
        print('failed runs:', *failures, sep='\n  ', file=sys.stderr)
        return 1
    if args.only:
        return 0
    collect(runs, root, args.python)
    with open(osp.join(root, 'summary.md'), 'w') as f:
        f.write(summary_tables(root))
    learning_curves(runs, root, args.python)
    collect_offsets(runs, root)
    erf_slopes(runs, root, args.python, study.data_root)
    return 0


if __name__ == '__main__':
    sys.exit(main())
