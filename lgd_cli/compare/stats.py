"""Paired statistics of a comparison: mean ± std, the paired difference and its 95% interval, a verdict."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from scipy.stats import t as student_t

METHODS = ("t", "bootstrap")
METHOD_NAMES = {"t": "paired t", "bootstrap": "bootstrap percentile (10000 resamples of the seeds)"}


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values, mean) if len(values) > 1 else None)


@dataclass(frozen=True)
class PairedDifference:
    """LGD − baseline over the seeds where both arms finished.

    Attributes:
        n: number of pairs.
        mean, std: of the per-seed differences (std None when n = 1).
        low, high: the 95% interval of the mean difference (None when n = 1).
        method: "t" or "bootstrap".
    """

    n: int
    mean: float
    std: Optional[float]
    low: Optional[float]
    high: Optional[float]
    method: str


def paired_difference(baseline: Sequence[float], lgd: Sequence[float], method: str = "t",
                      confidence: float = 0.95) -> PairedDifference:
    """The mean of lgd[i] − baseline[i] with a `confidence` interval.

    Args:
        baseline, lgd: one value per seed, in the same seed order (equal lengths >= 1).
        method: "t" (mean ± t_{(1+c)/2, n-1} · s / sqrt(n)) or "bootstrap" (percentile interval of
            the resampled mean difference; with 3 seeds it has only 10 distinct values and is too
            narrow, so "t" is the default).
    """
    if len(baseline) != len(lgd) or not baseline:
        raise ValueError("need one baseline and one LGD value per seed")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    diffs = [b2 - b1 for b1, b2 in zip(baseline, lgd)]
    n = len(diffs)
    mean, std = mean_std(diffs)
    if n == 1:
        return PairedDifference(n, mean, None, None, None, method)
    if method == "t":
        half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        return PairedDifference(n, mean, std, mean - half, mean + half, method)
    low, high = bootstrap_interval(diffs, confidence)
    return PairedDifference(n, mean, std, low, high, method)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values`, resampled with replacement (seeded: repeatable)."""
    x = torch.tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(x), (resamples, len(x)), generator=generator)
    means = x[index].mean(dim=1)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return low, high


def verdict(diff: PairedDifference, metric: str = "AP") -> str:
    """One plain sentence: helps (interval above 0), hurts (below 0), or no detectable difference."""
    if diff.low is None:
        return (f"one seed only: LGD − baseline = {diff.mean:+.2f} {metric}, no interval "
                f"(run --seeds 3 or more to know whether LGD helps)")
    interval = f"[{diff.low:+.2f}, {diff.high:+.2f}]"
    if diff.low > 0:
        return f"LGD helps by {diff.mean:.2f} {metric} {interval}"
    if diff.high < 0:
        return f"LGD hurts: {diff.mean:+.2f} {metric} {interval}"
    return f"no detectable difference: LGD − baseline = {diff.mean:+.2f} {metric} {interval}"
