"""The ERF-scale slope over seeds: does a variant's ERF follow the object's size, beyond seed noise?

For every model, erf.py's measurement at each ground-truth object (the spread ``erf_radius`` of
the ERF of the unit at the box centre) and the least-squares slope of log(erf_radius) on
log(box_size) over the objects: one slope per seed. Per variant (the models given the same
NAME), the mean slope over its seeds, their standard deviation (n - 1) and the 95% Student t
interval of the mean, mean +- t(0.975, n - 1) * sd / sqrt(n); with ``--baseline``, each
variant's difference to the baseline variant paired by seed, d_k = slope_k - baseline_k, as its
mean and t interval (dk_mmdet/results/seed_statistics.py, as collect_results.py reports AP).

    python tools/analysis_tools/erf_seeds.py \\
        --model rigid configs/shapes/faster-rcnn_r50_fpn_shapes.py rigid/seed0/iter_800.pth \\
        --model rigid configs/shapes/faster-rcnn_r50_fpn_shapes.py rigid/seed1/iter_800.pth \\
        --model DK configs/shapes/faster-rcnn_r50-dk-c3-c5_fpn_shapes.py dk/seed0/iter_800.pth \\
        --model DK configs/shapes/faster-rcnn_r50-dk-c3-c5_fpn_shapes.py dk/seed1/iter_800.pth \\
        --baseline rigid --images data/shapes/val --layer backbone.layer3 --out erf_seeds_out

Seeds pair by the ``seed<k>`` folder in the checkpoint paths when every path has one (the
layout of a study, see docs/statistics.md), else by their order among the variant's
``--model`` options. Every model sees the same objects (``--max-images``, ``--max-objects``:
the first ones); one backward pass per object and model, one model in memory at a time.

Writes to ``--out``:

- ``erf_seeds.md`` and ``erf_seeds.csv``: per variant, the slopes of its seeds, their mean, sd
  and interval, and the paired difference to the baseline with its interval;
- ``erf_seed_slopes.csv``: per model, its slope (in full: the tables' means, sds and intervals
  are computed from these values), the correlation of the logs and the objects fitted;
- ``erf_objects.csv``: per model and object, erf.py's columns (``model``: the variant) and
  ``seed``;
- ``erf_gallery.png``: the first seed of each variant (rows) at ``--gallery-objects`` objects
  from the smallest to the largest (columns), drawn as erf.py draws them.
"""
import argparse
import csv
import importlib.util
import os
import os.path as osp
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

if importlib.util.find_spec('dk_mmdet') is None:
    # Run from a checkout without installing: use the repository's package.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import numpy as np  # noqa: E402

from dk_mmdet.analysis import ImageInput, default_ann_file, load_detector  # noqa: E402
from dk_mmdet.erf import (add_erf_arguments, check_erf_arguments, fit_log_log,  # noqa: E402
                          gallery_picks, object_erfs, object_row, select_images, write_csv)
from dk_mmdet.erf_figures import GalleryColumn, draw_erf_grid  # noqa: E402
from dk_mmdet.results.seed_statistics import (CONFIDENCE, MeanSd,  # noqa: E402
                                              PairedDifference, mean_interval,
                                              paired_difference)

SEED_FOLDER = re.compile(r'(?:^|[/\\])seed(\d+)(?:[/\\]|$)')
DIGITS = 3  # of the slopes in the tables


@dataclass(frozen=True)
class SeedCheckpoint:
    """One seed of a variant: its config and trained checkpoint."""
    variant: str
    seed: int
    config: str
    checkpoint: str


def seed_checkpoints(models: Sequence[Tuple[str, str, str]]) -> List[SeedCheckpoint]:
    """``--model NAME CONFIG CHECKPOINT`` options as checkpoints with a seed: the k of a seed<k>
    folder of the checkpoint path when every path has one, else the position among the
    models of the same NAME."""
    folders = [SEED_FOLDER.findall(checkpoint) for _, _, checkpoint in models]
    seeded, positions = [], {}
    for (variant, config, checkpoint), found in zip(models, folders):
        position = positions[variant] = positions.get(variant, -1) + 1
        seed = int(found[-1]) if all(folders) else position
        seeded.append(SeedCheckpoint(variant, seed, config, checkpoint))
    seen = {}
    for model in seeded:
        other = seen.setdefault((model.variant, model.seed), model)
        if other is not model:
            raise ValueError(f'--model {model.variant}: {other.checkpoint} and '
                             f'{model.checkpoint} are both seed {model.seed}')
    return seeded


