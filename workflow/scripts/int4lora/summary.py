"""Tables -> the report's summary: verdicts, marked speed rows, one summary row per
(model, engine, adapter) at the engine's best validated setting, headlines and the run line.

Pure functions over the aggregated tables (pandas). Older tables without the newer columns
(setting, decode_tok_s_*, *_ci_*, validated, scope, check_id, limit) still summarise.
"""
from __future__ import annotations

import math
import re

import pandas as pd

from .outputs import MEMORY_COLUMNS
from .sources import NOT_IN_RUN

# checks that concern the base model alone (older tables have no `scope` column)
BASE_CHECK_PREFIXES = ("coverage", "agreement: base", "quantization", "quality")
SHOWN = {"PASS": "PASS", "FAIL": "FAIL: do not trust", "not run": "not run"}
ENV_VERSIONS = (("torch", "torch"), ("vllm", "vLLM"), ("transformers", "transformers"),
                ("bitsandbytes", "bnb"), ("peft", "peft"), ("llmcompressor", "llmcompressor"),
                ("compressed-tensors", "compressed-tensors"))


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def anchor(kind: str, *parts) -> str:
    """A stable HTML id for the row a number comes from, e.g. bench-m-vllm-r16-qv-base-1."""
    text = "-".join(str(p) for p in (kind, *parts) if not missing(p))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower()


def check_name(row) -> str:
    name = row.get("check")
    return row.get("check_id") if missing(name) else name


def _is_base_check(row) -> bool:
    scope = row.get("scope")
    if not missing(scope):
        return scope in ("base", "model")
    return str(check_name(row)).startswith(BASE_CHECK_PREFIXES)


def verdicts(validation: pd.DataFrame) -> pd.DataFrame:
    """Per (model, engine, adapter): the verdict of all checks, and of the checks that concern
    the base model alone (so an adapter-only failure does not condemn base speed rows)."""
    cols = ["model", "engine", "adapter", "verdict", "base_verdict", "failed_checks"]
    if validation.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (model, engine, adapter), g in validation.groupby(["model", "engine", "adapter"]):
        failed = [r for r in g.to_dict("records") if r["verdict"] == "FAIL"]
        rows.append({"model": model, "engine": engine, "adapter": adapter,
                     "verdict": "FAIL" if failed else "PASS",
                     "base_verdict": "FAIL" if any(map(_is_base_check, failed)) else "PASS",
                     "failed_checks": "; ".join(str(check_name(r)) for r in failed) or "–"})
    return pd.DataFrame(rows, columns=cols)


def _verdict_maps(verdict: pd.DataFrame):
    full = {(r.model, r.engine, r.adapter): r.verdict for r in verdict.itertuples()}
    base = {}
    for r in verdict.itertuples():
        key = (r.model, r.engine)
        base[key] = "FAIL" if "FAIL" in (base.get(key), r.base_verdict) else "PASS"
    return full, base


def mark_rows(rows: pd.DataFrame, verdict: pd.DataFrame) -> pd.DataFrame:
    """validated: PASS / FAIL: do not trust / unvalidated / not run. A `validated` column the
    aggregate wrote wins; otherwise rows serving an adapter take that adapter's verdict and base
    rows the base checks of every validation of the engine."""
    if rows.empty:
        return rows
    rows = rows.copy()
    if "validated" in rows.columns and rows["validated"].notna().any():
        rows["validated"] = [SHOWN.get(v, "unvalidated") for v in rows["validated"]]
        return rows
    full, base = _verdict_maps(verdict)

    def mark(r):
        if getattr(r, "status", "ok") != "ok":  # no number, so nothing to gate
            return "not run"
        serves_adapter = r.variant not in ("base", "lora-base")
        got = full.get((r.model, r.engine, r.adapter)) if serves_adapter \
            else base.get((r.model, r.engine))
        return SHOWN.get(got, "unvalidated")
    rows["validated"] = [mark(r) for r in rows.itertuples()]
    return rows


