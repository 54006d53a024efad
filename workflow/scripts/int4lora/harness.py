"""Timing loop: warm-up until steady, then interleaved repeats bounded per variant.

Variants of one configuration (e.g. LoRA-enabled engine serving base requests vs the adapter) run in
one process and alternate every iteration, so that drift of a shared machine does not masquerade as
overhead. The statistical unit is one iteration (one batched generate call): the requests of a batch
share every decode step, so they are not independent samples; per-request times are kept raw.

- Warm-up per (variant, batch) until the engine compiled nothing during the last warm-up call and
  the last two calls agree within `steady_tolerance`, at least `warmup` and at most `max_warmup`
  calls (a run that never settles is recorded as such).
- Timed iterations continue until every variant has `min_iterations` clean samples and
  `min_seconds` of its own timed time, at most `max_iterations` iterations. A timed call during
  which the engine still compiled is kept in the raw samples, flagged, and excluded from the
  statistics (counted per row).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median

from .stats import ratio_spread, summarize

STEADY_TOLERANCE = 0.10


@dataclass
class RepeatPolicy:
    warmup: int = 1
    min_iterations: int = 10
    min_seconds: float = 1.0
    max_iterations: int = 50
    max_warmup: int = 10
    steady_tolerance: float = STEADY_TOLERANCE

    def __post_init__(self):
        if self.max_iterations < self.min_iterations:
            raise ValueError(f"max_iterations={self.max_iterations} is below "
                             f"min_iterations={self.min_iterations}")

    def done(self, clean: dict[str, int], seconds: dict[str, float], iterations: int) -> bool:
        if iterations >= self.max_iterations:
            return True
        return all(clean[v] >= self.min_iterations and seconds[v] >= self.min_seconds
                   for v in clean)


def compile_events(engine) -> int:
    """The engine's monotonic count of compile events (0 for engines that cannot tell)."""
    counter = getattr(engine, "compile_events", None)
    return int(counter()) if callable(counter) else 0


def _call(engine, prompts, new_tokens, adapters):
    before = compile_events(engine)
    timing = engine.generate(prompts, new_tokens, adapters)
    return timing, compile_events(engine) - before


def warm_up(engine, prompts, new_tokens, adapters, policy: RepeatPolicy) -> dict:
    """Warm one (variant, batch) up until steady; returns what happened and the first output."""
    e2e, compiles, first = [], [], None
    for i in range(policy.max_warmup):
        timing, compiled = _call(engine, prompts, new_tokens, adapters)
        first = first if first is not None else timing.output_token_ids[0]
        e2e.append(timing.e2e_s)
        compiles.append(compiled)
        settled = (len(e2e) >= 2 and compiled == 0
                   and abs(e2e[-1] - e2e[-2]) <= policy.steady_tolerance * min(e2e[-2:]))
        if i + 1 >= policy.warmup and settled:
            return {"calls": i + 1, "steady": True, "compile_events": sum(compiles),
                    "e2e_s": e2e, "first_output": first}
    return {"calls": len(e2e), "steady": False, "compile_events": sum(compiles), "e2e_s": e2e,
            "first_output": first}


def sample_from(timing, variant: str, batch: int, iteration: int, compiled: int) -> dict:
    ttft, tpot = median(timing.ttft_s), median(timing.tpot_s)
    engine_ttft = getattr(timing, "ttft_engine_s", None)
    return {
        "variant": variant, "batch": batch, "iteration": iteration,
        "e2e_s": timing.e2e_s, "ttft_s": ttft, "tpot_s": tpot,
        "ttft_engine_s": median(engine_ttft) if engine_ttft else None,
        "prompt_tokens": timing.prompt_tokens, "output_tokens": timing.output_tokens,
        "e2e_tok_s": timing.output_tokens / timing.e2e_s,
        "decode_tok_s": batch / tpot if tpot > 0 else None,
        "prefill_tok_s": timing.prompt_tokens / ttft if ttft > 0 else None,
        "request_ttft_s": list(timing.ttft_s), "request_tpot_s": list(timing.tpot_s),
        "compile_events": compiled, "excluded": "compiled during the call" if compiled else None,
    }


