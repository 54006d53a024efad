"""Teacher-forced comparisons of scored sequences (pure; no model needed).

Every function takes lists of ScoredSequence-like objects (target_logprobs, top_ids,
top_logprobs), the same sequences scored twice, and compares them position by position.
"""
from __future__ import annotations

import math
from itertools import combinations

from .stats import percentile


def flat(scores) -> list[float]:
    return [lp for s in scores for lp in s.target_logprobs]


def delta(a, b) -> list[float]:
    """Per-position log-prob differences a - b of the same sequences."""
    fa, fb = flat(a), flat(b)
    if len(fa) != len(fb):
        raise ValueError(f"compared scorings have {len(fa)} and {len(fb)} positions")
    return [x - y for x, y in zip(fa, fb)]


def norm(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def rel_error(x: list[float], ref: list[float]) -> float | None:
    n = norm(ref)
    return None if n == 0 else norm([a - b for a, b in zip(x, ref)]) / n


def margins(scores) -> list[float]:
    """Per position: by how many nats the top token beats the runner-up."""
    return [(lp[0] - lp[1]) if len(lp) > 1 else math.inf
            for s in scores for lp in s.top_logprobs]


def top1(scores) -> list[int]:
    return [ids[0] for s in scores for ids in s.top_ids]


def confident_flips(a, b, reference, margin: float) -> tuple[int, int]:
    """(positions where a's and b's top-1 differ, positions counted): only positions where
    `reference` prefers its top token by at least `margin` nats count."""
    keep = [m >= margin for m in margins(reference)]
    flips = sum(x != y for x, y, k in zip(top1(a), top1(b), keep) if k)
    return flips, sum(keep)


def agreement(engine, reference, margin: float) -> dict:
    """Top-1 agreement and target log-prob error of engine vs reference (teacher-forced).
    `confident_top1_agreement` counts only positions where the reference prefers its top token
    by at least `margin` nats: a near-tie flips under any rounding, a wrong kernel flips
    confident positions too."""
    e1, r1 = top1(engine), top1(reference)
    flips, confident = confident_flips(engine, reference, reference, margin)
    diffs = [abs(d) for d in delta(engine, reference)]
    return {"top1_agreement": sum(a == b for a, b in zip(e1, r1)) / len(r1),
            "confident_top1_agreement": 1 - flips / confident if confident else None,
            "confident_positions": confident, "positions": len(r1),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs), "max_abs_logprob_diff": max(diffs)}


def noise_floor(scorings: dict[str, list], margin: float) -> dict:
    """The engine's own spread on identical inputs: the same sequences scored in several batch
    compositions (name -> scores). Pools |delta log-prob| over every pair of compositions and
    positions; `norm_max` is the largest L2 norm of one pair's delta vector (the yardstick for
    an effect), `confident_flip_rate` the share of confident positions whose top-1 changed
    between compositions."""
    if len(scorings) < 2:
        raise ValueError("a noise floor needs the same inputs scored at least twice")
    pooled, norms, flips, counted = [], [], 0, 0
    for (na, a), (nb, b) in combinations(scorings.items(), 2):
        d = delta(a, b)
        pooled += [abs(x) for x in d]
        norms.append(norm(d))
        f, c = confident_flips(a, b, a, margin)
        flips, counted = flips + f, counted + c
    return {"compositions": list(scorings), "pairs": len(norms), "positions": len(flat(
        next(iter(scorings.values())))), "p50": percentile(pooled, 50),
        "p99": percentile(pooled, 99), "max": max(pooled), "norm_max": max(norms),
        "confident_flips": flips, "confident_compared": counted,
        "confident_flip_rate": flips / counted if counted else 0.0}