def slopes_by_seed(rows: Sequence[dict]) -> Dict[str, Dict[int, dict]]:
    """{variant: {seed: fit_log_log of its objects}} from erf_objects.csv rows (the variant in
    'model', the seed in 'seed')."""
    groups: Dict[Tuple[str, int], List[dict]] = {}
    for row in rows:
        groups.setdefault((row['model'], row['seed']), []).append(row)
    fits: Dict[str, Dict[int, dict]] = {}
    for (variant, seed), group in groups.items():
        size = np.array([row['box_size'] for row in group], dtype=float)
        radius = np.array([row['erf_radius'] for row in group], dtype=float)
        fits.setdefault(variant, {})[seed] = fit_log_log(size, radius)
    return fits


@dataclass(frozen=True)
class VariantSlope:
    """A variant's slope over its seeds, and its paired difference to the baseline."""
    variant: str
    slopes: Dict[int, float]  # per seed with a slope
    spread: MeanSd
    low: Optional[float]  # the CONFIDENCE t interval of the mean; None for a single seed
    high: Optional[float]
    baseline: Optional[str] = None
    difference: Optional[PairedDifference] = None


def variant_slopes(slopes: Dict[str, Dict[int, Optional[float]]],
                   baseline: Optional[str] = None) -> List[VariantSlope]:
    """From {variant: {seed: slope or None}}, in that order; variants without any slope are
    left out. The baseline gets no difference to itself."""
    if baseline is not None and baseline not in slopes:
        raise ValueError(f'--baseline {baseline}: not a --model NAME (names: '
                         f'{", ".join(slopes)})')
    valid = {variant: {seed: slope for seed, slope in by_seed.items() if slope is not None}
             for variant, by_seed in slopes.items()}
    results = []
    for variant, by_seed in valid.items():
        if not by_seed:
            continue
        spread, low, high = mean_interval(list(by_seed.values()))
        paired = baseline is not None and variant != baseline
        results.append(VariantSlope(
            variant, by_seed, spread, low, high, baseline if paired else None,
            paired_difference(by_seed, valid[baseline]) if paired else None))
    return results


def _full(value: Optional[float]) -> str:
    """A float as Python writes it in full: what the tables' numbers are computed from."""
    return '' if value is None else repr(float(value))


def _number(value: Optional[float], sign: str = '') -> str:
    return '' if value is None else f'{value:{sign}.{DIGITS}f}'


def _interval(low: Optional[float], high: Optional[float], sign: str = '') -> str:
    return '-' if low is None else f'[{_number(low, sign)}, {_number(high, sign)}]'


def slopes_markdown(results: Sequence[VariantSlope], layer: str, mass: float,
                    objects: int) -> str:
    confidence = f'{CONFIDENCE:.0%}'
    baseline = next((result.baseline for result in results if result.baseline), None)
    header = ['variant', 'seeds', 'slope per seed', 'mean', 'sd', f'{confidence} t-interval']
    if baseline:
        header += [f'minus {baseline}, paired', f'{confidence} t-interval']
    lines = [f'## Slope of log ERF radius on log box size at {layer}', '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for result in results:
        cells = [result.variant, str(result.spread.count),
                 ', '.join(f'{seed}: {_number(slope)}' for seed, slope in
                           sorted(result.slopes.items())),
                 _number(result.spread.mean), _number(result.spread.sd) or '-',
                 _interval(result.low, result.high)]
        if baseline:
            difference = result.difference
            cells += ['-', '-'] if difference is None else [
                _number(difference.mean, '+') + ('' if difference.pairs == result.spread.count
                                                 else f' (n={difference.pairs})'),
                _interval(difference.low, difference.high, '+')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', f'Per seed: the least-squares slope of log(erf_radius) on log(box_size) over '
              f'the {objects} ground-truth objects of the images, where erf_radius is the '
              f'radius around the ERF\'s centroid holding {mass:.0%} of it and box_size the '
              'square root of the box area (slope 0: one ERF size for every object; 1: the '
              'ERF grows with the object). Mean and sd (n - 1) over the seeds, the interval '
              f'mean ± t(0.975, n - 1) sd / sqrt(n). Paired: the slope minus the baseline\'s '
              'on the same seed, over the seeds both have, with its t interval; it measures '
              'seed-to-seed variation only, on the same objects.', '']
    return '\n'.join(lines)


def write_slopes_csv(path: str, results: Sequence[VariantSlope]) -> None:
    confidence = f'ci{CONFIDENCE * 100:.0f}'
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['variant', 'seeds', 'slope_per_seed', 'mean', 'sd',
                         f'{confidence}_low', f'{confidence}_high', 'baseline', 'pairs',
                         'difference', f'difference_{confidence}_low',
                         f'difference_{confidence}_high'])
        for result in results:
            difference = result.difference
            writer.writerow([
                result.variant, result.spread.count,
                ' '.join(f'{seed}:{_number(slope)}' for seed, slope in
                         sorted(result.slopes.items())),
                _number(result.spread.mean), _number(result.spread.sd),
                _number(result.low), _number(result.high), result.baseline or '',
                difference.pairs if difference else '',
                _number(difference and difference.mean), _number(difference and difference.low),
                _number(difference and difference.high)])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', nargs=3, action='append', required=True,
                        metavar=('NAME', 'CONFIG', 'CHECKPOINT'),
                        help='one seed of the variant NAME; repeat for every seed and variant')
    parser.add_argument('--baseline', help='the variant NAME the others are compared with')
    add_erf_arguments(parser)
    args = parser.parse_args(argv)
    check_erf_arguments(parser, args)
    try:
        args.checkpoints = seed_checkpoints(args.model)
    except ValueError as error:
        parser.error(str(error))
    variants = list(dict.fromkeys(model.variant for model in args.checkpoints))
    if args.baseline is not None and args.baseline not in variants:
        parser.error(f'--baseline {args.baseline} is not a --model NAME (names: '
                     f'{", ".join(variants)})')
    return args


