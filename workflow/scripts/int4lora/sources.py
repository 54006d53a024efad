"""The source reports' published figures beside ours (resources/source-reports.yaml).

A source figure is matched to our model whose `reference_shape` is the figure's `shape`, on that
model's first-listed engine of the figure's backend (presets list an engine family's primary
setting first), with its first adapter. Throughput at batch 1 of a memory-bound decode scales with
memory bandwidth, so tok/s figures also get ours rescaled to the source GPU's bandwidth.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

SOURCES = Path(__file__).resolve().parents[3] / "resources" / "source-reports.yaml"
TOK_S = ("decode_tok_s_b1_base", "decode_tok_s_b1_lora")
GATED = (*TOK_S, "lora_overhead_pct_b1")
NOT_IN_RUN = "not in this run"  # our_config of a source figure no configuration of the run matches


def load_sources(path: str | Path = SOURCES) -> list[dict]:
    import yaml
    return yaml.safe_load(Path(path).read_text())


def _first(df: pd.DataFrame, **match):
    if df.empty:
        return None
    rows = df
    for k, v in match.items():
        if k not in rows:
            return None
        rows = rows[rows[k] == v]
    return None if rows.empty else rows.iloc[0]


def _value(row, column):
    return None if row is None or column not in row or pd.isna(row[column]) else row[column]


def our_figure(metric: str, frames: dict, model: str, engine: str, adapter: str | None):
    """(value, gate) of our figure for one source metric, or (None, None) where we have none."""
    bench, overhead, memory = frames["bench"], frames["overhead"], frames["memory"]
    if metric == "decode_tok_s_b1_base":
        row = _first(bench, model=model, engine=engine, variant="base", batch=1)
        return _value(row, "decode_tok_s_median"), _value(row, "validated")
    if metric == "decode_tok_s_b1_lora":
        row = _first(bench, model=model, engine=engine, adapter=adapter,
                     variant="lora-adapter", batch=1)
        return _value(row, "decode_tok_s_median"), _value(row, "validated")
    if metric == "lora_overhead_pct_b1":
        row = _first(overhead, model=model, engine=engine, adapter=adapter,
                     variant="lora-adapter", batch=1)
        ratio = _value(row, "tpot_ratio_median")
        return (None if ratio is None else (ratio - 1) * 100), _value(row, "validated")
    row = _first(memory, model=model, engine=engine,
                 adapter=adapter if metric.endswith("_lora") else "none")
    if metric in ("weights_gib", "kv_cache_pool_gib", "model_load_s"):
        row = row if row is not None else _first(memory, model=model, engine=engine)
        column = {"weights_gib": "engine_model_weights_gib",
                  "kv_cache_pool_gib": "engine_kv_cache_gib",
                  "model_load_s": "engine_model_load_s"}[metric]
        return _value(row, column), None
    if metric.startswith("peak_memory_gb"):
        peak = _value(row, "peak_bytes")
        return (None if peak is None else peak / 1e9), None
    raise ValueError(f"unknown source metric {metric!r}")


def _match(src: dict, models: dict, engines: dict) -> list[tuple[str, str, str | None]]:
    out = []
    for name, spec in models.items():
        if spec.get("reference_shape") != src["shape"]:
            continue
        engine = next((e for e in spec["engines"]
                       if engines.get(e, {}).get("backend") == src["engine"]), None)
        if engine:
            out.append((name, engine, (spec.get("adapters") or [None])[0]))
    return out


def source_rows(sources: list[dict], frames: dict, models: dict, engines: dict,
                bandwidth_bytes_s: float | None) -> list[dict]:
    rows = []
    for src in sources:
        matches = _match(src, models, engines) or [(None, None, None)]
        for fig in src["figures"]:
            for model, engine, adapter in matches:
                ours, gate = our_figure(fig["metric"], frames, model, engine, adapter) \
                    if model else (None, None)
                scaled = None
                if ours is not None and fig["metric"] in TOK_S and bandwidth_bytes_s \
                        and src.get("gpu_bandwidth_tb_s"):
                    scaled = ours * src["gpu_bandwidth_tb_s"] * 1e12 / bandwidth_bytes_s
                rows.append({"source": src["source"], "system": src["system"],
                             "gpu": src["gpu"], "metric": fig["metric"],
                             "source_value": fig["value"],
                             "our_value": None if ours is None or (
                                 isinstance(ours, float) and math.isnan(ours)) else ours,
                             "our_config": f"{model} / {engine} / {adapter}" if model
                             else NOT_IN_RUN,
                             # memory figures carry no verdict; speed figures always do
                             "validated": gate or ("unvalidated" if ours is not None
                                                   and fig["metric"] in GATED else None),
                             "bandwidth_normalised": scaled, "note": src.get("note")})
    return rows
