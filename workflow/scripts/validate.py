"""Rule validate: is the speed number of this (model, engine, adapter) worth anything?

Checks, each a PASS/FAIL/N/A verdict with its measured value and threshold:
- coverage:  the share of linear and expert weights really stored in 4-bit
- lora:      the adapter changes greedy tokens and log-probs; its zero-B control does not
- agreement: the engine vs the dequantized form of its own weights in fp32 (base, and with
             the adapter through PEFT): top-1 agreement, log-prob error, and the error of the
             adapter's effect (delta of log-probs), which isolates LoRA from quantization
- quality:   perplexity of the original weights, INT4 and INT4+LoRA on a shipped text
             (real weights only; synthetic models get N/A)
"""

import math
import time

from int4lora.engines import make_engine
from int4lora.engines.hf_engine import HfEngine, load_model
from int4lora.resultio import new_result, recorded_failures, write_result
from int4lora.upstream import require_ok
from int4lora.workload import eval_sequences, fixed_length_prompts, load_prompts

CONTROL = "control-zero-b"


def verdict(check: str, value, threshold, op: str, reason: str = "") -> dict:
    if value is None or threshold is None:
        return {"check": check, "value": value, "threshold": threshold, "op": op,
                "verdict": "N/A", "reason": reason or "not measured"}
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"check": check, "value": value, "threshold": threshold, "op": op,
            "verdict": "PASS" if ok else "FAIL", "reason": reason}


def compare(engine_scores, ref_scores, margin: float) -> dict:
    """Top-1 agreement and target log-prob error of engine vs reference (teacher-forced).

    `confident_top1_agreement` counts only positions where the reference prefers its top
    token by at least `margin` nats: a near-tie flips under any rounding, a wrong kernel
    flips confident positions too.
    """
    agree, confident, diffs = [], [], []
    for e, r in zip(engine_scores, ref_scores):
        for et, rt, rlp in zip(e.top_ids, r.top_ids, r.top_logprobs):
            agree.append(et[0] == rt[0])
            if len(rlp) < 2 or rlp[0] - rlp[1] >= margin:
                confident.append(et[0] == rt[0])
        diffs += [abs(a - b) for a, b in zip(e.target_logprobs, r.target_logprobs)]
    return {"top1_agreement": sum(agree) / len(agree),
            "confident_top1_agreement": sum(confident) / len(confident) if confident else None,
            "confident_positions": len(confident), "positions": len(agree),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs), "max_abs_logprob_diff": max(diffs)}


def _flat(scores) -> list[float]:
    return [lp for s in scores for lp in s.target_logprobs]


def delta(with_adapter, base) -> list[float]:
    return [a - b for a, b in zip(_flat(with_adapter), _flat(base))]


