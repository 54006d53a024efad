"""Rule validate: is the speed number of this (model, engine, adapter) worth anything?

The engine runs with the same arguments as the timed one (LoRA slots, wrapped modules, kernel,
tuned configs), and every comparison is judged against its own noise floor, measured here on the
same inputs (int4lora.judge explains the limits). Measured:
- noise floor: base sequences scored in several batch compositions (uniform, reversed, one at a
  time, mixed with adapter requests, beside a zero-B control in one call), and the adapter's
  sequences likewise; per-position |delta log-prob| p50 / p99 / max and confident top-1 flips;
- coverage: the share of linear and expert weights really stored in 4-bit;
- lora: which adapter tensors reached a module; the adapter's effect against the floor; a zero-B
  control in the same call and in separate calls; copies in one mixed batch where lora-xN is timed,
  judged against a floor of their own: one adapter loaded under as many LoRA ids as the mixed
  batch has copies, all of them in one batch ("twins"), against that adapter alone. Several
  active adapters change the LoRA kernels' launch (vLLM's Punica shrink sums split-K partials
  with atomics), which no single-adapter composition shows;
- agreement: the engine vs the dequantized form of its own weights in fp32 (base, and with the
  adapter through PEFT), top-1 at confident positions and the error of the adapter's effect;
- quality: perplexity of the original weights, INT4 and INT4+LoRA (real weights only).
"""

import json
import time
from pathlib import Path

from int4lora import compare
from int4lora.config import engine_config, lora_plan, with_defaults
from int4lora.engines import engine_class, make_engine
from int4lora.engines.hf_engine import HfEngine
from int4lora.judge import confident_margin, judge, overall
from int4lora.resultio import new_result, recorded_failures, write_result
from int4lora.upstream import adapter_dirs, require_ok, tuned_dir
from int4lora.workload import eval_sequences, fixed_length_prompts, load_prompts

CONTROL = "control-zero-b"


def perplexity(scores) -> float:
    import math
    lps = compare.flat(scores)
    return math.exp(-sum(lps) / len(lps))


def score_in_order(engine, seqs, adapters: list, order: list[int], top_k: int) -> list:
    """Score seqs[order[i]] with adapters[order[i]] in one call; results back in input order."""
    got = engine.score([seqs[i] for i in order], [adapters[i] for i in order], top_k)
    out = [None] * len(seqs)
    for pos, i in enumerate(order):
        out[i] = got[pos]
    return out


def interleaved(engine, seqs, names: list, top_k: int) -> list[list]:
    """One call holding, for every sequence, one request per name; scores per name."""
    batch = [(s, a) for s in seqs for a in names]
    got = engine.score([s for s, _ in batch], [a for _, a in batch], top_k)
    return [got[j::len(names)] for j in range(len(names))]


def twin_names(adapter: str, copies: int) -> list[str]:
    """Extra LoRA ids for the same adapter weights, so that one batch holds `copies` of it."""
    return [f"{adapter}-twin{i}" for i in range(1, copies)]


def engine_scorings(eng, seqs, adapter: str, copies: list[str], k: int,
                    twins: list[str] = ()) -> dict:
    """Every scoring the checks need, from one engine (see the module docstring)."""
    n = len(seqs)
    uniform = {a: eng.score(seqs, [a] * n, k) for a in (None, adapter, CONTROL)}
    reverse = list(range(n))[::-1]
    base_mixed, ad_mixed = interleaved(eng, seqs, [None, adapter], k)
    same_a, same_b, ctl_same = interleaved(eng, seqs, [None, None, CONTROL], k)
    base = {"uniform": uniform[None],
            "reversed": score_in_order(eng, seqs, [None] * n, reverse, k),
            "one at a time": [eng.score([s], [None], k)[0] for s in seqs],
            "mixed with adapter": base_mixed, "beside control (1)": same_a,
            "beside control (2)": same_b}
    ad = {"uniform": uniform[adapter],
          "reversed": score_in_order(eng, seqs, [adapter] * n, reverse, k),
          "mixed with base": ad_mixed}
    out = {"base": base, "adapter": ad, "control": uniform[CONTROL], "control_same": ctl_same,
           "multi": None}
    if len(copies) > 1:
        alone = {c: uniform[adapter] if c == adapter else eng.score(seqs, [c] * n, k)
                 for c in copies}
        out["multi"] = {"alone": alone, "mixed": dict(zip(copies, interleaved(eng, seqs, copies,
                                                                             k)))}
        if twins:
            slots = [adapter, *twins]
            out["multi"]["twins"] = {"alone": uniform[adapter], **{
                f"slot {i + 1} of {len(slots)} in one batch": s
                for i, s in enumerate(interleaved(eng, seqs, slots, k))}}
    return out


