"""Latency statistics with the names vLLM's benchmarks use (median, p90, p99, ...)."""
from __future__ import annotations

import math
from statistics import fmean, median, pstdev
from typing import Iterable


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sample")
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict:
    """median/p90/p99/mean/std/min/max/n of a sample; n=0 gives None everywhere."""
    sample = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not sample:
        return {"median": None, "p90": None, "p99": None, "mean": None, "std": None,
                "min": None, "max": None, "n": 0}
    return {
        "median": median(sample),
        "p90": percentile(sample, 90),
        "p99": percentile(sample, 99),
        "mean": fmean(sample),
        "std": pstdev(sample) if len(sample) > 1 else 0.0,
        "min": min(sample),
        "max": max(sample),
        "n": len(sample),
    }


def ratio_spread(numerator: list[float], denominator: list[float]) -> dict:
    """Ratio of paired samples (same iteration index), summarized: the spread of the overhead."""
    pairs = [n / d for n, d in zip(numerator, denominator) if d]
    return summarize(pairs)
