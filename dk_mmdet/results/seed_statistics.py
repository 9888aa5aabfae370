"""Statistics over seeds: the mean and standard deviation of one quantity, the Student t
interval of its mean, and the difference of two models paired by seed index.

Standard deviations use the n - 1 denominator. A paired difference is d_k = model_k -
baseline_k over the seeds both have, reported as the mean of d and its ``CONFIDENCE`` Student t
interval, mean +- t((1 + CONFIDENCE) / 2, n - 1) * sd(d) / sqrt(n). It measures seed-to-seed
variation only: every seed is tested on the same images.
"""
import math
import statistics
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from scipy.stats import t as student_t

CONFIDENCE = 0.95  # of every interval


@dataclass(frozen=True)
class MeanSd:
    """Mean and standard deviation (n - 1 denominator) of ``count`` values."""
    count: int
    mean: float
    sd: Optional[float]  # None for a single value


def mean_and_sd(values: Sequence[float]) -> MeanSd:
    return MeanSd(len(values), statistics.mean(values),
                  statistics.stdev(values) if len(values) > 1 else None)


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """Quantile of Student's t distribution (scipy, which mmdet requires)."""
    return float(student_t.ppf(probability, degrees_of_freedom))


def t_half_width(spread: MeanSd) -> float:
    """Half the width of the ``CONFIDENCE`` t interval of the mean; needs two values or more."""
    return (t_quantile((1 + CONFIDENCE) / 2, spread.count - 1) * spread.sd /
            math.sqrt(spread.count))


def mean_interval(values: Sequence[float]) -> Tuple[MeanSd, Optional[float], Optional[float]]:
    """Mean and sd of ``values`` with the ``CONFIDENCE`` t interval of the mean (None, None for
    a single value)."""
    spread = mean_and_sd(values)
    if spread.sd is None:
        return spread, None, None
    half_width = t_half_width(spread)
    return spread, spread.mean - half_width, spread.mean + half_width


@dataclass(frozen=True)
class PairedDifference:
    """Mean of model - baseline over the seed indices both have, with its CONFIDENCE interval."""
    pairs: int
    mean: float
    low: Optional[float]  # None for a single pair
    high: Optional[float]


def paired_difference(model: Dict[int, float],
                      baseline: Dict[int, float]) -> Optional[PairedDifference]:
    """From {seed index: value} of a model and of its baseline; None if no seed is in both."""
    seeds = sorted(model.keys() & baseline.keys())
    if not seeds:
        return None
    spread, low, high = mean_interval([model[k] - baseline[k] for k in seeds])
    return PairedDifference(spread.count, spread.mean, low, high)


def seeds_for_half_width(sd: float, half_width: float, most: int = 1000) -> int:
    """The fewest seeds n >= 2 whose ``CONFIDENCE`` t interval of a mean is at most
    ``half_width`` wide on each side when the values' sd is ``sd``: the smallest n with
    t((1 + CONFIDENCE) / 2, n - 1) * sd / sqrt(n) <= half_width."""
    if sd < 0 or half_width <= 0:
        raise ValueError(f'sd must be >= 0 and half_width > 0, got sd={sd}, '
                         f'half_width={half_width}')
    for count in range(2, most + 1):
        if t_half_width(MeanSd(count, 0.0, sd)) <= half_width:
            return count
    raise ValueError(f'more than {most} seeds needed for sd={sd}, half_width={half_width}')
