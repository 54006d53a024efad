"""Verdicts: measured scores + thresholds -> PASS / FAIL / N/A per check (pure, no model).

Every comparison of an engine with itself is judged against the engine's own noise floor, measured
in the same run on the same inputs (int4lora.compare.noise_floor): an effect counts only when it
clearly exceeds that spread, and "unchanged" means "within it". Checks have stable ids and a scope:
`base` checks gate speed rows of base requests, `adapter` checks gate rows that serve the adapter.

Limits (thresholds from the config):
- within noise:  |delta| <= max(control_max_logprob_diff, noise_k x floor max)
- an effect:     ||delta_adapter|| >= effect_over_noise_min x ||delta||_floor (largest pair norm)
- top-1 at confident positions (the reference prefers its top token by >= max(top1_margin,
  noise_k x floor max)): a zero-B control flips none; engine vs fp32 reference agree on >=
  kernel_top1_min of them.
"""
from __future__ import annotations

import math


def verdict(check_id: str, scope: str, title: str, value, op: str, limit, *,
            floor: float | None = None, reason: str = "", note: str = "") -> dict:
    """reason: why it failed (or why it was not measured), shown only then; note: always."""
    if value is None or limit is None:
        state, reason = "N/A", reason or "not measured"
    else:
        ok = value >= limit if op == ">=" else value <= limit
        state, reason = ("PASS", "") if ok else ("FAIL", reason)
    return {"check_id": check_id, "scope": scope, "check": title, "value": value, "op": op,
            "limit": limit, "floor": floor, "verdict": state, "reason": reason, "note": note}


def over_noise(effect: float, noise: float) -> float:
    """How many times the noise an effect is; a deterministic engine (noise 0) makes any non-zero
    effect infinitely clear and a zero effect none."""
    if noise > 0:
        return effect / noise
    return math.inf if effect > 0 else 0.0


def within_noise_limit(floor: dict, th: dict) -> float:
    return max(th["control_max_logprob_diff"], th["noise_k"] * floor["max"])


def confident_margin(floor: dict, th: dict) -> float:
    return max(th["top1_margin"], th["noise_k"] * floor["max"])


def coverage_checks(cov: dict, th: dict) -> list[dict]:
    why = "" if cov.get("storage_known") else "storage not inspectable for this engine"
    out = [verdict("base.coverage.linear", "base", "coverage: linear weights 4-bit",
                   cov.get("linear_share"), ">=", th["linear_4bit_min"],
                   reason=why or "linear weights are not stored in 4-bit")]
    if cov.get("moe"):
        share = cov.get("experts_share")
        out.append(verdict("base.coverage.experts", "base", "coverage: MoE expert weights 4-bit",
                           share, ">=", th["experts_4bit_min"], reason=why or
                           "experts stay in 16-bit: quantization missed the expert tensors"))
    return out


def applied_check(check_id: str, title: str, report: dict | None) -> dict:
    """Every tensor of the adapter file reached a module; unmatched ones are named."""
    if not report:
        return verdict(check_id, "adapter", title, None, ">=", 1.0,
                       reason="the engine cannot list which adapter tensors it applied")
    # names that reached the engine and names that matched nothing (HF: adapter tensors; vLLM:
    # the adapter's LoRA modules)
    unmatched = report["unmatched"]
    total = len(report["applied"]) + len(unmatched)
    share = (total - len(unmatched)) / total if total else 0.0
    named = ", ".join(unmatched[:3]) + (f" (+{len(unmatched) - 3} more)" if len(unmatched) > 3
                                        else "")
    return verdict(check_id, "adapter", title, share, ">=", 1.0,
                   reason=f"not applied: {len(unmatched)} of {total} adapter tensors (or modules) "
                          f"matched nothing in the engine: {named}" if unmatched else "")


def adapter_checks(m: dict, th: dict) -> list[dict]:
    floor = m["floor"]["base"]
    ad = m["adapter"]
    ratio = over_noise(ad["norm"], floor["norm_max"])
    agree = m["agreement"]
    return [
        applied_check("adapter.applied", "adapter: every adapter tensor reached a module",
                      ad.get("applied")),
        verdict("adapter.moves_logprobs", "adapter", "adapter: moves log-probs (max |delta|)",
                ad["max_abs_delta"], ">=", th["lora_min_logprob_change"], floor=floor["max"],
                reason="adapter had no effect: B zero or not applied"),
        verdict("adapter.effect_over_noise", "adapter",
                "adapter: effect / engine noise (L2 norms of delta log-prob)", ratio, ">=",
                th["effect_over_noise_min"], floor=floor["norm_max"],
                reason="adapter has no effect beyond engine noise"),
        verdict("adapter.agreement.top1", "adapter",
                "adapter: top-1 vs dequantized fp32 + PEFT (confident positions)",
                agree["adapter"]["confident_top1_agreement"], ">=", th["kernel_top1_min"],
                reason="the engine with the adapter disagrees with fp32 PEFT on confident tokens"),
        verdict("adapter.agreement.effect", "adapter",
                "adapter: effect rel. error vs fp32 PEFT", agree["effect_rel_error"], "<=",
                max(th["lora_delta_rel_err_max"], 2 * agree["base_noise"]),
                floor=agree["base_noise"],
                reason="the adapter's effect differs from fp32 PEFT's beyond the engine's error",
                note=f"limit = max({th['lora_delta_rel_err_max']}, 2 x the engine's base "
                     f"error in units of the effect, {agree['base_noise']:.3g})"),
    ]