def with_decode_speed(bench: pd.DataFrame) -> pd.DataFrame:
    """decode_tok_s_median = batch / TPOT median where the aggregate did not write it."""
    if bench.empty:
        return bench
    bench = bench.copy()
    derived = bench["batch"] / bench["tpot_s_median"]
    if "decode_tok_s_median" in bench.columns:
        bench["decode_tok_s_median"] = bench["decode_tok_s_median"].fillna(derived)
    else:
        bench["decode_tok_s_median"] = derived
    return bench


def with_setting(df: pd.DataFrame, engines: dict) -> pd.DataFrame:
    """`backend` (hf / vllm) from the config and `setting` (the aggregate's label, else the
    engine's config name) on every row."""
    if df.empty:
        return df
    df = df.copy()
    df["backend"] = [engines.get(e, {}).get("backend", str(e).split("-")[0])
                     for e in df["engine"]]
    label = df["setting"] if "setting" in df.columns else pd.Series(None, index=df.index)
    df["setting"] = [e if missing(s) else s for e, s in zip(df["engine"], label)]
    return df


def bench_anchor(r) -> str:
    return anchor("bench", r["model"], r["engine"], r.get("setting"), r["adapter"],
                  r["variant"], r["batch"])


def overhead_anchor(r) -> str:
    return anchor("overhead", r["model"], r["engine"], r.get("setting"), r["adapter"],
                  r["variant"], r["batch"])


def _num(row: dict | None, column: str, ref: str | None = None) -> dict:
    """One summary number: its value, the anchor of its row and that row's validation."""
    if row is None or missing(row.get(column)):
        return {"value": None, "ref": None, "validated": None}
    return {"value": row[column], "ref": ref, "validated": row.get("validated")}


def _at(rows: list[dict], batch) -> dict | None:
    return next((r for r in rows if r["batch"] == batch), None)


def records(df: pd.DataFrame, **match) -> list[dict]:
    """The rows of `df` whose columns equal `match`, by batch."""
    if df.empty:
        return []
    sel = pd.Series(True, index=df.index)
    for column, value in match.items():
        sel &= df[column] == value
    return sorted(df[sel].to_dict("records"), key=lambda r: r["batch"])


def _bench_num(rows: list[dict], batch, column: str = "decode_tok_s_median") -> dict:
    row = _at(rows, batch)
    return _num(row, column, row and bench_anchor(row))


def _ratio(row: dict | None) -> dict:
    num = _num(row, "tpot_ratio_median", row and overhead_anchor(row))
    if row is not None:
        low, high = row.get("tpot_ratio_ci_low"), row.get("tpot_ratio_ci_high")
        num["ci"] = None if missing(low) or missing(high) else (low, high)
        num["n"] = row.get("tpot_ratio_n")
    return num


def _candidates(g: pd.DataFrame, adapter: str) -> dict:
    """(engine, setting) -> its rows serving `adapter` (or base rows without an adapter)."""
    variant = "base" if adapter == "none" else "lora-adapter"
    rows = g[(g["adapter"] == adapter) & (g["variant"] == variant)]
    return {key: sorted(sub.to_dict("records"), key=lambda r: r["batch"])
            for key, sub in rows.groupby(["engine", "setting"], sort=True)}


def _rank(rows: list[dict]):
    """Best setting first: validated rows, then the fastest decode at the smallest batch."""
    return (rows[0].get("validated") == "PASS", rows[0]["decode_tok_s_median"])


def _base_rows(g: pd.DataFrame, engine: str, setting: str, adapter: str) -> tuple[list, bool]:
    """Base rows of the engine without LoRA, and False; where that engine did not run, the
    base requests of the LoRA-enabled engine (paired with the adapter's), and True."""
    rows = records(g, engine=engine, adapter="none", variant="base")
    same = [r for r in rows if r["setting"] == setting]
    if same:
        return same, False
    if rows:
        first = rows[0]["setting"]  # the engine's baseline under another label (its defaults)
        return [r for r in rows if r["setting"] == first], False
    on_lora = [r for r in records(g, engine=engine, adapter=adapter, variant="lora-base")
               if r["setting"] == setting] if adapter != "none" else []
    return on_lora, bool(on_lora)


