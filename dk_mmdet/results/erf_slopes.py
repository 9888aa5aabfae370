"""The ERF-scale slope over seeds (tools/analysis_tools/erf_seeds.py): which checkpoint is which
seed of which variant, one least-squares slope of log ERF radius on log box size per seed, and
per variant the slopes' mean, sd and 95% t interval with the difference to a baseline paired by
seed (dk_mmdet/results/seed_statistics.py), as Markdown and CSV tables.
"""
import csv
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dk_mmdet.erf import fit_log_log
from dk_mmdet.results.seed_statistics import (CONFIDENCE, MeanSd, PairedDifference,
                                              mean_interval, paired_difference)

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


def full_number(value: Optional[float]) -> str:
    """A float as Python writes it in full: what the tables' numbers are computed from."""
    return '' if value is None else repr(float(value))


def number(value: Optional[float], sign: str = '') -> str:
    return '' if value is None else f'{value:{sign}.{DIGITS}f}'


def _interval(low: Optional[float], high: Optional[float], sign: str = '') -> str:
    return '-' if low is None else f'[{number(low, sign)}, {number(high, sign)}]'


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
                 ', '.join(f'{seed}: {number(slope)}' for seed, slope in
                           sorted(result.slopes.items())),
                 number(result.spread.mean), number(result.spread.sd) or '-',
                 _interval(result.low, result.high)]
        if baseline:
            difference = result.difference
            cells += ['-', '-'] if difference is None else [
                number(difference.mean, '+') + ('' if difference.pairs == result.spread.count
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
                ' '.join(f'{seed}:{number(slope)}' for seed, slope in
                         sorted(result.slopes.items())),
                number(result.spread.mean), number(result.spread.sd),
                number(result.low), number(result.high), result.baseline or '',
                difference.pairs if difference else '',
                number(difference and difference.mean), number(difference and difference.low),
                number(difference and difference.high)])
