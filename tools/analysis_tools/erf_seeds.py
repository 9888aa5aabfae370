"""The ERF-scale slope over seeds: does a variant's ERF follow the object's size, beyond seed noise?

For every model, erf.py's measurement at each ground-truth object (the spread ``erf_radius`` of
the ERF of the unit at the box centre) and the least-squares slope of log(erf_radius) on
log(box_size) over the objects: one slope per seed. Per variant (the models given the same
NAME), the mean slope over its seeds, their standard deviation (n - 1) and the 95% Student t
interval of the mean, mean +- t(0.975, n - 1) * sd / sqrt(n); with ``--baseline``, each
variant's difference to the baseline variant paired by seed, d_k = slope_k - baseline_k, as its
mean and t interval (seed_statistics.py's statistics, as collect_results.py reports AP).

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
- ``erf_seed_slopes.csv``: per model, its slope, the correlation of the logs and the objects
  fitted;
- ``erf_objects.csv``: per model and object, erf.py's columns (``model``: the variant) and
  ``seed``;
- ``erf_gallery.png``: the first seed of each variant (rows) at ``--gallery-objects`` objects
  from the smallest to the largest (columns), drawn as erf.py draws them.
"""
import argparse
import csv
import math
import os
import os.path as osp
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

TOOLS_DIR = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, TOOLS_DIR)  # the modules next to this one, also when it is loaded by path

import numpy as np  # noqa: E402

from erf import (GalleryColumn, add_common_arguments, check_common_arguments,  # noqa: E402
                 draw_erf_grid, fit_log_log, gallery_picks, object_erfs, object_row,
                 select_images, write_csv)
from seed_statistics import (CONFIDENCE, PairedDifference, Summary,  # noqa: E402
                             paired_difference, summarize, t_quantile)

# (erf puts the repository on the path when dk_mmdet is not installed)
from dk_mmdet.analysis import ImageInput, default_ann_file, load_detector  # noqa: E402

SEED_FOLDER = re.compile(r'(?:^|[/\\])seed(\d+)(?:[/\\]|$)')
DIGITS = 3  # of the slopes in the tables


@dataclass(frozen=True)
class SeedModel:
    variant: str
    seed: int
    config: str
    checkpoint: str


def seed_models(models: Sequence[Tuple[str, str, str]]) -> List[SeedModel]:
    """``--model NAME CONFIG CHECKPOINT`` options as models with a seed: the k of a seed<k>
    folder of the checkpoint path when every path has one, else the position among the
    models of the same NAME."""
    folders = [SEED_FOLDER.findall(checkpoint) for _, _, checkpoint in models]
    seeded, positions = [], {}
    for (variant, config, checkpoint), found in zip(models, folders):
        position = positions[variant] = positions.get(variant, -1) + 1
        seed = int(found[-1]) if all(folders) else position
        seeded.append(SeedModel(variant, seed, config, checkpoint))
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
    summary: Summary
    low: Optional[float]  # the CONFIDENCE t interval of the mean; None for a single seed
    high: Optional[float]
    baseline: Optional[str] = None
    difference: Optional[PairedDifference] = None


def mean_interval(values: Sequence[float]) -> Tuple[Summary, Optional[float], Optional[float]]:
    """Mean and sd of ``values`` with the CONFIDENCE Student t interval of the mean."""
    summary = summarize(values)
    if summary.sd is None:
        return summary, None, None
    half_width = (t_quantile((1 + CONFIDENCE) / 2, summary.seeds - 1) * summary.sd /
                  math.sqrt(summary.seeds))
    return summary, summary.mean - half_width, summary.mean + half_width


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
        summary, low, high = mean_interval(list(by_seed.values()))
        paired = baseline is not None and variant != baseline
        results.append(VariantSlope(
            variant, by_seed, summary, low, high, baseline if paired else None,
            paired_difference(by_seed, valid[baseline]) if paired else None))
    return results


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
        cells = [result.variant, str(result.summary.seeds),
                 ', '.join(f'{seed}: {_number(slope)}' for seed, slope in
                           sorted(result.slopes.items())),
                 _number(result.summary.mean), _number(result.summary.sd) or '-',
                 _interval(result.low, result.high)]
        if baseline:
            difference = result.difference
            cells += ['-', '-'] if difference is None else [
                _number(difference.mean, '+') + ('' if difference.pairs == result.summary.seeds
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
                result.variant, result.summary.seeds,
                ' '.join(f'{seed}:{_number(slope)}' for seed, slope in
                         sorted(result.slopes.items())),
                _number(result.summary.mean), _number(result.summary.sd),
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
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    try:
        args.seed_models = seed_models(args.model)
    except ValueError as error:
        parser.error(str(error))
    variants = list(dict.fromkeys(model.variant for model in args.seed_models))
    if args.baseline is not None and args.baseline not in variants:
        parser.error(f'--baseline {args.baseline} is not a --model NAME (names: '
                     f'{", ".join(variants)})')
    return args


def main(argv=None) -> List[VariantSlope]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, seed_rows, gallery, images, picks = [], [], {}, None, None
    drawn = set()  # the variants in the gallery: their first seed
    for model_spec in args.seed_models:
        model = load_detector(model_spec.config, model_spec.checkpoint, args.cfg_options)
        image_input = ImageInput(model.cfg)
        if images is None:  # the first model's test annotations, unless --ann
            images = select_images(args.ann or default_ann_file(model.cfg), args.images,
                                   args.max_images, args.max_objects)
            picks = gallery_picks(images, args.gallery_objects)
        first_seed = model_spec.variant not in drawn
        drawn.add(model_spec.variant)
        model_rows = []
        for image_index, image in enumerate(images):
            rgb, items = object_erfs(model, image_input, image, args.layer, args.channel,
                                     args.mass)
            model_rows += [dict(object_row(model_spec.variant, image, item),
                                seed=model_spec.seed) for item in items]
            for pick in (picks if first_seed else []):
                if pick[0] == image_index:
                    column = gallery.setdefault(pick, GalleryColumn(image.name, {}, {}))
                    column.rgbs[model_spec.variant] = rgb
                    column.items[model_spec.variant] = items[pick[1]]
        rows += model_rows
        fit = slopes_by_seed(model_rows)[model_spec.variant][model_spec.seed]
        seed_rows.append(dict(variant=model_spec.variant, seed=model_spec.seed,
                              slope=_number(fit['slope']),
                              correlation=_number(fit['correlation']),
                              fitted_objects=fit['fitted_objects'],
                              config=model_spec.config, checkpoint=model_spec.checkpoint))
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
