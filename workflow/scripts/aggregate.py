"""Rule aggregate: every result JSON -> tidy CSV tables (pandas). Reads only JSON."""

from pathlib import Path

import pandas as pd

from int4lora.memory import attribute, kv_cache_bytes
from int4lora.outputs import TABLES
from int4lora.profiling import CLASS_NAMES
from int4lora.resultio import read_json

STAT_KEYS = ("median", "p90", "p99", "std", "n")
ENV_KEYS = ("device", "gpu", "driver", "cuda", "cpu", "torch", "transformers", "vllm",
            "bitsandbytes", "peft", "llmcompressor", "compressed-tensors", "git_commit",
            "hostname", "config_hash", "started")


def _flat(prefix: str, stats: dict) -> dict:
    return {f"{prefix}_{k}": stats.get(k) for k in STAT_KEYS}


def bench_rows(res: dict) -> list[dict]:
    rows = []
    key = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "mode": res["params"]["mode"]}
    for run in res["metrics"].get("runs", []):
        row = {**key, "variant": run["variant"], "batch": run["batch"],
               "status": run.get("status", "ok"), "reason": run.get("reason")}
        for metric in ("ttft_s", "tpot_s", "e2e_s", "output_tok_s", "prefill_tok_s"):
            if metric in run:
                row.update(_flat(metric, run[metric]))
        for extra in ("bytes_per_step", "tpot_floor_s", "roofline_fraction"):
            row[extra] = run.get(extra)
        rows.append(row)
    return rows


def overhead_rows(res: dict) -> list[dict]:
    key = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"]}
    rows = []
    for o in res["metrics"].get("overhead", []):
        row = {**key, "batch": o["batch"], "variant": o["numerator"],
               "against": o["denominator"]}
        for metric in ("tpot_ratio", "e2e_ratio", "ttft_ratio"):
            row.update(_flat(metric, o[metric]))
        rows.append(row)
    return rows


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
    weights = storage["total_bytes"] if storage else 0
    adapter = m.get("adapter_bytes", 0) if res["adapter"] != "none" else 0
    kv = kv_cache_bytes(m["architecture"], batch, context)
    if "torch_peak_allocated_bytes" in mem:
        peak = mem["torch_peak_allocated_bytes"]
    else:
        peak = mem.get("nvml_device_used_bytes") or mem.get("peak_rss_bytes")
    row = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "source": "bench sweep", "batch": batch, "peak_bytes": peak, "weight_bytes": weights,
           "adapter_bytes": adapter, "kv_cache_bytes": kv}
    for key in ("engine_model_weights_gib", "engine_kv_cache_gib", "engine_cuda_graph_gib",
                "nvml_device_used_bytes", "torch_peak_reserved_bytes"):
        if mem.get(key) is not None:
            row[key] = mem[key]
    if mem.get("engine_kv_cache_gib") is not None:
        # vLLM preallocates its KV-cache pool and captures CUDA graphs: attribute the
        # engine's own figures, not the workload's KV bytes
        parts = {"weights": int((mem.get("engine_model_weights_gib") or 0) * 2**30),
                 "kv_cache_pool": int(mem["engine_kv_cache_gib"] * 2**30),
                 "cuda_graphs": int((mem.get("engine_cuda_graph_gib") or 0) * 2**30)}
        parts["activations_and_other"] = max((peak or 0) - sum(parts.values()), 0)
    else:
        parts = attribute(peak, 0, weights, adapter, kv)
    for part, value in parts.items():
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
           "kv_cache_bytes": m.get("kv_cache_bytes")}
    for part, value in (m.get("attribution") or {}).items():
        row[f"part_{part}"] = value
    for dtype, value in ((m.get("weight_storage") or {}).get("bytes_by_dtype") or {}).items():
        row[f"dtype_{dtype}"] = value
    return [row]


def validation_rows(res: dict) -> list[dict]:
    key = {"model": res["model"], "engine": res["engine"], "adapter": res["adapter"],
           "adapter_kind": res["metrics"].get("adapter_kind")}
    return [{**key, **c} for c in res["metrics"].get("checks", [])]


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
             "adapter_effect_rel_error": a.get("adapter_effect_rel_error"),
             "quant_top1_vs_original": (a.get("quantization") or {}).get("top1_agreement")}]


def missing_rows(paths: list[str]) -> list[dict]:
    """results/<kind>/<model>/<engine>/<adapter>.json that a partial report lacks."""
    rows = []
    for path in paths:
        parts = Path(path).with_suffix("").parts[-4:]
        kind, model, engine, adapter = parts if len(parts) == 4 else ("?", "?", "?", "?")
        rows.append({"kind": kind, "model": model, "engine": engine, "adapter": adapter,
                     "status": "missing", "reason": "no result: this job did not run "
                     "(partial report)", "file": str(path)})
    return rows


def main(inputs: list[str], outdir: str, missing: list[str] | None = None
         ) -> dict[str, pd.DataFrame]:
    tables = {name: [] for name in TABLES}
    tables["status"] += missing_rows(missing or [])
    bench_memory = []
    for path in sorted(inputs):
        res = read_json(path)
        tables["status"].append({"kind": res["kind"], "model": res["model"],
                                 "engine": res["engine"], "adapter": res["adapter"],
                                 "status": res["status"], "reason": res.get("reason"),
                                 "file": str(path),
                                 **{f"env_{k}": res["env"].get(k) for k in ENV_KEYS}})
        if res["status"] != "ok":
            continue
        if res["kind"] == "bench":
            tables["bench"] += bench_rows(res)
            tables["overhead"] += overhead_rows(res)
            tables["decode_profile"] += decode_profile_rows(res)
            bench_memory.append(bench_memory_rows(res))
        elif res["kind"] == "memory":
            tables["memory"] += memory_rows(res)
        elif res["kind"] == "validate":
            tables["validation"] += validation_rows(res)
            tables["quality"] += quality_rows(res)
            tables["coverage"] += coverage_rows(res)
    # coverage does not depend on the adapter: one row set per (model, engine)
    seen, unique = set(), []
    for row in tables["coverage"]:
        key = (row["model"], row["engine"], row["family"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    tables["coverage"] = unique
    profiled = {(r["model"], r["engine"], r["adapter"]) for r in tables["memory"]}
    tables["memory"] += [r for rows in bench_memory for r in rows
                         if (r["model"], r["engine"], r["adapter"]) not in profiled]
    Path(outdir).mkdir(parents=True, exist_ok=True)
    frames = {}
    for name, rows in tables.items():
        df = pd.DataFrame(rows)
        tmp = Path(outdir) / f".{name}.csv.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(Path(outdir) / f"{name}.csv")
        frames[name] = df
    return frames


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    sm = snakemake  # noqa: F821
    smk.run(sm, main, inputs=list(sm.input), outdir=sm.params.outdir,
            missing=list(sm.params.missing))
