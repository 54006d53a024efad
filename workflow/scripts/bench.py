"""Rules bench_baseline and bench_lora: fixed-length generation over a batch sweep.

baseline: the engine built without LoRA support, base requests only.
lora:     the LoRA-enabled engine; base requests ("lora-base"), the adapter ("lora-adapter")
          and N distinct adapters in one batch ("lora-xN", only where the batch holds N
          requests) interleave in one process.
"""

import shutil
import tempfile
import time

from int4lora import harness
from int4lora.config import engine_config, lora_plan, with_defaults
from int4lora.coverage import decode_weight_bytes
from int4lora.engines import make_engine
from int4lora.memory import kv_cache_bytes, kv_element_bytes
from int4lora.resultio import new_result, read_json, recorded_failures, write_result
from int4lora.upstream import adapter_dirs, require_ok, tuned_dir
from int4lora.workload import fixed_length_prompts, load_prompts


def distinct_adapters(variant: str, batch: int) -> int:
    """Distinct adapters one batch of this variant carries."""
    if variant in ("base", "lora-base"):
        return 0
    return min(batch, int(variant.removeprefix("lora-x"))) if variant.startswith("lora-x") else 1


def adapter_step_bytes(lora: dict, arch: dict, variant: str, batch: int) -> int:
    """LoRA weight bytes one decode step reads: vLLM reads each active adapter's slot in every
    wrapped module at max_lora_rank width (a module the adapter does not target holds zeros,
    read all the same); PEFT reads the adapter's own tensors."""
    active = distinct_adapters(variant, batch)
    if not active:
        return 0
    if not lora.get("wrapped_modules"):
        return active * lora["adapter_bytes"]
    from int4lora.lora_layout import lora_bytes_per_decode_step
    experts = arch.get("num_local_experts") or arch.get("num_experts")
    touched = None
    if experts and arch.get("num_experts_per_tok"):
        share = 1 - (1 - arch["num_experts_per_tok"] / experts) ** batch
        touched = max(1, round(experts * share))
    return lora_bytes_per_decode_step(arch, lora["wrapped_modules"], active_adapters=active,
                                      max_rank=lora["max_rank"], experts_touched=touched,
                                      batch=batch)


def roofline(run: dict, storage: dict | None, arch: dict, lora: dict,
             bandwidth: float | None, kv_bytes_per_element: int = 2) -> dict:
    """Bytes one decode step must read over the measured bandwidth: the fastest decode."""
    tpot = run["tpot_s"]["median"]
    if storage is None or not bandwidth or not tpot:
        return {}
    batch = run["batch"]
    context = run["prompt_tokens"] // batch + run["output_tokens"] // (2 * batch)
    adapter = adapter_step_bytes(lora, arch, run["variant"], batch)
    step_bytes = (decode_weight_bytes(storage, arch, batch)
                  + kv_cache_bytes(arch, batch, context, kv_bytes_per_element) + adapter)
    floor = step_bytes / bandwidth
    return {"bytes_per_step": step_bytes, "adapter_bytes_per_step": adapter,
            "tpot_floor_s": floor, "roofline_fraction": floor / tpot}


def lora_memory(info: dict, arch: dict, adapter_bytes: int) -> dict:
    """What the engine's LoRA support holds: wrapped modules, rank width, slots and the bytes of
    its slot buffers (vLLM preallocates them whether or not the adapter fills them)."""
    kwargs = info.get("llm_kwargs") or {}
    wrapped = info.get("lora_wrapped_modules") or []
    out = {"adapter_bytes": adapter_bytes, "wrapped_modules": wrapped,
           "max_rank": kwargs.get("max_lora_rank"), "slots": kwargs.get("max_loras"),
           "buffer_bytes": None}
    if wrapped and kwargs.get("max_lora_rank"):
        from int4lora.lora_layout import lora_slot_bytes
        out["buffer_bytes"] = lora_slot_bytes(arch, wrapped, slots=kwargs["max_loras"],
                                              max_rank=kwargs["max_lora_rank"])
    return out


def decode_profile(eng, prompts, tokens: int, adapter_name: str | None, out_dir: str) -> dict:
    """Where batch-1 decode time goes: one profiled generate after the timed sweep (the
    profiler slows that call, so its timings never enter the results above)."""
    from int4lora.profiling import PROFILE_KEYS
    prof = eng.profile_decode(prompts[:1], tokens, [adapter_name], out_dir=out_dir)
    return {**{k: prof.get(k) for k in PROFILE_KEYS}, "adapter": adapter_name}


