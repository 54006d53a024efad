"""Rule aggregate: every result JSON -> tidy CSV tables (pandas). Reads only JSON.

One gate everywhere: every speed row (bench, overhead) carries `validated`, the verdict of the
checks that concern it (base requests: the base-scope checks of every validation of that model and
engine; adapter requests: that adapter's validation), or "unvalidated" where no validation ran.
"""

from pathlib import Path

import pandas as pd

from int4lora.memory import attribute, kv_cache_bytes
from int4lora.outputs import MEMORY_COLUMNS, TABLES
from int4lora.profiling import CLASS_NAMES
from int4lora.resultio import read_result
from int4lora.sources import SOURCES, load_sources, source_rows
from int4lora.tables import write_tables

STAT_KEYS = ("median", "ci_low", "ci_high", "p90", "p99", "std", "min", "max", "n")
BENCH_METRICS = ("ttft_s", "ttft_engine_s", "tpot_s", "e2e_s", "e2e_tok_s", "decode_tok_s",
                 "prefill_tok_s")
ENV_KEYS = ("device", "gpu", "driver", "cuda", "cpu", "torch", "transformers", "vllm",
            "bitsandbytes", "peft", "llmcompressor", "compressed-tensors", "git_commit",
            "hostname", "config_hash", "started")
BASE_VARIANTS = ("base", "lora-base")
# checks of results written before checks had ids: those that concern the base model alone
LEGACY_BASE_CHECKS = ("coverage", "agreement: base", "quantization", "quality")


def _flat(prefix: str, stats: dict) -> dict:
    return {f"{prefix}_{k}": stats.get(k) for k in STAT_KEYS}


def engine_setting(res: dict) -> dict:
    """What the engine ran with, as recorded by the job (settings label, LoRA modules, slots,
    W4A16 kernel, LoRA kernel configs)."""
    info = res["metrics"].get("engine_info") or {}
    kwargs = info.get("llm_kwargs") or {}
    log = info.get("engine_log") or {}
    modules = kwargs.get("lora_target_modules")
    return {"setting": info.get("setting") or ((res.get("params") or {}).get("plan") or {})
            .get("setting") or res["engine"],
            "lora_modules": ",".join(modules) if modules else (
                "all (vLLM default)" if kwargs.get("enable_lora") else None),
            "max_loras": kwargs.get("max_loras"),
            "w4a16_kernel": ",".join(log.get("w4a16_kernels") or []) or None,
            "lora_kernel_configs": log.get("lora_kernel_configs"),
            # the weights the engine loaded (their cache entry): model entries of one preset
            # can share a checkpoint, and kernels are compared on the same one
            "checkpoint": Path(kwargs["model"]).name if kwargs.get("model") else None}


def bench_rows(res: dict) -> list[dict]:
    rows = []
    key = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "mode": res["params"]["mode"], **engine_setting(res)}
    for run in res["metrics"].get("runs", []):
        row = {**key, "variant": run["variant"], "batch": run["batch"],
               "status": run.get("status", "ok"), "reason": run.get("reason"),
               "iterations": run.get("iterations"),
               "n_excluded_compile": run.get("excluded_compile", 0)}
        for metric in BENCH_METRICS:
            if metric in run:
                row.update(_flat(metric, run[metric]))
        if "output_tok_s" in run and "e2e_tok_s" not in run:  # results before the split
            row.update(_flat("e2e_tok_s", run["output_tok_s"]))
        for extra in ("bytes_per_step", "tpot_floor_s", "roofline_fraction"):
            row[extra] = run.get(extra)
        rows.append(row)
    return rows


def overhead_rows(res: dict) -> list[dict]:
    key = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           **engine_setting(res)}
    rows = []
    for o in res["metrics"].get("overhead", []):
        row = {**key, "batch": o["batch"], "variant": o["numerator"],
               "against": o["denominator"]}
        for metric in ("tpot_ratio", "e2e_ratio", "ttft_ratio"):
            row.update(_flat(metric, o[metric]))
        rows.append(row)
    return rows


def _memory_parts(mem: dict, peak, weights: int, adapter: int, kv: int) -> dict:
    if mem.get("engine_kv_cache_gib") is None:
        return attribute(peak, 0, weights, adapter, kv)
    # vLLM preallocates its KV-cache pool and captures CUDA graphs: the pool is reserved, not
    # what the workload needs (kv_cache_bytes); both are reported, the pool apart
    parts = {"weights": int((mem.get("engine_model_weights_gib") or 0) * 2**30),
             "kv_cache_pool": int(mem["engine_kv_cache_gib"] * 2**30),
             "cuda_graphs": int((mem.get("engine_cuda_graph_gib") or 0) * 2**30)}
    parts["activations_and_other"] = max((peak or 0) - sum(parts.values()), 0)
    return parts