def _memory_numbers(memory: pd.DataFrame, model: str, engine: str, adapter: str) -> dict:
    rows = records(memory, model=model, engine=engine, adapter=adapter) \
        if not memory.empty else []
    row = rows[0] if rows else None
    ref = anchor("memory", model, engine, adapter)
    return {"weights": _num(row, "weights", ref),
            "adapter_mem": _num(row, "adapter_lora", ref) if adapter != "none"
            else _num(None, "")}


def _verdict_of(verdict: pd.DataFrame, model: str, engine: str, adapter: str) -> dict:
    hit = verdict[(verdict["model"] == model) & (verdict["engine"] == engine)
                  & (verdict["adapter"] == adapter)] if not verdict.empty else verdict
    if adapter == "none" and not verdict.empty:
        hit = verdict[(verdict["model"] == model) & (verdict["engine"] == engine)]
        if not hit.empty:
            failed = hit["base_verdict"].eq("FAIL").any()
            return {"verdict": "FAIL" if failed else "PASS", "failed_checks": "base checks",
                    "verdict_ref": anchor("verdict", model, engine, hit.iloc[0]["adapter"])}
    if hit.empty:
        return {"verdict": "unvalidated", "failed_checks": "no validation of this engine",
                "verdict_ref": None}
    r = hit.iloc[0]
    return {"verdict": r["verdict"], "failed_checks": r["failed_checks"],
            "verdict_ref": anchor("verdict", model, engine, adapter)}


def _rival(overhead, verdict, model, backend, adapter, engine, setting, rows) -> dict:
    """A setting's headline numbers: LoRA decode speed and overhead at its smallest batch."""
    ov = records(overhead, model=model, engine=engine, setting=setting, adapter=adapter,
                  variant="lora-adapter") if adapter != "none" else []
    small = rows[0]["batch"]
    return {"model": model, "backend": backend, "engine": engine, "setting": setting,
            "adapter": adapter, **_verdict_of(verdict, model, engine, adapter),
            "batch_small": small, "_ov": ov,
            "lora_small": _bench_num(rows if adapter != "none" else [], small),
            "overhead_small": _ratio(_at(ov, small))}


def _summary_row(g, overhead, memory, verdict, model, backend, adapter) -> dict | None:
    cands = _candidates(g, adapter)
    if not cands:
        return None
    (engine, setting), rows = max(cands.items(), key=lambda kv: _rank(kv[1]))
    row = _rival(overhead, verdict, model, backend, adapter, engine, setting, rows)
    (base, base_on_lora_engine), ov = _base_rows(g, engine, setting, adapter), row.pop("_ov")
    small, large = rows[0]["batch"], rows[-1]["batch"]
    lora = rows if adapter != "none" else []
    rivals = [_rival(overhead, verdict, model, backend, adapter, e, s, r)
              for (e, s), r in cands.items() if (e, s) != (engine, setting)]
    for rival in rivals:
        rival.pop("_ov")
    return {**row, "batch_large": large,
            "base_small": _bench_num(base, small), "base_large": _bench_num(base, large),
            "lora_large": _bench_num(lora, large), "overhead_large": _ratio(_at(ov, large)),
            **_memory_numbers(memory, model, engine, adapter),
            "roofline": _bench_num(base, small, "roofline_fraction"),
            "base_on_lora_engine": base_on_lora_engine,
            "alternatives": [f"{r['engine']} · {r['setting']}" if r["setting"] != r["engine"]
                             else r["engine"] for r in rivals],
            "rivals": rivals}


