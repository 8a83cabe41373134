"""Paired statistics of a comparison: mean ± std, the paired difference and its 95% interval, a verdict.

No scipy: the Student t quantile comes from the closed-form t distribution function for an
integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4), inverted by bisection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

METHODS = ("t", "bootstrap")
METHOD_NAMES = {"t": "paired t", "bootstrap": "bootstrap percentile (10000 resamples of the seeds)"}


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with `df` (integer >= 1) degrees of freedom, t >= 0."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        # 1 + c²/2 + (1·3)/(2·4) c⁴ + ... up to c^(df-2)
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    # 2/π (θ + s·c (1 + (2/3) c² + (2·4)/(3·5) c⁴ + ... up to c^(df-3)))
    series = 0.0
    if df > 1:
        term = series = 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * series)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's T with an integer number of degrees of freedom."""
    mass = t_two_sided_mass(abs(t), df)
    return 0.5 + 0.5 * mass if t >= 0 else 0.5 - 0.5 * mass


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's T (e.g. t_quantile(0.975, 2) = 4.303), to about 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    target = 2.0 * p - 1.0  # the two-sided mass inside ±t
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < target:
        hi *= 2.0
    for _ in range(200):  # bisection: the mass is increasing in t
        mid = 0.5 * (lo + hi)
        if t_two_sided_mass(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


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
        half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
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