def memory_columns(weights, adapter_lora, kv_needed, kv_pool, baseline) -> dict:
    """The memory the workload needs, in the report's columns (int4lora.outputs.MEMORY_COLUMNS):
    4-bit weights, adapter + LoRA slot buffers, KV for the largest batch; an engine's reserved
    KV pool and the process baseline (after the libraries' import) apart."""
    return {MEMORY_COLUMNS["weights"]: weights, MEMORY_COLUMNS["adapter_lora"]: adapter_lora,
            MEMORY_COLUMNS["kv_needed"]: kv_needed, MEMORY_COLUMNS["kv_pool_reserved"]: kv_pool,
            MEMORY_COLUMNS["process_baseline"]: baseline}


def _engine_weight_bytes(mem: dict, lora_buffers: int | None) -> int | None:
    """Weights as the engine loaded them, where no checkpoint holds their stored form (vLLM's
    in-flight bitsandbytes quantizes at load): vLLM's "Model loading took" figure, which counts
    the LoRA slot buffers too; None where the engine gave none."""
    loaded = mem.get("engine_model_weights_gib")
    if loaded is None:
        return None
    return int(loaded * 2**30) - int(lora_buffers or 0)


def bench_memory_rows(res: dict) -> list[dict]:
    """Memory measured over a whole batch sweep (peaks after the largest batch): the memory
    table's rows where no profile_memory job ran for that configuration."""
    m = res["metrics"]
    mem, storage = m.get("memory") or {}, m.get("weight_storage")
    runs = [r for r in m.get("runs", []) if r.get("status", "ok") == "ok"]
    if not runs:
        return []
    batch = max(r["batch"] for r in runs)
    context = max(r["prompt_tokens"] + r["output_tokens"] for r in runs) // batch
    adapter = m.get("adapter_bytes", 0) if res["adapter"] != "none" else 0
    kv = kv_cache_bytes(m["architecture"], batch, context, m.get("kv_bytes_per_element", 2))
    peak = mem.get("torch_peak_allocated_bytes") if "torch_peak_allocated_bytes" in mem \
        else mem.get("nvml_device_used_bytes") or mem.get("peak_rss_bytes")
    lora_buffers = (m.get("lora") or {}).get("buffer_bytes")
    weights = storage["total_bytes"] if storage else _engine_weight_bytes(mem, lora_buffers)
    pool = int(mem["engine_kv_cache_gib"] * 2**30) \
        if mem.get("engine_kv_cache_gib") is not None else None
    row = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "source": "bench sweep", "batch": batch, "peak_bytes": peak, "weight_bytes": weights,
           "adapter_bytes": adapter, "lora_buffer_bytes": lora_buffers, "kv_cache_bytes": kv,
           **memory_columns(weights, lora_buffers if lora_buffers is not None else adapter,
                            kv, pool, None)}
    for key in ("engine_model_weights_gib", "engine_kv_cache_gib", "engine_cuda_graph_gib",
                "engine_model_load_s", "nvml_device_used_bytes", "torch_peak_reserved_bytes"):
        if mem.get(key) is not None:
            row[key] = mem[key]
    for part, value in _memory_parts(mem, peak, weights or 0, adapter, kv).items():
        row[f"part_{part}"] = value
    for dtype, value in ((storage or {}).get("bytes_by_dtype") or {}).items():
        row[f"dtype_{dtype}"] = value
    return [row]


