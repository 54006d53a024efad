"""Rule profile_memory: where the memory goes for one (model, engine, adapter).

Weight bytes by dtype and by module family (this alone shows whether weights are really
4-bit), adapter bytes, KV-cache bytes at the largest batch, and measured peaks: process
RSS on the CPU; torch peak allocated/reserved and NVML on CUDA (vLLM: NVML and the
engine's own figures, since its memory lives in another process).
"""

import time

from int4lora.engines import make_engine
from int4lora.memory import attribute, kv_cache_bytes, process_memory
from int4lora.resultio import new_result, recorded_failures, write_result
from int4lora.upstream import require_ok
from int4lora.workload import fixed_length_prompts, load_prompts


def main(model: str, engine: str, engine_cfg: dict, adapter: str | None, model_json: str,
         quant_json: str, adapter_json: str | None, bench_cfg: dict, device: str, output: str,
         log_path: str | None = None, config: dict | None = None) -> dict:
    started = time.time()
    result = new_result("memory", model, engine, adapter or "none",
                        params={"device": device, "engine": engine_cfg})
    with recorded_failures(result):
        up = require_ok(fetch=model_json, quantize=quant_json, adapter=adapter_json)
        arch = up["fetch"]["metrics"]["architecture"]
        before = process_memory(device)
        adapters = {}
        adapter_bytes = 0
        if adapter:
            adapters = {adapter: up["adapter"]["metrics"]["paths"][0]}
            adapter_bytes = up["adapter"]["metrics"]["bytes"]
        eng = make_engine(engine_cfg["backend"], up["quantize"]["metrics"]["path"], engine_cfg,
                          device=device, adapters=adapters, enable_lora=bool(adapter),
                          max_lora_rank=up["adapter"]["metrics"]["rank"] if adapter else 16,
                          log_path=log_path)
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(up["fetch"]["metrics"]["path"])
            batch = max(engine_cfg.get("batch_sizes") or bench_cfg["batch_sizes"])
            prompts = fixed_length_prompts(tok, load_prompts(), batch, bench_cfg["prompt_tokens"])
            after_load = eng.memory()
            eng.generate(prompts, bench_cfg["output_tokens"], [adapter and next(iter(adapters))]
                         * batch if adapter else [None] * batch)
            after_generate = eng.memory()
            storage = eng.weight_storage() if hasattr(eng, "weight_storage") else None
            context = bench_cfg["prompt_tokens"] + bench_cfg["output_tokens"]
            kv = kv_cache_bytes(arch, batch, context)
            weights = storage["total_bytes"] if storage else 0
            if device.startswith("cuda") and engine_cfg["backend"] == "hf":
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
    sm = snakemake  # noqa: F821
    smk.run(sm, main, model=sm.wildcards.model, engine=sm.wildcards.engine,
            engine_cfg=sm.params.engine_cfg, adapter=sm.params.adapter,
            model_json=sm.input.model, quant_json=sm.input.quant,
            adapter_json=sm.input.get("adapter"), bench_cfg=sm.params.bench,
            device=sm.params.device, output=sm.output[0], log_path=sm.log[0],
            config=sm.config)