def main(argv=None) -> List[VariantSlope]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, seed_rows, gallery, images, picks = [], [], {}, None, None
    drawn = set()  # the variants in the gallery: their first seed
    for seed_checkpoint in args.checkpoints:
        model = load_detector(seed_checkpoint.config, seed_checkpoint.checkpoint,
                              args.cfg_options)
        image_input = ImageInput(model.cfg)
        if images is None:  # the first model's test annotations, unless --ann
            images = select_images(args.ann or default_ann_file(model.cfg), args.images,
                                   args.max_images, args.max_objects)
            picks = gallery_picks(images, args.gallery_objects)
        first_seed = seed_checkpoint.variant not in drawn
        drawn.add(seed_checkpoint.variant)
        model_rows = []
        for image_index, image in enumerate(images):
            rgb, items = object_erfs(model, image_input, image, args.layer, args.channel,
                                     args.mass)
            model_rows += [dict(object_row(seed_checkpoint.variant, image, item),
                                seed=seed_checkpoint.seed) for item in items]
            for pick in (picks if first_seed else []):
                if pick[0] == image_index:
                    column = gallery.setdefault(pick, GalleryColumn(image.name, {}, {}))
                    column.rgbs[seed_checkpoint.variant] = rgb
                    column.items[seed_checkpoint.variant] = items[pick[1]]
        rows += model_rows
        fit = slopes_by_seed(model_rows)[seed_checkpoint.variant][seed_checkpoint.seed]
        seed_rows.append(dict(variant=seed_checkpoint.variant, seed=seed_checkpoint.seed,
                              slope=_full(fit['slope']),
                              correlation=_number(fit['correlation']),
                              fitted_objects=fit['fitted_objects'],
                              config=seed_checkpoint.config,
                              checkpoint=seed_checkpoint.checkpoint))
    write_csv(osp.join(args.out, 'erf_objects.csv'), rows)
    write_csv(osp.join(args.out, 'erf_seed_slopes.csv'), seed_rows)
    fits = slopes_by_seed(rows)
    results = variant_slopes({variant: {seed: fit['slope'] for seed, fit in by_seed.items()}
                              for variant, by_seed in fits.items()}, args.baseline)
    with open(osp.join(args.out, 'erf_seeds.md'), 'w') as f:
        f.write(slopes_markdown(results, args.layer, args.mass,
                                sum(len(image.objects) for image in images)))
    write_slopes_csv(osp.join(args.out, 'erf_seeds.csv'), results)
    draw_erf_grid(osp.join(args.out, 'erf_gallery.png'),
                  f'ERF at {args.layer} (first seed of each variant), objects from small to '
                  'large', [gallery[pick] for pick in picks], args.mass)
    return results


if __name__ == '__main__':
    main()
