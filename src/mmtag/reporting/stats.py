"""Means over seeds and paired comparisons between variants run with the same seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# a paired difference whose two-sided p-value is below this reads as more than seed noise
ALPHA = 0.05


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value: no spread to measure)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


@dataclass
class Paired:
    """variant - baseline over the seeds both have."""

    n: int
    mean: float
    sd: float
    low: float     # 95 % confidence interval of the mean difference
    high: float
    p: float       # two-sided paired t-test; nan with fewer than 2 pairs or no spread

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return "one seed: no test"
        if self.sd == 0.0:
            return "identical on every seed" if self.mean == 0.0 else "the same on every seed"
        return "real difference" if self.p < ALPHA else "within seed noise"


def paired(variant: list[float], baseline: list[float]) -> Paired:
    """Paired t-test of `variant` against `baseline`, matched by position (the same seed)."""
    from scipy import stats

    d = np.asarray(variant, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # no spread: the t-test is undefined
        return Paired(n, mean, sd, mean, mean, math.nan)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    p = float(stats.ttest_rel(variant, baseline).pvalue)
    return Paired(n, mean, sd, mean - half, mean + half, p)
