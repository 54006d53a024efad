"""Timing loop: warm-up, then interleaved repeats bounded by count and time.

Variants of one configuration (e.g. LoRA-enabled engine serving base requests vs the
adapter) run in one process and alternate every iteration, so that drift of a shared
machine does not masquerade as overhead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median

from .stats import ratio_spread, summarize


@dataclass
class RepeatPolicy:
    warmup: int = 1
    min_iterations: int = 3
    min_seconds: float = 1.0
    max_iterations: int = 50

    def done(self, iterations: int, elapsed: float) -> bool:
        if iterations >= self.max_iterations:
            return True
        return iterations >= self.min_iterations and elapsed >= self.min_seconds


def sample_from(timing, variant: str, batch: int, iteration: int) -> dict:
    ttft = median(timing.ttft_s)
    tpot = median(timing.tpot_s)
    return {
        "variant": variant, "batch": batch, "iteration": iteration,
        "e2e_s": timing.e2e_s, "ttft_s": ttft, "tpot_s": tpot,
        "prompt_tokens": timing.prompt_tokens, "output_tokens": timing.output_tokens,
        "output_tok_s": timing.output_tokens / timing.e2e_s,
        "prefill_tok_s": timing.prompt_tokens / ttft if ttft > 0 else None,
    }


def measure_batch(engine, prompts: list[list[int]], new_tokens: int,
                  variants: dict[str, list], policy: RepeatPolicy, batch: int):
    """Run every variant (name -> per-request adapter list) on one batch; return samples and
    the first request's output ids per variant."""
    batch_prompts = prompts[:batch]
    outputs = {}
    for name, adapters in variants.items():
        for _ in range(policy.warmup):
            warm = engine.generate(batch_prompts, new_tokens, adapters[:batch])
        outputs[name] = warm.output_token_ids[0] if policy.warmup else None
    samples, names = [], list(variants)
    start, iteration = time.perf_counter(), 0
    while not policy.done(iteration, time.perf_counter() - start):
        order = names[iteration % len(names):] + names[:iteration % len(names)]
        for name in order:
            timing = engine.generate(batch_prompts, new_tokens, variants[name][:batch])
            samples.append(sample_from(timing, name, batch, iteration))
            if outputs.get(name) is None:
                outputs[name] = timing.output_token_ids[0]
        iteration += 1
    return samples, outputs


METRIC_KEYS = ("ttft_s", "tpot_s", "e2e_s", "output_tok_s", "prefill_tok_s")


def summarize_runs(samples: list[dict]) -> list[dict]:
    runs = {}
    for s in samples:
        runs.setdefault((s["variant"], s["batch"]), []).append(s)
    out = []
    for (variant, batch), group in runs.items():
        row = {"variant": variant, "batch": batch, "status": "ok",
               "prompt_tokens": group[0]["prompt_tokens"],
               "output_tokens": group[0]["output_tokens"]}
        for key in METRIC_KEYS:
            row[key] = summarize(s[key] for s in group)
        out.append(row)
    return out


def paired_overhead(samples: list[dict], numerator: str, denominator: str) -> list[dict]:
    """Per batch: TPOT and e2e ratio of two interleaved variants, paired by iteration."""
    by_key = {(s["variant"], s["batch"], s["iteration"]): s for s in samples}
    batches = sorted({s["batch"] for s in samples})
    out = []
    for b in batches:
        its = sorted(i for (v, bb, i) in by_key if v == denominator and bb == b
                     and (numerator, b, i) in by_key)
        if not its:
            continue
        num = [by_key[(numerator, b, i)] for i in its]
        den = [by_key[(denominator, b, i)] for i in its]
        out.append({
            "batch": b, "numerator": numerator, "denominator": denominator,
            "tpot_ratio": ratio_spread([s["tpot_s"] for s in num], [s["tpot_s"] for s in den]),
            "e2e_ratio": ratio_spread([s["e2e_s"] for s in num], [s["e2e_s"] for s in den]),
            "ttft_ratio": ratio_spread([s["ttft_s"] for s in num], [s["ttft_s"] for s in den]),
        })
    return out
