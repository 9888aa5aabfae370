"""Paper-style results table from mmdet work_dirs: COCO AP, parameters, MACs, training time;
over several seeds, means, standard deviations and paired differences with 95% intervals.

    python tools/analysis_tools/collect_results.py WORK_DIR [WORK_DIR ...] --out results.md \\
        [--csv results.csv] [--runs-csv runs.csv] [--input-size H W] [--baseline NAME ...] \\
        [--bins N]

One row per work_dir (the model; named after the work_dir) and evaluation split, read from
what mmengine writes for every run of tools/train.py and tools/test.py
(dk_mmdet/results/work_dirs.py says what is read, and how a split is named). AP values are
mmdet's CocoMetric (pycocotools) results, times 100, written with one decimal.

Columns besides AP: parameters; MACs of one test forward at the stated input size (see
dk_mmdet/results/complexity.py for what is counted, DK and DCN layers included);
training time per iteration, the median of the logged values.

Seeds. A WORK_DIR whose sub-folders are ``seed<k>/`` (k = 0, 1, ...) is one model trained
once per seed; given such WORK_DIRs (all seeded, or none), the tables report each metric's
mean and standard deviation over the seeds and, with ``--baseline``, each model's difference
to its baseline paired by seed index, with a 95% t-interval
(dk_mmdet/results/seed_statistics.py); ``--runs-csv`` writes every seed's value, from which the
summary can be recomputed. Where test runs wrote their detections on tools/data/make_shapes.py
ground truth, they also report the AP per bin of deformation
(dk_mmdet/results/deformation_bins.py).
"""
import argparse
import importlib.util
import os
import os.path as osp
import sys

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from dk_mmdet.results.complexity import measure_complexity  # noqa: E402
from dk_mmdet.results.study import read_study, run_values, study_rows  # noqa: E402
from dk_mmdet.results.study_tables import (study_markdown, write_run_values_csv,  # noqa: E402
                                           write_summary_csv)
from dk_mmdet.results.tables import (single_runs_markdown, table_rows,  # noqa: E402
                                     write_single_runs_csv)
from dk_mmdet.results.work_dirs import read_work_dir, seed_folders  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dirs', nargs='+', metavar='WORK_DIR',
                        help='work_dirs of tools/train.py and tools/test.py runs, one per model, '
                        'or folders of seed<k>/ work_dirs, one per model')
    parser.add_argument('--out', required=True, help='Markdown file to write')
    parser.add_argument('--csv', help='CSV file to write as well')
    parser.add_argument('--runs-csv',
                        help='seeded work_dirs: CSV file of every seed\'s value, one line per '
                        'model, seed, split and quantity')
    parser.add_argument('--input-size', nargs=2, type=int, metavar=('H', 'W'),
                        help='image size for the MACs (default: the test pipeline\'s Resize '
                        'scale, e.g. 800x1333 for mmdet\'s COCO configs)')
    parser.add_argument('--no-complexity', action='store_true',
                        help='skip parameters and MACs (which build and trace each model)')
    parser.add_argument('--baseline', nargs='+', default=[], metavar='NAME',
                        help='seeded work_dirs: the model(s) the others are compared with, '
                        'paired by seed index, one per detector type (e.g. '
                        'faster-rcnn_r50_fpn_shapes mask-rcnn_r50_fpn_shapes)')
    parser.add_argument('--bins', type=int, default=3,
                        help='seeded work_dirs: quantile bins per deformation attribute for the '
                        'AP per bin, from test runs that wrote their detections (0: none)')
    args = parser.parse_args(argv)
    if args.bins < 0:
        parser.error(f'--bins must be >= 0, got {args.bins}')
    return args


def write_single_runs(args) -> str:
    if args.baseline or args.runs_csv:
        raise ValueError('--baseline and --runs-csv are about seeds: they need work_dirs of '
                         'seed<k>/ folders')
    models = [read_work_dir(work_dir) for work_dir in args.work_dirs]
    if not args.no_complexity:
        for model in models:
            measure_complexity(model, args.input_size)
    header, rows = table_rows(models)
    text = single_runs_markdown(models, header, rows)
    if args.csv:
        write_single_runs_csv(args.csv, header, rows, models)
    return text


def write_study(args) -> str:
    models, baselines = read_study(args.work_dirs, args.baseline, args.bins)
    if not args.no_complexity:
        for model in models:
            measure_complexity(model.first, args.input_size)
    values = run_values(models)
    rows = study_rows(values, {name: baseline.name for name, baseline in baselines.items()})
    if args.csv:
        write_summary_csv(args.csv, rows)
    if args.runs_csv:
        write_run_values_csv(args.runs_csv, values)
    return study_markdown(models, rows, baselines)


def main(argv=None) -> str:
    args = parse_args(argv)
    seeded = [work_dir for work_dir in args.work_dirs if seed_folders(work_dir)]
    if seeded and len(seeded) < len(args.work_dirs):
        raise ValueError(f'some work_dirs hold seed<k>/ folders ({", ".join(seeded)}) and '
                         f'others do not: give either kind, not both')
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    text = write_study(args) if seeded else write_single_runs(args)
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)
    return text


if __name__ == '__main__':
    main()