def measure_batch(engine, prompts: list[list[int]], new_tokens: int,
                  variants: dict[str, list], policy: RepeatPolicy, batch: int):
    """Run every variant (name -> per-request adapter list) on one batch. Returns the samples,
    the first request's output ids per variant and the warm-up record per variant."""
    batch_prompts = prompts[:batch]
    outputs, warmups = {}, {}
    for name, adapters in variants.items():
        warm = warm_up(engine, batch_prompts, new_tokens, adapters[:batch], policy)
        outputs[name] = warm.pop("first_output")
        warmups[name] = warm
    samples, names = [], list(variants)
    clean = dict.fromkeys(names, 0)
    seconds = dict.fromkeys(names, 0.0)
    iteration = 0
    while not policy.done(clean, seconds, iteration):
        order = names[iteration % len(names):] + names[:iteration % len(names)]
        for name in order:
            timing, compiled = _call(engine, batch_prompts, new_tokens, variants[name][:batch])
            samples.append(sample_from(timing, name, batch, iteration, compiled))
            seconds[name] += timing.e2e_s
            clean[name] += not compiled
        iteration += 1
    return samples, outputs, warmups


METRIC_KEYS = ("ttft_s", "ttft_engine_s", "tpot_s", "e2e_s", "e2e_tok_s", "decode_tok_s",
               "prefill_tok_s")


def summarize_runs(samples: list[dict]) -> list[dict]:
    runs = {}
    for s in samples:
        runs.setdefault((s["variant"], s["batch"]), []).append(s)
    out = []
    for (variant, batch), group in runs.items():
        kept = [s for s in group if not s.get("excluded")]
        row = {"variant": variant, "batch": batch, "status": "ok",
               "prompt_tokens": group[0]["prompt_tokens"],
               "output_tokens": group[0]["output_tokens"],
               "iterations": len(group), "excluded_compile": len(group) - len(kept)}
        for key in METRIC_KEYS:
            row[key] = summarize(s.get(key) for s in kept)
        out.append(row)
    return out


def paired_overhead(samples: list[dict], numerator: str, denominator: str) -> list[dict]:
    """Per batch: TPOT, e2e and TTFT ratio of two interleaved variants, paired by iteration (pairs
    with an excluded sample on either side are dropped)."""
    by_key = {(s["variant"], s["batch"], s["iteration"]): s for s in samples
              if not s.get("excluded")}
    out = []
    for b in sorted({s["batch"] for s in samples}):
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


def variants_for(adapter_names: list[str], multi: list[int], max_batch: int) -> dict:
    """Variant name -> per-request adapter list (None = base request) for the largest batch."""
    if not adapter_names:
        return {"base": [None] * max_batch}
    variants = {"lora-base": [None] * max_batch,
                "lora-adapter": [adapter_names[0]] * max_batch}
    for n in multi:
        if 1 < n <= len(adapter_names):
            variants[f"lora-x{n}"] = [adapter_names[i % n] for i in range(max_batch)]
    return variants


def variants_at(variants: dict, batch: int) -> tuple[dict, list[dict]]:
    """The variants that are what they say at this batch size: lora-xN needs batch >= N distinct
    requests. Returns (runnable, skipped rows with the reason)."""
    runnable, skipped = {}, []
    for name, adapters in variants.items():
        if name.startswith("lora-x") and batch < int(name.removeprefix("lora-x")):
            skipped.append({"variant": name, "batch": batch, "status": "not run",
                            "reason": f"{name} needs a batch of at least "
                                      f"{name.removeprefix('lora-x')} requests"})
        else:
            runnable[name] = adapters
    return runnable, skipped