def decode_profile_rows(res: dict) -> list[dict]:
    """Where batch-1 decode time goes (bench.py decode_profile): kernel time per decode step,
    its split by kernel class, and how much of the unprofiled TPOT it explains; the rest is the
    GPU waiting for the host. Without vLLM-style step annotations the whole trace (prefill
    included) over the number of decode steps stands in, marked by `attribution`."""
    prof = res["metrics"].get("decode_profile")
    if not prof:
        return []
    decode = (prof.get("by_step_kind") or {}).get("decode")
    if decode:
        attribution, kernel_us = "per-step", decode.get("gpu_us_per_step_median")
        by_class, kernels = decode.get("by_class") or {}, decode.get("kernels") or []
    else:
        attribution, kernel_us = "whole trace", prof.get("decode_step_us")
        by_class, kernels = prof.get("by_class") or {}, prof.get("kernels") or []
    tpot = prof.get("sweep_tpot_s_batch1")
    if tpot is None:  # stored by earlier bench.py versions; else the same variant at batch 1
        variant = "lora-adapter" if res["adapter"] != "none" else "base"
        tpot = next((r["tpot_s"]["median"] for r in res["metrics"].get("runs", [])
                     if r["variant"] == variant and r["batch"] == 1
                     and r.get("status", "ok") == "ok"), None)
    fraction = prof.get("kernel_fraction_of_tpot")
    if fraction is None and kernel_us and tpot:
        fraction = kernel_us * 1e-6 / tpot
    class_us = sum((by_class.get(c) or {}).get("total_us") or 0.0 for c in CLASS_NAMES)
    row = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "profiled_request": prof.get("adapter") or "base", "attribution": attribution,
           "decode_steps": decode.get("count") if decode else None,
           "kernel_us_per_step": kernel_us,
           "step_period_us": decode.get("gpu_period_us_median") if decode else None,
           "sweep_tpot_ms_batch1": tpot * 1e3 if tpot is not None else None,
           "kernel_fraction_of_tpot": fraction,
           "host_gap_fraction": 1 - fraction if fraction is not None else None}
    for c in CLASS_NAMES:  # shares of decode kernel time; none when there was no kernel
        row[f"share_{c}"] = ((by_class.get(c) or {}).get("total_us") or 0.0) / class_us \
            if class_us > 0 else None
    top = kernels[0] if kernels and class_us > 0 else {}
    row["top_kernel"], row["top_kernel_share"] = top.get("name"), top.get("share")
    return [row]


def memory_rows(res: dict) -> list[dict]:
    m = res["metrics"]
    row = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "source": "profile_memory",
           "batch": m.get("batch"), "peak_bytes": m.get("peak_bytes"),
           "weight_bytes": m.get("weight_bytes"), "adapter_bytes": m.get("adapter_bytes"),
           "kv_cache_bytes": m.get("kv_cache_bytes"),
           **memory_columns(m.get("weight_bytes"), m.get("adapter_bytes"),
                            m.get("kv_cache_bytes"), None,
                            (m.get("before_load") or {}).get("rss_bytes"))}
    for part, value in (m.get("attribution") or {}).items():
        row[f"part_{part}"] = value
    for dtype, value in ((m.get("weight_storage") or {}).get("bytes_by_dtype") or {}).items():
        row[f"dtype_{dtype}"] = value
    return [row]


def _legacy_check(c: dict) -> dict:
    """Checks written before ids and scopes (e.g. the committed 2026-11-23 runs)."""
    scope = "base" if c["check"].startswith(LEGACY_BASE_CHECKS) else "adapter"
    return {"check_id": "legacy: " + c["check"], "scope": scope, "limit": c.get("threshold"),
            "floor": None, "note": "", **c}


def validation_rows(res: dict) -> list[dict]:
    key = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "adapter_kind": res["metrics"].get("adapter_kind")}
    return [{**key, **(c if "check_id" in c else _legacy_check(c))}
            for c in res["metrics"].get("checks", [])]


def noise_floor_rows(res: dict) -> list[dict]:
    rows = []
    for scope, f in (res["metrics"].get("noise_floor") or {}).items():
        rows.append({"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
                     "scope": scope, "compositions": len(f["compositions"]),
                     "pairs": f["pairs"], "positions": f["positions"], "p50": f["p50"],
                     "p99": f["p99"], "max": f["max"], "norm_max": f["norm_max"],
                     "confident_flips": f["confident_flips"],
                     "confident_compared": f["confident_compared"]})
    return rows


def coverage_rows(res: dict) -> list[dict]:
    storage = res["metrics"].get("coverage") or {}
    rows = []
    for family, f in (storage.get("families") or {}).items():
        if f.get("elements") or f.get("bytes"):
            rows.append({"model": res["model"], "engine": res["engine"], "family": family,
                         "bytes": f["bytes"], "elements": f["elements"],
                         "elements_4bit": f["elements_4bit"], "share_4bit": f.get("share_4bit")})
    return rows


