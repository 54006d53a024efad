"""Latency statistics with the names vLLM's benchmarks use (median, p90, p99, ...), honest about n.

- p90 is reported only from P90_MIN_N samples on, p99 from P99_MIN_N: below that a "p99" is the
  maximum under another name. min, median, max and n are always there.
- The median carries a 95% percentile-bootstrap confidence interval (seeded, so reruns of the
  aggregation give the same interval), from CI_MIN_N samples on.
- Paired ratios (LoRA overhead: adapter vs base requests of the same interleaved iteration) are
  summarised the same way: the median ratio and its bootstrap CI over the pairs.
"""
from __future__ import annotations

import math
import random
from statistics import fmean, median, pstdev
from typing import Iterable

P90_MIN_N = 10
P99_MIN_N = 100
CI_MIN_N = 5
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sample")
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bootstrap_ci(values: list[float], level: float = CI_LEVEL,
                 resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | tuple[None, None]:
    """Percentile-bootstrap CI of the median; (None, None) below CI_MIN_N samples."""
    n = len(values)
    if n < CI_MIN_N:
        return None, None
    rng = random.Random(seed)
    medians = sorted(median(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return percentile(medians, 100 * tail), percentile(medians, 100 * (1 - tail))


def _clean(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def summarize(values: Iterable[float | None]) -> dict:
    """median (with its CI), p90/p99 where n supports them, mean, std, min, max, n."""
    sample = _clean(values)
    n = len(sample)
    if not sample:
        return {"median": None, "ci_low": None, "ci_high": None, "p90": None, "p99": None,
                "mean": None, "std": None, "min": None, "max": None, "n": 0}
    low, high = bootstrap_ci(sample)
    return {
        "median": median(sample), "ci_low": low, "ci_high": high,
        "p90": percentile(sample, 90) if n >= P90_MIN_N else None,
        "p99": percentile(sample, 99) if n >= P99_MIN_N else None,
        "mean": fmean(sample), "std": pstdev(sample) if n > 1 else 0.0,
        "min": min(sample), "max": max(sample), "n": n,
    }


def ratio_spread(numerator: list[float], denominator: list[float]) -> dict:
    """Summary of paired ratios numerator[i] / denominator[i] (the same iteration's pair)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} numerators for {len(denominator)} denominators")
    return summarize(n / d for n, d in zip(numerator, denominator) if d)