def run_engine(cfg, plan: dict, ctx: dict, device: str, log_path: str | None) -> dict:
    copies = ctx["copies"]
    first = next(iter(copies))
    multi = list(copies)[:max(plan["multi_adapter"] or [1])]
    twins = twin_names(first, len(multi))  # none for a single copy
    adapters = {**copies, **{t: copies[first] for t in twins}, CONTROL: ctx["control_path"]}
    eng = make_engine(cfg, ctx["quant_path"], device=device, adapters=adapters,
                      lora=lora_plan(plan, len(adapters)), log_path=log_path,
                      capture_sizes=plan["capture_sizes"],
                      tuned_config_dir=ctx["tuned_config_dir"], in_process=True)
    try:
        out = engine_scorings(eng, ctx["seqs"], first, multi, ctx["top_k"], twins)
        out["ppl"] = {a: perplexity(eng.score(ctx["ppl_seqs"], [a] * len(ctx["ppl_seqs"]),
                                              ctx["top_k"]))
                      for a in (None, first)} if ctx["real"] else {}
        out.update(storage=eng.weight_storage(), applied=eng.adapter_report(),
                   info=eng.info(), adapter_name=first)
        return out
    finally:
        eng.close()


def run_reference(cfg, ctx: dict, device: str) -> dict:
    """fp32 reference scores (the engine's own 4-bit weights dequantized, PEFT on top) and, for
    real weights, the original weights' scores and perplexity."""
    name, path = ctx["reference_adapter"]
    kwargs = ({"quantize_experts": cfg.quantize_experts} if cfg.backend == "hf"
              else {"quantization": cfg.quantization})
    ref = engine_class(cfg).reference(ctx["model_path"], ctx["quant_path"], {name: path},
                                      device, **kwargs)
    n, k = len(ctx["seqs"]), ctx["top_k"]
    try:
        out = {"base": ref.score(ctx["seqs"], [None] * n, k),
               "adapter": ref.score(ctx["seqs"], [name] * n, k)}
    finally:
        ref.close()
    if ctx["real"]:
        orig = HfEngine(ctx["model_path"], quantization="none", compute_dtype="float32",
                        device=device)
        try:
            out["original"] = orig.score(ctx["seqs"], [None] * n, k)
            out["original_ppl"] = perplexity(orig.score(ctx["ppl_seqs"],
                                                        [None] * len(ctx["ppl_seqs"]), k))
        finally:
            orig.close()
    return out


def coverage_share(storage: dict | None, moe: bool) -> dict:
    fams = (storage or {}).get("families", {})
    linear = [fams[f] for f in ("attention", "dense_mlp") if fams.get(f, {}).get("elements")]
    return {"storage_known": storage is not None, "moe": moe,
            "linear_share": sum(f["elements_4bit"] for f in linear)
            / sum(f["elements"] for f in linear) if linear else None,
            "experts_share": fams.get("experts", {}).get("share_4bit")}


def measurements(e: dict, r: dict, ctx: dict, th: dict) -> dict:
    """The numbers judge() needs, from the engine's and the reference's scorings."""
    margin = th["top1_margin"]
    floor = {"base": compare.noise_floor(e["base"], margin),
             "adapter": compare.noise_floor(e["adapter"], margin)}
    base, ad = e["base"]["uniform"], e["adapter"]["uniform"]
    effect = compare.delta(ad, base)
    ref_effect = compare.delta(r["adapter"], r["base"])
    base_err = compare.delta(base, r["base"])
    flips, compared = compare.confident_flips(e["control"], base, base,
                                              confident_margin(floor["base"], th))
    m = {"floor": floor, "coverage": coverage_share(e["storage"], ctx["moe"]),
         "adapter": {"max_abs_delta": max(abs(d) for d in effect), "norm": compare.norm(effect),
                     "applied": e["applied"].get(e["adapter_name"])},
         "control": {"same_call_max": max(abs(d) for d in compare.delta(
                         e["control_same"], e["base"]["beside control (1)"])),
                     "cross_call_max": max(abs(d) for d in compare.delta(e["control"], base)),
                     "flips": flips, "flips_compared": compared,
                     "applied": e["applied"].get(CONTROL)},
         "agreement": {"base": compare.agreement(base, r["base"], margin),
                       "adapter": compare.agreement(ad, r["adapter"], margin),
                       "effect_rel_error": compare.rel_error(effect, ref_effect),
                       "base_noise": compare.norm(base_err) / max(compare.norm(ref_effect), 1e-12)},
         "real_weights": ctx["real"], "quantization": {}, "quality": {}, "multi": None}
    if ctx["real"]:
        m["quantization"] = compare.agreement(base, r["original"], margin)
        m["quality"] = {"ppl_original": r["original_ppl"], "ppl_int4": e["ppl"][None],
                        "ppl_int4_lora": e["ppl"][e["adapter_name"]],
                        "ppl_ratio": e["ppl"][None] / r["original_ppl"]}
    if e["multi"]:
        mixed, alone = e["multi"]["mixed"], e["multi"]["alone"]
        names = list(alone)
        m["multi"] = {"copies": names, "mixed_max": max(
            max(abs(d) for d in compare.delta(mixed[c], alone[c])) for c in names),
            "copies_min_norm": min(compare.norm(compare.delta(alone[a], alone[b]))
                                   for i, a in enumerate(names) for b in names[i + 1:])}
        if e["multi"].get("twins"):
            floor["multi"] = compare.noise_floor(e["multi"]["twins"], margin)
    return m


