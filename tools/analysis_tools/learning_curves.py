"""Learning curves of runs that evaluated on val during training, and whether each schedule
ran long enough: val box AP against iterations, with the gain of the last fifth.

    python tools/analysis_tools/learning_curves.py WORK_DIR [WORK_DIR ...] --out DIR \\
        [--names NAME ...]

Writes DIR/curves.png (one line per run, the last fifth of each schedule shaded), DIR/curves.csv
(every evaluation) and DIR/curves.md (per run: AP at 80% of the schedule, final AP, the gain and
whether it is below 0.5 AP; dk_mmdet/results/learning_curves.py). A run's schedule length is
its config's ``train_cfg.max_iters``.
"""
import argparse
import glob
import importlib.util
import os
import os.path as osp
import sys

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmengine.config import Config  # noqa: E402

from dk_mmdet.results.learning_curves import (BOX_AP, PLATEAU_GAIN, TAIL, plateau,  # noqa: E402
                                              read_curve, write_curve_csv)
from dk_mmdet.results.tables import markdown_table  # noqa: E402

HEADER = ('run', 'iterations', 'val AP at 80%', 'final val AP', 'gain of the last fifth',
          f'plateaued (gain < {PLATEAU_GAIN})')


def schedule_length(work_dir: str) -> int:
    """``train_cfg.max_iters`` of the run's config, as its latest start dumped it."""
    dumps = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'config.py')))
    if not dumps:
        raise FileNotFoundError(f'{work_dir} holds no */vis_data/config.py: not a work_dir of '
                                'tools/train.py')
    return Config.fromfile(dumps[-1]).train_cfg.max_iters


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR')
    parser.add_argument('--out', required=True, help='folder for curves.{png,csv,md}')
    parser.add_argument('--names', nargs='+', help='a name per WORK_DIR (default: the paths)')
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.work_dirs):
        parser.error(f'--names gives {len(args.names)} names for {len(args.work_dirs)} '
                     'WORK_DIRs')
    return args


def draw(path: str, curves: dict, lengths: dict) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        line, = axes.plot([e.iteration for e in curve], [100 * e.metrics[BOX_AP] for e in curve],
                          marker='o', markersize=3, label=name)
        axes.axvspan(lengths[name] * (1 - TAIL), lengths[name], color=line.get_color(),
                     alpha=0.08)
    axes.set_xlabel('iteration')
    axes.set_ylabel('val box AP')
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> str:
    args = parse_args(argv)
    names = args.names or args.work_dirs
    curves = {name: read_curve(work_dir) for name, work_dir in zip(names, args.work_dirs)}
    lengths = {name: schedule_length(work_dir) for name, work_dir in zip(names, args.work_dirs)}
    rows = []
    for name, curve in curves.items():
        verdict = plateau(curve, lengths[name])
        rows.append([name, str(verdict.iterations),
                     f'{100 * verdict.start.metrics[BOX_AP]:.1f} (iteration '
                     f'{verdict.start.iteration})',
                     f'{100 * verdict.end.metrics[BOX_AP]:.1f}', f'{verdict.gain:+.1f}',
                     'yes' if verdict.plateaued else '**no**'])
    os.makedirs(args.out, exist_ok=True)
    write_curve_csv(osp.join(args.out, 'curves.csv'), curves)
    draw(osp.join(args.out, 'curves.png'), curves, lengths)
    table = '\n'.join(markdown_table(HEADER, rows)) + '\n'
    with open(osp.join(args.out, 'curves.md'), 'w') as f:
        f.write(table)
    print(table)
    return table


if __name__ == '__main__':
    main()