def quality_rows(res: dict) -> list[dict]:
    q = res["metrics"].get("quality") or {}
    a = res["metrics"].get("agreement") or {}
    return [{"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
             "synthetic": res["metrics"].get("synthetic"), **q,
             "base_top1": (a.get("base") or {}).get("top1_agreement"),
             "adapter_top1": (a.get("adapter") or {}).get("top1_agreement"),
             "adapter_effect_rel_error": a.get("adapter_effect_rel_error",
                                               a.get("effect_rel_error")),
             "quant_top1_vs_original": (a.get("quantization") or {}).get("top1_agreement")}]


def peer_check_rows(res: dict) -> list[dict]:
    return [{"model": res["model"], "engine": res["engine"],
             **{k: r.get(k) for k in ("batch", "input_len", "output_len", "harness_e2e_ms",
                                      "harness_n", "vllm_bench_e2e_ms", "vllm_bench_n", "ratio",
                                      "within", "tolerance", "reason")}}
            for r in res["metrics"].get("rows", [])]


def tuning_rows(res: dict) -> list[dict]:
    """Per kernel key: vLLM's default config against the tuned one (µs per call)."""
    return [{"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
             **{k: r.get(k) for k in ("label", "phase", "status", "default_us", "tuned_us",
                                      "speedup", "candidates")},
             "modules": ",".join(r.get("modules") or []),
             "gpu": res["metrics"].get("gpu")} for r in res["metrics"].get("keys", [])]


MISSING_KINDS = ("bench", "validate", "memory", "peer_check", "tuning")


def missing_rows(paths: list[str]) -> list[dict]:
    """The results a partial report lacks: <kind>/<model>/<engine>/<adapter>.json, or
    <kind>/<model>/<engine>.json for kinds without an adapter (peer_check)."""
    rows = []
    for path in paths:
        parts = Path(path).with_suffix("").parts
        at = max((i for i, p in enumerate(parts) if p in MISSING_KINDS), default=None)
        kind, model, engine, adapter = (
            [*parts[at:at + 4], "–", "–", "–"][:4] if at is not None else ["?", "?", "?", "?"])
        rows.append({"kind": kind, "model": model, "engine": engine, "adapter": adapter,
                     "status": "missing", "reason": "no result: this job did not run "
                     "(partial report)", "file": str(path)})
    return rows


def gate(bench: pd.DataFrame, validation: pd.DataFrame) -> list[str]:
    """The verdict each speed row carries: PASS / FAIL / unvalidated."""
    if bench.empty:
        return []
    full, base = {}, {}
    for (model, engine, adapter), g in validation.groupby(["model", "engine", "adapter"]) \
            if not validation.empty else []:
        failed = g["verdict"] == "FAIL"
        full[(model, engine, adapter)] = "FAIL" if failed.any() else "PASS"
        base_failed = (failed & (g["scope"] == "base")).any()
        base[(model, engine)] = "FAIL" if base_failed or base.get((model, engine)) == "FAIL" \
            else "PASS"

    def one(r) -> str:
        if getattr(r, "status", "ok") != "ok":  # a row that did not run has no number to gate
            return "not run"
        got = base.get((r.model, r.engine)) if r.variant in BASE_VARIANTS \
            else full.get((r.model, r.engine, r.adapter))
        return got or "unvalidated"
    return [one(r) for r in bench.itertuples()]


# wildcards in each rule's benchmark path (benchmarks/<preset>/<rule>/<wildcards>.tsv); a rule
# not named here has model/engine/adapter, one with no folder of its own has none
JOB_WILDCARDS = {"fetch_model": ("model",), "quantize": ("model", "engine"),
                 "make_adapter": ("model", "adapter"), "bench_baseline": ("model", "engine"),
                 "peer_check": ("model", "engine")}
# the result kind each engine rule writes (its `kind`), to join a job's engine start figures
JOB_RESULT_KIND = {"bench_baseline": "bench", "bench_lora": "bench", "validate": "validate",
                   "peer_check": "peer_check", "tune_lora_kernels": "tuning",
                   "profile_memory": "memory"}


