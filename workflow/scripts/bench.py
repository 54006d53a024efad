"""Rules bench_baseline and bench_lora: fixed-length generation over a batch sweep.

baseline: the engine built without LoRA support, base requests only.
lora:     the LoRA-enabled engine; base requests ("lora-base"), the adapter ("lora-adapter")
          and N distinct adapters in one batch ("lora-xN") interleave in one process.
"""

import shutil
import tempfile
import time

from int4lora import harness
from int4lora.coverage import decode_weight_bytes
from int4lora.engines import make_engine
from int4lora.memory import kv_cache_bytes
from int4lora.resultio import new_result, read_json, recorded_failures, write_result
from int4lora.upstream import require_ok
from int4lora.workload import fixed_length_prompts, load_prompts


def variants_for(adapter_names: list[str], multi: list[int], max_batch: int) -> dict:
    if not adapter_names:
        return {"base": [None] * max_batch}
    variants = {"lora-base": [None] * max_batch,
                "lora-adapter": [adapter_names[0]] * max_batch}
    for n in multi:
        if 1 < n <= len(adapter_names):
            variants[f"lora-x{n}"] = [adapter_names[i % n] for i in range(max_batch)]
    return variants


def roofline(run: dict, storage: dict | None, arch: dict, adapter_bytes: int,
             bandwidth: float | None) -> dict:
    """Bytes one decode step must read over the measured bandwidth: the fastest decode."""
    if storage is None or not bandwidth or not run["tpot_s"]["median"]:
        return {}
    batch = run["batch"]
    context = run["prompt_tokens"] // batch + run["output_tokens"] // (2 * batch)
    uses_adapter = run["variant"] not in ("base", "lora-base")
    step_bytes = (decode_weight_bytes(storage, arch, batch) + kv_cache_bytes(arch, batch, context)
                  + (adapter_bytes if uses_adapter else 0))
    floor = step_bytes / bandwidth
    return {"bytes_per_step": step_bytes, "tpot_floor_s": floor,
            "roofline_fraction": floor / run["tpot_s"]["median"]}


def decode_profile(eng, prompts, profile: dict, adapter_name: str | None, out_dir: str) -> dict:
    """Where batch-1 decode time goes: one profiled generate after the timed sweep (the
    profiler slows that call, so its timings never enter the results above)."""
    prof = eng.profile_decode(prompts[:1], profile.get("tokens", 64), [adapter_name],
                              out_dir=out_dir)
    out = {k: prof.get(k) for k in ("by_step_kind", "by_class", "kernels", "total_gpu_us",
                                    "gpu_span_us", "decode_step_us", "tpot_s_median",
                                    "unattributed_us")}
    out["adapter"] = adapter_name
    return out


def main(model: str, engine: str, engine_cfg: dict, adapter: str | None, model_json: str,
         quant_json: str, adapter_json: str | None, bandwidth_json: str | None,
         bench_cfg: dict, device: str, output: str, log_path: str | None = None,
         config: dict | None = None) -> dict:
    started = time.time()
    result = new_result("bench", model, engine, adapter or "none",
                        params={"mode": "lora" if adapter else "baseline", "benchmark": bench_cfg,
                                "engine": engine_cfg, "device": device})
    with recorded_failures(result):
        up = require_ok(fetch=model_json, quantize=quant_json, adapter=adapter_json)
        arch = up["fetch"]["metrics"]["architecture"]
        adapter_paths, adapter_bytes, rank = {}, 0, 16
        if adapter:
            meta = up["adapter"]["metrics"]
            adapter_paths = {f"{adapter}-{i}": p for i, p in enumerate(meta["paths"])}
            adapter_bytes, rank = meta["bytes"], meta["rank"]
        batches = sorted(engine_cfg.get("batch_sizes") or bench_cfg["batch_sizes"])
        multi = engine_cfg.get("multi_adapter", bench_cfg.get("multi_adapter", []))
        profile = engine_cfg.get("profile_decode")
        profile_dir = tempfile.mkdtemp(prefix="decode-profile-") if profile else None
        try:
            eng = make_engine(engine_cfg["backend"], up["quantize"]["metrics"]["path"],
                              engine_cfg, device=device, adapters=adapter_paths,
                              enable_lora=bool(adapter), max_lora_rank=rank,
                              max_loras=max([1, *multi]), log_path=log_path,
                              profile_dir=profile_dir)
        except BaseException:
            if profile_dir:
                shutil.rmtree(profile_dir, ignore_errors=True)
            raise
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(up["fetch"]["metrics"]["path"])
            prompts = fixed_length_prompts(tok, load_prompts(), max(batches),
                                           bench_cfg["prompt_tokens"])
            variants = variants_for(list(adapter_paths), multi, max(batches))
            policy = harness.RepeatPolicy(**{k: bench_cfg[k] for k in (
                "warmup", "min_iterations", "min_seconds", "max_iterations")})
            samples, runs, outputs = [], [], {}
            for batch in batches:
                try:
                    got, outs = harness.measure_batch(eng, prompts, bench_cfg["output_tokens"],
                                                      variants, policy, batch)
                except Exception as exc:
                    if type(exc).__name__ != "OutOfMemoryError":
                        raise
                    runs += [{"variant": v, "batch": batch, "status": "oom",
                              "reason": str(exc).splitlines()[0]} for v in variants]
                    continue
                samples += got
                outputs[str(batch)] = outs
            storage = eng.weight_storage() if hasattr(eng, "weight_storage") else None
            bandwidth = read_json(bandwidth_json)["metrics"]["bandwidth_bytes_s"] \
                if bandwidth_json else None
            for run in harness.summarize_runs(samples):
                run.update(roofline(run, storage, arch, adapter_bytes, bandwidth))
                runs.append(run)
            overhead = []
            if adapter:
                for name in variants:
                    if name != "lora-base":
                        overhead += harness.paired_overhead(samples, name, "lora-base")
            result["metrics"] = {"runs": runs, "overhead": overhead, "outputs": outputs,
                                 "engine_info": eng.info(), "memory": eng.memory(),
                                 "bandwidth_bytes_s": bandwidth, "architecture": arch,
                                 "adapter_bytes": adapter_bytes,
                                 "weight_storage": storage}
            result["samples"] = samples
            if profile:
                # aggregate sets the kernel time against the unprofiled batch-1 TPOT of the runs
                result["metrics"]["decode_profile"] = decode_profile(
                    eng, prompts, profile, next(iter(adapter_paths), None), profile_dir)
        finally:
            eng.close()
            if profile_dir:
                shutil.rmtree(profile_dir, ignore_errors=True)  # traces are large; keep the summary
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    sm = snakemake  # noqa: F821
    smk.run(sm, main, model=sm.wildcards.model, engine=sm.wildcards.engine,
            engine_cfg=sm.params.engine_cfg, adapter=sm.params.adapter,
            model_json=sm.input.model, quant_json=sm.input.quant,
            adapter_json=sm.input.get("adapter"), bandwidth_json=sm.input.bandwidth,
            bench_cfg=sm.params.bench, device=sm.params.device, output=sm.output[0],
            log_path=sm.log[0], config=sm.config)