def control_checks(m: dict, th: dict) -> list[dict]:
    floor, ctl = m["floor"]["base"], m["control"]
    limit = within_noise_limit(floor, th)
    flip_rate = ctl["flips"] / ctl["flips_compared"] if ctl["flips_compared"] else None
    return [
        applied_check("control.applied", "zero-B control: every tensor reached a module",
                      ctl.get("applied")),
        verdict("control.same_call", "adapter",
                "zero-B control vs base in the same call (max |delta|)", ctl["same_call_max"],
                "<=", limit, floor=floor["max"], reason="the LoRA path changes the output"),
        verdict("control.cross_call", "adapter",
                "zero-B control vs base in separate calls (max |delta|)", ctl["cross_call_max"],
                "<=", limit, floor=floor["max"], reason="the LoRA path changes the output"),
        verdict("control.top1", "adapter",
                "zero-B control keeps top-1 at confident positions (flip rate)", flip_rate, "<=",
                0.0, floor=floor["confident_flip_rate"],
                reason="the zero-B control changes confident tokens" if flip_rate is not None
                else "no position is confident beyond the engine's noise floor"),
    ]


def widest(*floors: dict | None) -> dict:
    """The larger spread of several noise floors (None: not measured)."""
    got = [f for f in floors if f]
    return {"max": max(f["max"] for f in got), "norm_max": max(f["norm_max"] for f in got)}


def multi_checks(m: dict, th: dict) -> list[dict]:
    """Copies in one batch against the base's floor and, where measured, the floor of one adapter
    in every slot of one batch (validate.py: twins): a batch of several active adapters is
    judged against the spread such batches have without any adapter crossing."""
    multi = m.get("multi")
    if not multi:
        return []
    floor = widest(m["floor"]["base"], m["floor"].get("multi"))
    return [
        verdict("multi.mixed_batch", "adapter",
                "adapter copies in one mixed batch vs each alone (max |delta|)",
                multi["mixed_max"], "<=", within_noise_limit(floor, th), floor=floor["max"],
                reason="adapters in one batch change each other's output"),
        verdict("multi.copies_differ", "adapter",
                "distinct adapter copies give distinct outputs (min pair L2 / noise)",
                over_noise(multi["copies_min_norm"], floor["norm_max"]), ">=",
                th["effect_over_noise_min"], floor=floor["norm_max"],
                reason="two different adapters gave the same output: one slot served both"),
    ]


def base_checks(m: dict, th: dict) -> list[dict]:
    real = m.get("real_weights", False)
    synthetic = "synthetic weights: quantization quality is not meaningful (reported, not judged)"
    return [
        verdict("base.agreement.top1", "base",
                "base: top-1 vs dequantized fp32 (confident positions)",
                m["agreement"]["base"]["confident_top1_agreement"], ">=", th["kernel_top1_min"],
                reason="the engine disagrees with its own weights in fp32 on confident tokens "
                       "(a wrong kernel or dequantization)"),
        verdict("base.quantization.top1", "base",
                "base: top-1 vs original weights (confident positions)",
                m["quantization"]["confident_top1_agreement"] if real else None, ">=",
                th["quant_top1_min"], reason="" if real else synthetic),
        verdict("base.quality.ppl_ratio", "base", "base: INT4 / original perplexity",
                m["quality"].get("ppl_ratio") if real else None, "<=", th["ppl_ratio_max"],
                reason="" if real else "synthetic weights: perplexity not applicable"),
    ]


def judge(m: dict, th: dict) -> list[dict]:
    """All checks of one validation, in report order."""
    return (coverage_checks(m["coverage"], th) + base_checks(m, th) + adapter_checks(m, th)
            + control_checks(m, th) + multi_checks(m, th))


def overall(checks: list[dict], scope: str | None = None) -> str:
    """PASS unless a check (of that scope, or any) failed."""
    relevant = [c for c in checks if scope is None or c["scope"] in ("base", scope)]
    return "FAIL" if any(c["verdict"] == "FAIL" for c in relevant) else "PASS"