def job_time_rows(benchmarks_dir: str | Path, results: dict) -> list[dict]:
    """One row per job with a benchmark file: its wall seconds and peak RSS (Snakemake's
    `benchmark:`), and for engine jobs the figures that say where the time before the first
    timed request went. `results`: (kind, model, engine, adapter) -> result."""
    root = Path(benchmarks_dir)
    rows = []
    for tsv in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        rel = tsv.relative_to(root).with_suffix("")
        rule, names = rel.parts[0], rel.parts[1:]
        wildcards = dict(zip(JOB_WILDCARDS.get(rule, ("model", "engine", "adapter")), names))
        try:
            last = pd.read_csv(tsv, sep="\t").iloc[-1]  # a rerun appends a line
        except (pd.errors.EmptyDataError, IndexError):
            continue
        adapter = wildcards.get("adapter", "none" if rule in ("bench_baseline", "peer_check")
                                else None)
        row = {"rule": rule, "model": wildcards.get("model"), "engine": wildcards.get("engine"),
               "adapter": adapter, "job_s": float(last["s"]),
               "max_rss_mib": None if pd.isna(last.get("max_rss")) else float(last["max_rss"])}
        res = results.get((JOB_RESULT_KIND.get(rule), row["model"], row["engine"], adapter))
        if res is not None:
            metrics = res.get("metrics") or {}
            log = (metrics.get("engine_info") or {}).get("engine_log") or {}
            row.update(engine_start_s=metrics.get("engine_start_s"),
                       engine_init_s=log.get("engine_init_s"), compile_s=log.get("compile_s"),
                       started=res["env"].get("started"), finished=res["env"].get("finished"))
        rows.append(row)
    return rows


def collect(inputs: list[str], missing: list[str]) -> dict[str, list]:
    tables = {name: [] for name in TABLES}
    tables["status"] += missing_rows(missing)
    bench_memory = []
    tables["_results"] = {}
    for path in sorted(inputs):
        res = read_result(path)
        if res["kind"] == "tuning":
            # the job's engine and adapter are its path's (tuning/<model>/<engine>/<adapter>);
            # results written before tune_lora_kernels named them say engine "vllm", no adapter
            res["engine"], res["adapter"] = Path(path).with_suffix("").parts[-2:]
        tables["_results"][(res["kind"], res["model"], res["engine"], res["adapter"])] = res
        tables["status"].append({"kind": res["kind"], "model": res["model"],
                                 "engine": res["engine"], "adapter": res["adapter"],
                                 "status": res["status"], "reason": res.get("reason"),
                                 "file": str(path),
                                 **{f"env_{k}": res["env"].get(k) for k in ENV_KEYS}})
        if res["status"] != "ok":
            continue
        if res["kind"] == "bandwidth":
            tables["_bandwidth"] = res["metrics"]["bandwidth_bytes_s"]
        elif res["kind"] == "bench":
            tables["bench"] += bench_rows(res)
            tables["overhead"] += overhead_rows(res)
            tables["decode_profile"] += decode_profile_rows(res)
            bench_memory += bench_memory_rows(res)
        elif res["kind"] == "memory":
            tables["memory"] += memory_rows(res)
        elif res["kind"] == "peer_check":
            tables["peer_check"] += peer_check_rows(res)
        elif res["kind"] == "tuning":
            tables["tuning"] += tuning_rows(res)
        elif res["kind"] == "validate":
            tables["validation"] += validation_rows(res)
            tables["noise_floor"] += noise_floor_rows(res)
            tables["quality"] += quality_rows(res)
            tables["coverage"] += coverage_rows(res)
    # coverage does not depend on the adapter: one row set per (model, engine)
    seen = set()
    tables["coverage"] = [r for r in tables["coverage"] if not (
        (r["model"], r["engine"], r["family"]) in seen
        or seen.add((r["model"], r["engine"], r["family"])))]
    profiled = {(r["model"], r["engine"], r["adapter"]) for r in tables["memory"]}
    tables["memory"] += [r for r in bench_memory
                         if (r["model"], r["engine"], r["adapter"]) not in profiled]
    return tables


def main(inputs: list[str], outdir: str, missing: list[str] | None = None,
         models: dict | None = None, engines: dict | None = None,
         sources_file: str | None = None,
         benchmarks_dir: str | None = None) -> dict[str, pd.DataFrame]:
    tables = collect(inputs, missing or [])
    bandwidth = tables.pop("_bandwidth", None)
    results = tables.pop("_results")
    if benchmarks_dir:
        tables["job_times"] = job_time_rows(benchmarks_dir, results)
    frames = {name: pd.DataFrame(rows) for name, rows in tables.items()}
    for name in ("bench", "overhead"):
        if not frames[name].empty:
            frames[name]["validated"] = gate(frames[name], frames["validation"])
    if models:
        frames["sources"] = pd.DataFrame(source_rows(load_sources(sources_file or SOURCES),
                                                     frames, models, engines or {}, bandwidth))
    write_tables(outdir, frames)
    return frames


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