def load_context(up: dict, val_cfg: dict, backend: str) -> dict:
    """What both sides need: prompts, eval text, and the adapters in the layout each side
    loads (the engine: its own; the PEFT reference: PEFT's)."""
    from transformers import AutoTokenizer
    fetched, meta = up["fetch"]["metrics"], up["adapter"]["metrics"]
    name = up["adapter"]["adapter"]
    copies, control = adapter_dirs(meta, backend)
    tok = AutoTokenizer.from_pretrained(fetched["path"])
    real = not fetched["synthetic"]
    return {"model_path": fetched["path"], "quant_path": up["quantize"]["metrics"]["path"],
            "copies": {f"{name}-{i}": p for i, p in enumerate(copies)},
            "reference_adapter": (f"{name}-0", meta["paths"][0]),
            "control_path": control, "real": real, "moe": fetched["moe"],
            "synthetic": fetched["synthetic"], "top_k": val_cfg["top_k"],
            "seqs": fixed_length_prompts(tok, load_prompts(), val_cfg["prompts"],
                                         val_cfg["prompt_tokens"]),
            "ppl_seqs": eval_sequences(tok, val_cfg["perplexity"]["seq_len"],
                                       val_cfg["perplexity"]["max_sequences"]) if real else [],
            "targets": meta["targets"],
            "adapter_kind": "experts" if meta.get("target_parameters") else "attention"}


def layer_subset(ctx: dict, layers: int | None, cache_dir: str | None) -> dict:
    """Validate on the first `layers` decoder layers (int4lora.truncate): checkpoints and every
    adapter cut alike, so the engine, the reference and the adapters still match."""
    from int4lora.truncate import truncated_adapter, truncated_checkpoint
    total = json.loads((Path(ctx["model_path"]) / "config.json").read_text())[
        "num_hidden_layers"]
    ctx["layers"] = {"validated": min(layers or total, total), "of": total}
    if not layers or layers >= total:
        return ctx
    root = cache_dir or str(Path(ctx["model_path"]).parent)
    cut = {p: truncated_checkpoint(p, layers, root) for p in {ctx["model_path"],
                                                               ctx["quant_path"]}}
    ctx["model_path"], ctx["quant_path"] = cut[ctx["model_path"]], cut[ctx["quant_path"]]
    ctx["copies"] = {k: truncated_adapter(p, layers, root) for k, p in ctx["copies"].items()}
    ctx["control_path"] = truncated_adapter(ctx["control_path"], layers, root)
    name, path = ctx["reference_adapter"]
    ctx["reference_adapter"] = (name, truncated_adapter(path, layers, root))
    return ctx


def main(model: str, engine: str, plan: dict, model_json: str, quant_json: str,
         adapter_json: str, val_cfg: dict, device: str, output: str,
         tuning_json: str | None = None, cache_dir: str | None = None,
         log_path: str | None = None, config: dict | None = None) -> dict:
    started = time.time()
    val_cfg = with_defaults(val_cfg, "validation")
    cfg = engine_config(plan["engine_cfg"])
    result = new_result("validate", model, engine, plan["adapter"]["name"],
                        params={"validation": val_cfg, "plan": plan, "device": device})
    th = val_cfg["thresholds"]
    with recorded_failures(result):
        up = require_ok(fetch=model_json, quantize=quant_json, adapter=adapter_json,
                        tuning=tuning_json)
        ctx = layer_subset(load_context(up, val_cfg, cfg.backend), val_cfg["layers"], cache_dir)
        ctx["tuned_config_dir"] = tuned_dir(up)
        e = run_engine(cfg, plan, ctx, device, log_path)
        r = run_reference(cfg, ctx, device)
        m = measurements(e, r, ctx, th)
        checks = judge(m, th)
        result["metrics"] = {
            "verdict": overall(checks), "verdict_base": overall(checks, "base"),
            "failed": [c["check_id"] for c in checks if c["verdict"] == "FAIL"],
            "checks": checks, "noise_floor": m["floor"], "coverage": e["storage"],
            "agreement": {**m["agreement"], "quantization": m["quantization"]},
            "lora": {"adapter": m["adapter"], "control": m["control"], "multi": m["multi"]},
            "adapter_report": e["applied"], "quality": m["quality"],
            "adapter_targets": ctx["targets"], "adapter_kind": ctx["adapter_kind"],
            "synthetic": ctx["synthetic"], "moe": ctx["moe"], "engine_info": e["info"],
            "layers": ctx["layers"]}
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