def summary_rows(bench: pd.DataFrame, overhead: pd.DataFrame, memory: pd.DataFrame,
                 verdict: pd.DataFrame, engines: dict) -> list[dict]:
    """One row per (model, engine backend, adapter) at the backend's best setting: validated
    settings first, then the fastest with the adapter at the smallest batch. `bench` and
    `overhead` must carry `validated` (mark_rows); `memory` is memory_components()."""
    if bench.empty:
        return []
    ok = bench[bench["status"] == "ok"] if "status" in bench.columns else bench
    ok = with_setting(with_decode_speed(ok), engines)
    overhead = with_setting(overhead, engines)
    rows = []
    for (model, backend), g in ok.groupby(["model", "backend"], sort=True):
        adapters = sorted(a for a in g["adapter"].unique() if a != "none") or ["none"]
        for adapter in adapters:
            row = _summary_row(g, overhead, memory, verdict, model, backend, adapter)
            if row is not None:
                rows.append(row)
    return rows


def headlines(rows: list[dict]) -> list[dict]:
    """Per (model, adapter): the fastest validated LoRA setting at the smallest batch, and the
    faster settings, of any engine, that did not pass (named, never the headline)."""
    out = []
    keys = sorted({(r["model"], r["adapter"]) for r in rows if r["adapter"] != "none"})
    for model, adapter in keys:
        group = [c for r in rows if (r["model"], r["adapter"]) == (model, adapter)
                 for c in (r, *r.get("rivals", [])) if c["lora_small"]["value"] is not None]
        passed = [r for r in group if r["lora_small"]["validated"] == "PASS"]
        best = max(passed, key=lambda r: r["lora_small"]["value"]) if passed else None
        floor = best["lora_small"]["value"] if best else -1.0
        faster = sorted((r for r in group if r is not best and r["lora_small"]["value"] > floor
                         and r["lora_small"]["validated"] != "PASS"),
                        key=lambda r: -r["lora_small"]["value"])
        out.append({"model": model, "adapter": adapter, "best": best, "faster_unvalidated": faster})
    return out


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(float("nan"), index=df.index)


def _legacy_memory(memory: pd.DataFrame) -> dict[str, pd.Series]:
    """The memory components from the columns older aggregates wrote. Weights are the
    engine's without LoRA; what loading with LoRA adds on top (the adapter, in HF as fp32
    parameters; in vLLM the adapter slots' buffers, inside its weight figure) is the adapter
    part, at least the adapter's own bytes."""
    stored = _column(memory, "weight_bytes")
    loaded = (_column(memory, "engine_model_weights_gib") * 2**30).fillna(stored)
    no_lora = memory["adapter"] == "none"
    keys = list(zip(memory["model"], memory["engine"]))
    base = {k: (w, lo) for k, w, lo, none in zip(keys, stored, loaded, no_lora)
            if none}  # (checkpoint bytes, loaded bytes) of the engine without an adapter
    weights = pd.Series([base.get(k, (w, 0))[0] for k, w in zip(keys, stored)],
                        index=memory.index)
    added = pd.Series([lo - base.get(k, (0, w))[1] if not none else float("nan")
                       for k, lo, w, none in zip(keys, loaded, stored, no_lora)],
                      index=memory.index)
    adapter_lora = pd.concat([_column(memory, "adapter_bytes").fillna(0), added],
                             axis=1).max(axis=1).where(~no_lora)
    pool = _column(memory, "part_kv_cache_pool").fillna(
        _column(memory, "engine_kv_cache_gib") * 2**30)
    return {"weights": weights, "adapter_lora": adapter_lora,
            "kv_needed": _column(memory, "kv_cache_bytes"), "kv_pool_reserved": pool,
            # older aggregates wrote 0 where the baseline was not measured (GPU runs)
            "process_baseline": _column(memory, "part_runtime_before_load").where(lambda c: c != 0)}


