"""Rule profile_memory: where the memory goes for one (model, engine, adapter).

Weight bytes by dtype and by module family (this alone shows whether weights are really
4-bit), adapter bytes, KV-cache bytes the workload needs at the largest batch (in the dtype the
engine stores), and measured peaks: process RSS on the CPU; torch peak allocated/reserved and NVML
on CUDA (vLLM: NVML and the engine's own figures, since its memory lives in another process). The
process baseline is measured after the engine libraries are imported, before any weights load.
"""

import time

from int4lora.config import engine_config, lora_plan
from int4lora.engines import make_engine
from int4lora.memory import attribute, kv_cache_bytes, kv_element_bytes, process_memory
from int4lora.resultio import new_result, recorded_failures, write_result
from int4lora.upstream import adapter_dirs, require_ok
from int4lora.workload import fixed_length_prompts, load_prompts


def import_engine_libraries(backend: str) -> None:
    """Import what the engine will import, so the baseline holds the libraries, not the model."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    if backend == "hf":
        import peft  # noqa: F401


def main(model: str, engine: str, plan: dict, model_json: str, quant_json: str,
         bench_cfg: dict, device: str, output: str, adapter_json: str | None = None,
         log_path: str | None = None, config: dict | None = None) -> dict:
    started = time.time()
    adapter = (plan.get("adapter") or {}).get("name")
    cfg = engine_config(plan["engine_cfg"])
    result = new_result("memory", model, engine, adapter or "none",
                        params={"device": device, "plan": plan})
    with recorded_failures(result):
        up = require_ok(fetch=model_json, quantize=quant_json, adapter=adapter_json)
        arch = up["fetch"]["metrics"]["architecture"]
        import_engine_libraries(cfg.backend)
        before = process_memory(device)
        adapters = {adapter: adapter_dirs(up["adapter"]["metrics"], cfg.backend)[0][0]} \
            if adapter else {}
        adapter_bytes = up["adapter"]["metrics"]["bytes"] if adapter else 0
        eng = make_engine(cfg, up["quantize"]["metrics"]["path"], device=device,
                          adapters=adapters, lora=lora_plan(plan, len(adapters)),
                          log_path=log_path, capture_sizes=plan["capture_sizes"])
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(up["fetch"]["metrics"]["path"])
            batch = max(plan["batch_sizes"])
            prompts = fixed_length_prompts(tok, load_prompts(), batch, bench_cfg["prompt_tokens"])
            after_load = eng.memory()
            eng.generate(prompts, bench_cfg["output_tokens"], [adapter and next(iter(adapters))]
                         * batch if adapter else [None] * batch)
            after_generate = eng.memory()
            storage = eng.weight_storage()
            context = bench_cfg["prompt_tokens"] + bench_cfg["output_tokens"]
            kv = kv_cache_bytes(arch, batch, context, kv_element_bytes(cfg))
            weights = storage["total_bytes"] if storage else 0
            if device.startswith("cuda") and cfg.backend == "hf":
                peak, runtime = after_generate.get("torch_peak_allocated_bytes"), 0
            elif device.startswith("cuda"):
                peak, runtime = after_generate.get("nvml_device_used_bytes"), 0
            else:
                peak, runtime = after_generate["peak_rss_bytes"], before["rss_bytes"]
            result["metrics"] = {
                "batch": batch, "context_tokens": context, "weight_storage": storage,
                "weight_bytes": weights, "adapter_bytes": adapter_bytes, "kv_cache_bytes": kv,
                "before_load": before, "after_load": after_load, "after_generate": after_generate,
                "peak_bytes": peak,
                "attribution": attribute(peak, runtime, weights, adapter_bytes, kv),
                "engine_info": eng.info(),
            }
        finally:
            eng.close()
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