def _norm(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def rel_error(x: list[float], ref: list[float]) -> float | None:
    norm = _norm(ref)
    if norm == 0:
        return None
    return _norm([a - b for a, b in zip(x, ref)]) / norm


def perplexity(scores) -> float:
    lps = [lp for s in scores for lp in s.target_logprobs]
    return math.exp(-sum(lps) / len(lps))


def score_all(engine, sequences, adapters: list[str | None], top_k: int) -> dict:
    return {a: engine.score(sequences, [a] * len(sequences), top_k) for a in adapters}


def reference_engine(backend: str, engine_cfg: dict, model_path: str, quant_path: str,
                     adapters: dict, device: str) -> HfEngine:
    """fp32 model holding the engine's own 4-bit weights, dequantized, with PEFT on top."""
    from int4lora.reference import dequantize_bnb_model, dequantized_compressed_model
    if backend == "hf" or engine_cfg.get("quantization") == "bitsandbytes":
        quantized = load_model(model_path, quantization="nf4", compute_dtype="float32",
                               device=device,
                               quantize_experts=engine_cfg.get("quantize_experts", True))
        base = dequantize_bnb_model(quantized)
    else:
        base = dequantized_compressed_model(quant_path, model_path, device)
    return HfEngine(model_path, quantization="none", compute_dtype="float32", device=device,
                    adapters=adapters, model=base)


def main(model: str, engine: str, engine_cfg: dict, adapter: str, model_json: str,
         quant_json: str, adapter_json: str, val_cfg: dict, device: str, output: str,
         log_path: str | None = None, config: dict | None = None) -> dict:
    started = time.time()
    result = new_result("validate", model, engine, adapter,
                        params={"validation": val_cfg, "engine": engine_cfg, "device": device})
    th = val_cfg["thresholds"]
    with recorded_failures(result):
        up = require_ok(fetch=model_json, quantize=quant_json, adapter=adapter_json)
        fetched, meta = up["fetch"]["metrics"], up["adapter"]["metrics"]
        model_path, quant_path = fetched["path"], up["quantize"]["metrics"]["path"]
        adapters = {adapter: meta["paths"][0], CONTROL: meta["control_path"]}
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_path)
        seqs = fixed_length_prompts(tok, load_prompts(), val_cfg["prompts"],
                                    val_cfg["prompt_tokens"])
        real = not fetched["synthetic"]
        ppl_seqs = eval_sequences(tok, val_cfg["perplexity"]["seq_len"],
                                  val_cfg["perplexity"]["max_sequences"]) if real else []
        names, k = [None, adapter, CONTROL], val_cfg["top_k"]
        backend = engine_cfg["backend"]

        eng = make_engine(backend, quant_path, engine_cfg, device=device, adapters=adapters,
                          enable_lora=True, max_lora_rank=meta["rank"], max_loras=2,
                          log_path=log_path)
        try:
            storage = eng.weight_storage() if hasattr(eng, "weight_storage") else None
            e_scores = score_all(eng, seqs, names, k)
            greedy = {a: eng.greedy(seqs, val_cfg["greedy_tokens"], [a] * len(seqs))
                      for a in names}
            e_ppl = {a: perplexity(eng.score(ppl_seqs, [a] * len(ppl_seqs), k))
                     for a in (None, adapter)} if real else {}
            engine_info = eng.info()
        finally:
            eng.close()

        ref = reference_engine(backend, engine_cfg, model_path, quant_path, adapters, device)
        try:
            r_scores = score_all(ref, seqs, [None, adapter], k)
        finally:
            ref.close()
        orig = HfEngine(model_path, quantization="none", compute_dtype="float32", device=device)
        try:
            o_scores = orig.score(seqs, [None] * len(seqs), k)
            o_ppl = perplexity(orig.score(ppl_seqs, [None] * len(ppl_seqs), k)) if real else None
        finally:
            orig.close()

        checks = []
        # coverage
        fams = (storage or {}).get("families", {})
        linear = [fams[f] for f in ("attention", "dense_mlp") if fams.get(f, {}).get("elements")]
        lin_share = (sum(f["elements_4bit"] for f in linear) / sum(f["elements"] for f in linear)
                     if linear else None)
        checks.append(verdict("coverage: linear weights 4-bit", lin_share,
                              th["linear_4bit_min"], ">=",
                              "" if storage else "storage not inspectable for this engine"))
        if fetched["moe"]:
            exp_share = fams.get("experts", {}).get("share_4bit") if storage else None
            reason = ("experts stay in 16-bit: quantization missed the fused expert tensors"
                      if exp_share is not None and exp_share < th["experts_4bit_min"] else "")
            checks.append(verdict("coverage: MoE expert weights 4-bit", exp_share,
                                  th["experts_4bit_min"], ">=", reason))
        # lora applied
        base_s, ad_s, ctl_s = e_scores[None], e_scores[adapter], e_scores[CONTROL]
        change = max(abs(d) for d in delta(ad_s, base_s))
        changed_tokens = sum(a != b for a, b in zip(greedy[adapter], greedy[None]))
        checks.append(verdict("lora: adapter moves log-probs (max |delta|)", change,
                              th["lora_min_logprob_change"], ">=",
                              "adapter had no effect: B zero or not applied"
                              if change < th["lora_min_logprob_change"] else ""))
        control_diff = max(abs(d) for d in delta(ctl_s, base_s))
        checks.append(verdict("lora: zero-B control leaves log-probs (max |delta|)",
                              control_diff, th["control_max_logprob_diff"], "<="))
        control_same = sum(a == b for a, b in zip(greedy[CONTROL], greedy[None])) / len(seqs)
        checks.append(verdict("lora: zero-B control keeps greedy tokens", control_same,
                              1.0, ">="))
        # agreement with the dequantized fp32 reference
        margin = th["top1_margin"]
        agree_base = compare(base_s, r_scores[None], margin)
        agree_ad = compare(ad_s, r_scores[adapter], margin)
        ref_delta = delta(r_scores[adapter], r_scores[None])
        lora_err = rel_error(delta(ad_s, base_s), ref_delta)
        # the engine's own numerical noise on the base, in units of the adapter's effect: a
        # correctly applied adapter cannot be expected to beat it, a misapplied one lands ~1+
        base_err = [a - b for a, b in zip(_flat(base_s), _flat(r_scores[None]))]
        base_noise = _norm(base_err) / max(_norm(ref_delta), 1e-12)
        lora_limit = max(th["lora_delta_rel_err_max"], 2 * base_noise)
        checks.append(verdict("agreement: base top-1 vs dequantized fp32 (confident positions)",
                              agree_base["confident_top1_agreement"], th["kernel_top1_min"],
                              ">="))
        checks.append(verdict("agreement: adapter top-1 vs dequantized fp32 + PEFT "
                              "(confident positions)", agree_ad["confident_top1_agreement"],
                              th["kernel_top1_min"], ">="))
        checks.append(verdict("agreement: adapter effect rel. error vs fp32 PEFT", lora_err,
                              lora_limit, "<=",
                              f"limit = max({th['lora_delta_rel_err_max']}, 2 x base noise "
                              f"{base_noise:.3g})"))
        quant_err = compare(base_s, o_scores, margin)
        checks.append(verdict("quantization: base top-1 vs original weights (confident)",
                              quant_err["confident_top1_agreement"] if real else None,
                              th["quant_top1_min"], ">=",
                              "" if real else "synthetic weights: quantization quality is "
                              "not meaningful (reported, not judged)"))
        quality = {}
        if real:
            quality = {"ppl_original": o_ppl, "ppl_int4": e_ppl[None],
                       "ppl_int4_lora": e_ppl[adapter], "ppl_ratio": e_ppl[None] / o_ppl,
                       "eval_tokens": sum(len(s) - 1 for s in ppl_seqs)}
        checks.append(verdict("quality: INT4 / original perplexity",
                              quality.get("ppl_ratio"), th["ppl_ratio_max"], "<=",
                              "" if real else "synthetic weights: perplexity not applicable"))
        failed = [c["check"] for c in checks if c["verdict"] == "FAIL"]
        agree_ad["adapter_effect_base_noise"] = base_noise
        result["metrics"] = {
            "verdict": "FAIL" if failed else "PASS", "failed": failed, "checks": checks,
            "coverage": storage, "agreement": {"base": agree_base, "adapter": agree_ad,
                                               "adapter_effect_rel_error": lora_err,
                                               "quantization": quant_err},
            "lora": {"max_abs_delta": change, "greedy_changed_prompts": changed_tokens,
                     "control_max_abs_delta": control_diff},
            "quality": quality, "adapter_targets": meta["targets"],
            "adapter_kind": "experts" if meta.get("target_parameters") else "attention",
            "synthetic": fetched["synthetic"], "moe": fetched["moe"],
            "engine_info": engine_info,
        }
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    sm = snakemake  # noqa: F821
    smk.run(sm, main, model=sm.wildcards.model, engine=sm.wildcards.engine,
            engine_cfg=sm.params.engine_cfg, adapter=sm.wildcards.adapter,
            model_json=sm.input.model, quant_json=sm.input.quant, adapter_json=sm.input.adapter,
            val_cfg=sm.params.validation, device=sm.params.device, output=sm.output[0],
            log_path=sm.log[0], config=sm.config)