def memory_components(memory: pd.DataFrame) -> pd.DataFrame:
    """model, engine, adapter, source, batch, peak + the MEMORY_COLUMNS components in bytes
    (the aggregate's columns where present, else derived from older ones)."""
    keys = [c for c in ("model", "engine", "setting", "adapter", "source", "batch")
            if c in memory.columns]
    if memory.empty:
        return pd.DataFrame(columns=keys + list(MEMORY_COLUMNS) + ["peak"])
    out = memory[keys].copy()
    legacy = _legacy_memory(memory)
    for key, column in MEMORY_COLUMNS.items():
        out[key] = memory[column] if column in memory.columns else legacy[key]
    out["peak"] = _column(memory, "peak_bytes")
    return out


def compare_sources(overhead: pd.DataFrame, sources: list[dict], models: dict,
                    engines: dict) -> pd.DataFrame:
    """The config's source_reports beside our batch-1 LoRA overhead on the same model shape
    and engine backend (for runs whose aggregate wrote no `sources` table)."""
    cols = ["source", "system", "metric", "source_value", "our_value", "our_config",
            "validated", "ref"]
    ours = with_setting(overhead, engines)
    if not ours.empty:
        ours = ours[(ours["variant"] == "lora-adapter") & (ours["batch"] == 1)]
    rows = []
    for src in sources:
        shapes = [m for m, spec in models.items() if spec.get("reference_shape") == src["shape"]]
        hit = ours[ours["model"].isin(shapes) & (ours["backend"] == src["engine"])] \
            if not ours.empty else ours
        base = {"source": src["source"], "system": f"{src['shape']} · {src['engine']}",
                "metric": "LoRA decode overhead, batch 1", "source_value": src["figure"]}
        if hit.empty:
            rows.append({**base, "our_value": None, "our_config": NOT_IN_RUN,
                         "validated": None, "ref": None})
        for r in hit.to_dict("records"):
            rows.append({**base, "our_value": f"{(r['tpot_ratio_median'] - 1) * 100:+.1f}%",
                         "our_config": f"{r['model']} · {r['setting']} · {r['adapter']}",
                         "validated": r.get("validated"), "ref": overhead_anchor(r)})
    return pd.DataFrame(rows, columns=cols)


def _unique(status: pd.DataFrame, column: str) -> list[str]:
    if column not in status.columns:
        return []
    return sorted({str(v) for v in status[column].dropna()})


def run_line(status: pd.DataFrame) -> str:
    """The run in one line: device, versions, date(s) and commit(s) from the env columns."""
    if status.empty:
        return "no results"
    gpus = _unique(status, "env_gpu")
    devices = _unique(status, "env_device")
    device = " / ".join(gpus) if gpus else (
        f"CPU ({', '.join(_unique(status, 'env_cpu')) or 'unknown'})" if "cpu" in devices
        else "unknown device")
    parts = [device]
    for key, label in ENV_VERSIONS:
        values = _unique(status, f"env_{key}")
        if values:
            parts.append(f"{label} {'/'.join(values)}")
    dates = sorted({v[:10] for v in _unique(status, "env_started")})
    if dates:
        parts.append(dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")
    commits = sorted({c[:7] for c in _unique(status, "env_git_commit")})
    if commits:
        parts.append(f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}")
    return " · ".join(parts)


def run_kind(status: pd.DataFrame, models: dict, quality: pd.DataFrame | None = None) -> str:
    """'' for a GPU run on real weights; else what the reader must know about the numbers."""
    notes = []
    devices = _unique(status, "env_device") if not status.empty else []
    if devices and all(d == "cpu" for d in devices):
        notes.append("CPU run: timings show the method, not GPU serving speed")
    gpus = _unique(status, "env_gpu") if not status.empty else []
    if len(gpus) > 1:
        notes.append(f"results from {len(gpus)} GPU models ({', '.join(gpus)}): compare rows "
                     f"only where their GPU is the same")
    synthetic = {m for m, spec in models.items() if spec.get("source") == "synthetic"}
    if quality is not None and not quality.empty and "synthetic" in quality.columns:
        synthetic |= set(quality.loc[quality["synthetic"].astype(str) == "True", "model"])
    if synthetic:
        notes.append(f"synthetic weights (seeded random): {', '.join(sorted(synthetic))}")
    return "; ".join(notes)