def sweep(eng, prompts, plan: dict, bench_cfg: dict, variants: dict) -> dict:
    """Every batch size of the plan: warm-up, interleaved timed iterations; OOM at one batch
    size is a row with status oom, and larger batches are still tried."""
    policy = harness.RepeatPolicy(**{k: bench_cfg[k] for k in (
        "warmup", "min_iterations", "min_seconds", "max_iterations", "max_warmup")})
    samples, rows, outputs, warmups = [], [], {}, {}
    for batch in plan["batch_sizes"]:
        runnable, skipped = harness.variants_at(variants, batch)
        rows += skipped
        try:
            got, outs, warm = harness.measure_batch(eng, prompts, bench_cfg["output_tokens"],
                                                    runnable, policy, batch)
        except Exception as exc:
            if type(exc).__name__ != "OutOfMemoryError":
                raise
            rows += [{"variant": v, "batch": batch, "status": "oom",
                      "reason": str(exc).splitlines()[0]} for v in runnable]
            continue
        samples += got
        outputs[str(batch)], warmups[str(batch)] = outs, warm
    return {"samples": samples, "skipped": rows, "outputs": outputs, "warmup": warmups}


def measured(eng, cfg, swept: dict, variants: dict, arch: dict, adapter_bytes: int,
             bandwidth: float | None) -> dict:
    """The bench result's metrics from a finished sweep: per-run statistics with roofline,
    paired LoRA overhead, what the engine ran with and its memory."""
    storage, info = eng.weight_storage(), eng.info()
    kv_bytes = kv_element_bytes(cfg)
    lora = lora_memory(info, arch, adapter_bytes)
    runs = [{**run, **roofline(run, storage, arch, lora, bandwidth, kv_bytes)}
            for run in harness.summarize_runs(swept["samples"])] + swept["skipped"]
    serves_adapters = "lora-base" in variants
    overhead = [o for name in variants if serves_adapters and name != "lora-base"
                for o in harness.paired_overhead(swept["samples"], name, "lora-base")]
    return {"runs": runs, "overhead": overhead, "outputs": swept["outputs"],
            "warmup": swept["warmup"], "engine_info": info, "memory": eng.memory(),
            "bandwidth_bytes_s": bandwidth, "architecture": arch, "adapter_bytes": adapter_bytes,
            "lora": lora, "kv_bytes_per_element": kv_bytes, "weight_storage": storage,
            "adapter_report": eng.adapter_report() if serves_adapters else {}}


def main(model: str, engine: str, plan: dict, model_json: str, quant_json: str,
         bench_cfg: dict, device: str, output: str, adapter_json: str | None = None,
         bandwidth_json: str | None = None, tuning_json: str | None = None,
         log_path: str | None = None, config: dict | None = None) -> dict:
    started = time.time()
    adapter = (plan.get("adapter") or {}).get("name")
    cfg = engine_config(plan["engine_cfg"])
    bench_cfg = with_defaults(bench_cfg, "benchmark")
    result = new_result("bench", model, engine, adapter or "none",
                        params={"mode": "lora" if adapter else "baseline", "plan": plan,
                                "benchmark": bench_cfg, "device": device})
    with recorded_failures(result):
        up = require_ok(fetch=model_json, quantize=quant_json, adapter=adapter_json,
                        tuning=tuning_json)
        arch = up["fetch"]["metrics"]["architecture"]
        adapter_paths, adapter_bytes = {}, 0
        if adapter:
            meta = up["adapter"]["metrics"]
            copies, _ = adapter_dirs(meta, cfg.backend)
            adapter_paths = {f"{adapter}-{i}": p for i, p in enumerate(copies)}
            adapter_bytes = meta["bytes"]
        profile = cfg.profile_decode
        profile_dir = tempfile.mkdtemp(prefix="decode-profile-") if profile else None
        t0 = time.perf_counter()
        try:
            eng = make_engine(cfg, up["quantize"]["metrics"]["path"], device=device,
                              adapters=adapter_paths, lora=lora_plan(plan, len(adapter_paths)),
                              log_path=log_path, profile_dir=profile_dir,
                              capture_sizes=plan["capture_sizes"],
                              tuned_config_dir=tuned_dir(up))
        except BaseException:
            if profile_dir:
                shutil.rmtree(profile_dir, ignore_errors=True)
            raise
        engine_start_s = time.perf_counter() - t0
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(up["fetch"]["metrics"]["path"])
            prompts = fixed_length_prompts(tok, load_prompts(), max(plan["batch_sizes"]),
                                           bench_cfg["prompt_tokens"])
            variants = harness.variants_for(list(adapter_paths), plan["multi_adapter"],
                                            max(plan["batch_sizes"]))
            swept = sweep(eng, prompts, plan, bench_cfg, variants)
            bandwidth = read_json(bandwidth_json)["metrics"]["bandwidth_bytes_s"] \
                if bandwidth_json else None
            result["metrics"] = {**measured(eng, cfg, swept, variants, arch, adapter_bytes,
                                            bandwidth), "engine_start_s": engine_start_s}
            result["samples"] = swept["samples"]
            if profile:
                # aggregate sets the kernel time against the unprofiled batch-1 TPOT of the runs
                result["metrics"]["decode_profile"] = decode_profile(
                    eng, prompts, profile["tokens"], next(iter(adapter_paths), None), profile_dir)
        finally:
            eng.close()
            if profile_dir:
                shutil.rmtree(profile_dir, ignore_errors=True)  # traces are large; keep the summary
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
