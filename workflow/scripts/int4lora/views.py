"""The report's detail tables as render.Table views: units in headers, rounded numbers,
long names cut with the full name on hover, verdicts coloured, long tables folded."""
from __future__ import annotations

import pandas as pd

from . import render as R
from .render import Cell, Table
from .summary import anchor, bench_anchor, check_name, missing, overhead_anchor, records

OPS = {">=": "≥", "<=": "≤", ">": ">", "<": "<", "==": "="}
LATENCY_LEAD = (
    "TTFT: time to first token as the client sees it (prefill and queueing); TPOT: time per "
    "output token after the first (decode); decode tok/s = batch / TPOT; end-to-end tok/s "
    "counts the prefill too. Percentiles appear only where n supports them (p90: n ≥ 10, "
    "p99: n ≥ 100). `roofline` = fastest possible decode step (bytes it must read over the "
    "measured bandwidth) / measured TPOT.")
DECODE_LEAD = (
    "One batch-1 generate per configuration, torch-profiled after the timed sweep: "
    "`kernel µs/step` is the GPU kernel time of one decode step, split by kernel class. "
    "`kernel/TPOT` divides it by the unprofiled batch-1 TPOT of the same variant; the rest, "
    "`host gap`, is time the GPU waits for the host (kernel launch, Python, scheduling). "
    "`whole trace` rows had no decode-step annotations: their kernel time is the whole "
    "capture, prefill included, over the number of decode steps.")
GLOSSARY = [
    "**TTFT** (time to first token): client side = from submitting the batch to its first "
    "token, queueing and prefill included; engine side = what the engine records for prefill.",
    "**TPOT** (time per output token): decode time per token after the first, per request.",
    "**decode tok/s** = batch / TPOT: the decode rate of the whole batch. **End-to-end tok/s** "
    "= output tokens / end-to-end latency, so it also pays for prefill.",
    "**LoRA overhead**: TPOT of adapter requests / TPOT of base requests on the same "
    "LoRA-enabled engine, iterations interleaved in one process (paired), minus 1.",
    "**Roofline fraction**: the fastest possible decode step (bytes one step must read: 4-bit "
    "weights and scales, adapter, KV cache, over the measured copy bandwidth) / measured TPOT.",
    "**Noise floor**: the spread the same engine shows on identical inputs in the same run; "
    "a check's effect counts only when it clearly exceeds it.",
    "**n**: timed iterations behind a statistic (warm-up and compiling steps excluded).",
    "**95% CI**: bootstrap confidence interval of the median (or of the median paired ratio).",
    "**PASS / FAIL: do not trust / unvalidated**: the verdict of the correctness checks behind "
    "a number; unvalidated = this engine setting was benchmarked but not validated.",
]
FOLD_ROWS = 12


def _fold(title: str, n: int, always: bool = False) -> str | None:
    return f"{title} ({n} rows): show" if always or n > FOLD_ROWS else None


def _has(df: pd.DataFrame, column: str) -> bool:
    return column in df.columns and df[column].notna().any()


def _shows_setting(df: pd.DataFrame) -> bool:
    """A setting column only where some setting is more than the engine's name."""
    return _has(df, "setting") and (df["setting"].astype(str) != df["engine"].astype(str)).any()


def _key_cells(r: dict, with_setting: bool) -> list[Cell]:
    cells = [R.short(r["model"], 22), Cell(str(r["engine"]))]
    if with_setting:
        cells.append(R.short(r.get("setting"), 18))
    return cells + [Cell(str(r["adapter"]))]


def verdict_table(verdict: pd.DataFrame) -> Table:
    rows = [(anchor("verdict", r["model"], r["engine"], r["adapter"]),
             [R.short(r["model"], 24), Cell(r["engine"]), Cell(r["adapter"]),
              R.status_cell(r["verdict"]), R.status_cell(r["base_verdict"]),
              R.short(r["failed_checks"], 110)]) for r in verdict.to_dict("records")]
    return Table(["model", "engine", "adapter", "verdict", "base_verdict", "failed_checks"],
                 rows, fold=_fold("Verdicts", len(rows)))


def checks_table(validation: pd.DataFrame) -> Table:
    limit_col = "limit" if "limit" in validation.columns else "threshold"
    rows = []
    for i, r in enumerate(validation.to_dict("records")):
        op = OPS.get(r.get("op"), r.get("op") or "")
        cells = [R.short(r["model"], 22), Cell(r["engine"]), Cell(r["adapter"]),
                 R.short(check_name(r), 48), Cell(str(r.get("scope") or R.DASH)),
                 R.num(R.plain(r.get("value")), r.get("value")),
                 R.num(f"{op} {R.plain(r.get(limit_col))}".strip(), r.get(limit_col)),
                 R.num(R.plain(r.get("floor")), r.get("floor")),
                 R.status_cell(r.get("verdict")), R.short(r.get("reason"), 60)]
        rows.append((anchor("check", r["model"], r["engine"], r["adapter"], i), cells))
    headers = ["model", "engine", "adapter", "check", "scope", "value", "limit", "noise floor",
               "verdict", "reason"]
    return Table(headers, rows, fold=_fold("All checks", len(rows), True), cls="data sortable")


def missing_table(failing: pd.DataFrame) -> Table:
    rows = [(None, [Cell(r["kind"]), R.short(r["model"], 24), Cell(r["engine"]),
                    Cell(r["adapter"]), R.status_cell(r["status"]), R.short(r.get("reason"), 90)])
            for r in failing.to_dict("records")]
    return Table(["kind", "model", "engine", "adapter", "status", "reason"], rows,
                 fold=_fold("Configurations that did not run", len(rows)))


def _plain_table(df: pd.DataFrame, columns: list[str], status: dict | None = None) -> Table:
    """A small table with plain numbers; `status` maps a column to a text->status function."""
    cols = [c for c in columns if c in df.columns]
    rows = []
    for r in df.to_dict("records"):
        cells = []
        for c in cols:
            v = r.get(c)
            if status and c in status:
                cells.append(R.status_cell(status[c](v)))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(R.num(R.plain(v), v))
            else:
                cells.append(R.short(v, 40))
        rows.append((None, cells))
    return Table(cols, rows, fold=_fold("Rows", len(rows)))


def noise_floor_table(df: pd.DataFrame) -> Table:
    return _plain_table(df, ["model", "engine", "adapter", "scope", "p50", "p99", "max",
                             "confident_flips", "positions"])


TUNING_LEAD = ("vLLM's Triton LoRA kernels (shrink: x·A, expand: ·B added to the output) per "
               "key vLLM looks up (max_loras / slices / tokens m / k / n): its default config "
               "against the fastest candidate whose output matched the default's, µs per call "
               "in CUDA-graph replays with the LoRA weights coming from HBM. Keys the time "
               "budget did not reach keep vLLM's default.")


def tuning_lead(df: pd.DataFrame) -> str:
    """One sentence per tuned engine: the decode keys' speed-up range (what batch decode runs)."""
    parts = []
    for (model, engine), g in df.groupby(["model", "engine"], sort=True):
        tuned = g[(g["status"] == "tuned") & g["speedup"].notna()]
        decode = tuned[tuned["phase"] == "decode"] if "phase" in tuned else tuned
        if decode.empty:
            parts.append(f"{model} · {engine}: no key tuned ({len(g)} keys)")
            continue
        parts.append(f"{model} · {engine}: {len(tuned)} of {len(g)} keys tuned; at decode "
                     f"sizes the tuned configs run {decode['speedup'].min():.2f}–"
                     f"{decode['speedup'].max():.2f}× faster than vLLM's defaults")
    return "; ".join(parts) + "."


def tuning_table(df: pd.DataFrame) -> Table:
    return _plain_table(df, ["model", "engine", "label", "phase", "status", "default_us",
                             "tuned_us", "speedup", "candidates"])


def job_time_lead(df: pd.DataFrame) -> str:
    """One sentence: how long the run's jobs took, summed and from the first start to the last
    end, and what engine start cost."""
    total = df["job_s"].sum()
    text = f"{len(df)} jobs took {total / 60:.1f} min of job time in all (Snakemake's benchmark " \
           "files; jobs that hold the GPU run one at a time, so this is close to the wall time)"
    if _has(df, "started") and _has(df, "finished"):
        span = (pd.to_datetime(df["finished"]).max() - pd.to_datetime(df["started"]).min())
        text += f"; the benchmark and validation jobs ran from the first one's start to the " \
                f"last one's end in " \
                f"{span.total_seconds() / 60:.1f} min"
    if _has(df, "engine_start_s"):
        starts = df["engine_start_s"].dropna()
        text += f". Engine start (imports, engine process, weights, compile, CUDA graphs) took " \
                f"{starts.min():.0f}–{starts.max():.0f} s per benchmark job"
    return text + "."


def job_time_table(df: pd.DataFrame) -> Table:
    order = df.sort_values("started", na_position="first") if _has(df, "started") else df
    return _plain_table(order, ["rule", "model", "engine", "adapter", "job_s", "engine_start_s",
                                "engine_init_s", "compile_s", "max_rss_mib"])


def peer_check_table(df: pd.DataFrame) -> Table:
    df = df.assign(harness_e2e_ms=df.get("harness_e2e_ms"))
    within = {"within": lambda v: "PASS" if str(v) == "True" else
              ("FAIL" if str(v) == "False" else v)}
    return _plain_table(df, ["model", "engine", "batch", "input_len", "output_len",
                             "harness_e2e_ms", "vllm_bench_e2e_ms", "ratio", "within"], within)


def _percentile(r: dict, column: str, n_min: int) -> Cell:
    n = r.get("tpot_s_n") if column.startswith("tpot") else r.get(column.rsplit("_", 1)[0] + "_n")
    if missing(r.get(column)) or missing(n) or n < n_min:
        return Cell(R.DASH, cls="num", title=f"needs n ≥ {n_min}")
    return R.num(R.ms(r[column]), r[column])


def _ci(r: dict, low: str, high: str, fmt) -> Cell:
    if missing(r.get(low)) or missing(r.get(high)):
        return Cell(R.DASH, cls="num")
    return Cell(f"{fmt(r[low])} to {fmt(r[high])}", cls="num")


def _latency_columns(bench: pd.DataFrame) -> list[tuple[str, object]]:
    """(header, row -> Cell) for the columns this run has data for."""
    n = bench["tpot_s_n"] if "tpot_s_n" in bench.columns else pd.Series(dtype=float)
    cols = [("TTFT ms", lambda r: R.num(R.ms(r.get("ttft_s_median")), r.get("ttft_s_median")))]
    if _has(bench, "ttft_engine_s_median"):
        cols.append(("TTFT ms (engine)", lambda r: R.num(R.ms(r.get("ttft_engine_s_median")),
                                                         r.get("ttft_engine_s_median"))))
    cols.append(("TPOT ms", lambda r: R.num(R.ms(r.get("tpot_s_median")),
                                            r.get("tpot_s_median"))))
    if _has(bench, "tpot_s_ci_low"):
        cols.append(("TPOT ms 95% CI", lambda r: _ci(r, "tpot_s_ci_low", "tpot_s_ci_high",
                                                     R.ms)))
    if (n >= 10).any():
        cols.append(("TPOT ms p90", lambda r: _percentile(r, "tpot_s_p90", 10)))
    if (n >= 100).any():
        cols.append(("TPOT ms p99", lambda r: _percentile(r, "tpot_s_p99", 100)))
    cols.append(("n", lambda r: R.num(R.plain(r.get("tpot_s_n")), r.get("tpot_s_n"))))
    if _has(bench, "n_excluded_compile"):
        cols.append(("n excl. (compile)", lambda r: R.num(R.plain(r.get("n_excluded_compile")),
                                                          r.get("n_excluded_compile"))))
    for header, col, fmt in (("decode tok/s", "decode_tok_s_median", R.tok_s),
                             ("end-to-end tok/s", "e2e_tok_s_median", R.tok_s),
                             ("prefill tok/s", "prefill_tok_s_median", R.tok_s),
                             ("roofline", "roofline_fraction", R.pct)):
        cols.append((header, lambda r, c=col, f=fmt: R.num(f(r.get(c)), r.get(c))))
    return cols


def latency_table(bench: pd.DataFrame) -> Table:
    if bench.empty:
        return Table([], [])
    with_setting = _shows_setting(bench)
    cols = _latency_columns(bench)
    rows = []
    for r in bench.to_dict("records"):
        cells = _key_cells(r, with_setting) + [
            Cell(str(r["variant"])), R.num(str(r["batch"]), r["batch"]),
            R.status_cell(r.get("status"), r.get("reason") if not missing(r.get("reason"))
                          else None)]
        cells += [fn(r) for _, fn in cols]
        rows.append((bench_anchor(r), cells + [R.status_cell(r.get("validated"))]))
    headers = ["model", "engine", *(["setting"] if with_setting else []), "adapter", "variant",
               "batch", "status", *[h for h, _ in cols], "validated"]
    return Table(headers, rows, fold=_fold("Latency and throughput", len(rows), True),
                 cls="data sortable")


def overhead_table(overhead: pd.DataFrame) -> Table:
    if overhead.empty:
        return Table([], [])
    with_setting = _shows_setting(overhead)
    ci = _has(overhead, "tpot_ratio_ci_low")
    rows = []
    for r in overhead.to_dict("records"):
        cells = _key_cells(r, with_setting) + [
            Cell(str(r["variant"])), Cell(str(r["against"])), R.num(str(r["batch"]), r["batch"]),
            R.num(R.overhead(r.get("tpot_ratio_median")), r.get("tpot_ratio_median"))]
        if ci:
            cells.append(_ci(r, "tpot_ratio_ci_low", "tpot_ratio_ci_high", R.overhead))
        cells += [R.num(R.plain(r.get("tpot_ratio_n")), r.get("tpot_ratio_n")),
                  R.num(R.overhead(r.get("e2e_ratio_median")), r.get("e2e_ratio_median")),
                  R.num(R.overhead(r.get("ttft_ratio_median")), r.get("ttft_ratio_median")),
                  R.status_cell(r.get("validated"))]
        rows.append((overhead_anchor(r), cells))
    headers = ["model", "engine", *(["setting"] if with_setting else []), "adapter", "variant",
               "against", "batch", "TPOT overhead", *(["TPOT overhead 95% CI"] if ci else []),
               "n", "end-to-end overhead", "TTFT overhead", "validated"]
    return Table(headers, rows, fold=_fold("LoRA overhead", len(rows), True),
                 cls="data sortable")


def lora_cost_table(overhead: pd.DataFrame, bench: pd.DataFrame) -> Table | None:
    """What one adapter costs under each engine setting that served it: one row per (model,
    adapter, setting), the adapter requests' TPOT at the smallest batch, the paired overhead
    with its 95% CI at every measured batch, and the verdict. None where no model and adapter
    ran under more than one setting (nothing to choose between)."""
    if overhead.empty or "setting" not in overhead.columns:
        return None
    ov = overhead[overhead["variant"] == "lora-adapter"]
    if ov.empty or ov.groupby(["model", "adapter"])["setting"].nunique().max() < 2:
        return None
    batches = sorted(int(b) for b in ov["batch"].unique())
    rows = []
    for (model, adapter, engine, setting), g in ov.groupby(
            ["model", "adapter", "engine", "setting"], sort=True):
        by_batch = {int(r["batch"]): r for r in g.to_dict("records")}
        small = by_batch[min(by_batch)]
        tpot = records(bench, model=model, engine=engine, setting=setting, adapter=adapter,
                       variant="lora-adapter", batch=small["batch"])
        tpot_s = tpot[0]["tpot_s_median"] if tpot else None
        cells = [R.short(model, 22), R.short(f"{engine} · {setting}" if setting != engine
                                            else engine, 46), Cell(str(adapter)),
                 R.num(R.plain(None if tpot_s is None else tpot_s * 1e3), tpot_s)]
        for b in batches:
            r = by_batch.get(b)
            if r is None:
                cells.append(Cell(R.DASH, cls="num notrun", title="not measured"))
                continue
            text = R.overhead_ci(r.get("tpot_ratio_median"), r.get("tpot_ratio_ci_low"),
                                 r.get("tpot_ratio_ci_high"))
            cells.append(R.num(text, r.get("tpot_ratio_median"), overhead_anchor(r)))
        cells.append(R.status_cell(small.get("validated")))
        rows.append((anchor("lora-cost", model, engine, setting, adapter), cells))
    headers = ["model", "engine · setting", "adapter", f"adapter TPOT ms b={min(batches)}",
               *[f"overhead b={b} [95% CI]" for b in batches], "validated"]
    return Table(headers, rows, id="lora-cost-table", cls="data sortable")


KERNEL_LEAD = ("Every W4A16 kernel this run loaded, on the same checkpoint: TPOT median of base "
               "requests in ms per batch, on the engine without LoRA (else the LoRA engine's base "
               "requests, †). Adapter costs per kernel are in the LoRA cost table above.")


def _kernel_base_tpot(bench: pd.DataFrame) -> pd.DataFrame:
    """One row per (checkpoint, W4A16 kernel, batch): the fastest base-request TPOT median,
    from engines without LoRA where the kernel ran one, else from LoRA engines' base requests
    (on_lora_engine). Only checkpoints that ran more than one kernel."""
    need = {"w4a16_kernel", "checkpoint", "tpot_s_median", "variant", "status"}
    if bench.empty or not need <= set(bench.columns):
        return pd.DataFrame()
    b = bench[(bench["status"] == "ok") & bench["w4a16_kernel"].notna()
              & bench["checkpoint"].notna() & bench["tpot_s_median"].notna()
              & bench["variant"].isin(["base", "lora-base"])].copy()
    b["on_lora_engine"] = b["variant"] == "lora-base"
    # an engine without LoRA first, then the fastest
    b = b.sort_values(["on_lora_engine", "tpot_s_median"])
    b = b.drop_duplicates(["checkpoint", "w4a16_kernel", "batch"])
    kernels = b.groupby("checkpoint")["w4a16_kernel"].nunique()
    return b[b["checkpoint"].isin(kernels[kernels > 1].index)]


def kernel_lead(bench: pd.DataFrame) -> str:
    """The fastest kernel at each batch, per checkpoint: the answer the table holds."""
    b = _kernel_base_tpot(bench)
    parts = []
    for ckpt, g in b.groupby("checkpoint", sort=True):
        best = [f"b={int(batch)}: {_kernel_name(r['w4a16_kernel'])} "
                f"({R.plain(r['tpot_s_median'] * 1e3)} ms)"
                for batch, gb in g.groupby("batch", sort=True)
                for r in [gb.loc[gb["tpot_s_median"].idxmin()]]]
        parts.append(f"Fastest base decode (median) on {ckpt}: " + "; ".join(best) + ".")
    return " ".join(parts)


def _kernel_name(kernel: str) -> str:
    return str(kernel).replace("LinearKernel", "")


def kernel_table(bench: pd.DataFrame) -> Table | None:
    b = _kernel_base_tpot(bench)
    if b.empty:
        return None
    batches = sorted(int(x) for x in b["batch"].unique())
    rows = []
    for (ckpt, kernel), g in b.groupby(["checkpoint", "w4a16_kernel"], sort=True):
        by_batch = {int(r["batch"]): r for r in g.to_dict("records")}
        cells = [Cell(str(ckpt)), Cell(_kernel_name(kernel)),
                 R.short(", ".join(sorted(set(g["engine"].astype(str)))), 30)]
        for x in batches:
            r = by_batch.get(x)
            if r is None:
                cells.append(Cell(R.DASH, cls="num notrun", title="not measured"))
                continue
            text = R.plain(r["tpot_s_median"] * 1e3) + (" †" if r["on_lora_engine"] else "")
            cells.append(R.num(text, r["tpot_s_median"], bench_anchor(r)))
        rows.append((anchor("kernel", ckpt, kernel), cells))
    headers = ["checkpoint", "W4A16 kernel", "engine",
               *[f"base TPOT ms b={x}" for x in batches]]
    return Table(headers, rows, id="kernel-table", cls="data sortable")


def _class_shares(r: dict, shares: list[str]) -> Cell:
    """The kernel classes that hold time, largest first, in one cell (all on hover)."""
    held = sorted(((r.get(c) or 0.0, c.removeprefix("share_")) for c in shares
                   if not missing(r.get(c)) and r.get(c) > 0), reverse=True)
    text = " · ".join(f"{name} {R.pct(v, 0)}" for v, name in held if v >= 0.01)
    return Cell(text or R.DASH, title=" · ".join(f"{name} {R.pct(v)}" for v, name in held)
                or None)


def decode_profile_table(profile: pd.DataFrame) -> Table:
    """Percentages, µs to 0.1, ms to 0.01; the kernel classes that hold time in one cell."""
    shares = [c for c in profile.columns if c.startswith("share_")]
    rows = []
    for r in profile.to_dict("records"):
        cells = [R.short(r["model"], 22), Cell(r["engine"]), Cell(r["adapter"]),
                 Cell(str(r["profiled_request"])), Cell(str(r["attribution"]))]
        for col, digits in (("kernel_us_per_step", 1), ("step_period_us", 1),
                            ("sweep_tpot_ms_batch1", 2)):
            v = r.get(col)
            cells.append(R.num(R.DASH if missing(v) else f"{v:,.{digits}f}", v))
        cells += [R.num(R.pct(r.get(c)), r.get(c)) for c in
                  ("kernel_fraction_of_tpot", "host_gap_fraction")]
        cells += [_class_shares(r, shares), R.short(r.get("top_kernel"), 32, code=True),
                  R.num(R.pct(r.get("top_kernel_share")), r.get("top_kernel_share"))]
        rows.append((anchor("decode", r["model"], r["engine"], r["adapter"]), cells))
    headers = ["model", "engine", "adapter", "request", "attribution", "kernel µs/step",
               "step period µs", "TPOT ms (b=1)", "kernel/TPOT", "host gap",
               "kernel time by class", "top kernel", "top share"]
    return Table(headers, rows, fold=_fold("Decode profile", len(rows), True),
                 cls="data sortable")


MEMORY_VIEW = (("weights", "weights"), ("adapter_lora", "adapter + LoRA"),
               ("kv_needed", "KV needed"), ("kv_pool_reserved", "KV pool reserved"),
               ("process_baseline", "process baseline"), ("peak", "measured peak"))


def memory_table(parts: pd.DataFrame) -> Table:
    if parts.empty:
        return Table([], [])
    big = parts["weights"].max() >= 2**30
    unit, fmt = ("GiB", R.gib) if big else ("MiB", R.mib)
    rows = []
    for r in parts.to_dict("records"):
        cells = [R.short(r["model"], 24), Cell(r["engine"]), Cell(r["adapter"]),
                 Cell(str(r.get("source") or R.DASH)), R.num(R.plain(r.get("batch")),
                                                            r.get("batch"))]
        cells += [R.num((R.mib if k == "adapter_lora" else fmt)(r.get(k)), r.get(k))
                  for k, _ in MEMORY_VIEW]
        rows.append((anchor("memory", r["model"], r["engine"], r["adapter"]), cells))
    headers = ["model", "engine", "adapter", "source", "batch",
               *[f"{label} {'MiB' if k == 'adapter_lora' else unit}" for k, label in MEMORY_VIEW]]
    titles = {f"KV pool reserved {unit}": "preallocated by the engine up front (vLLM), "
                                          "not the workload's need",
              f"measured peak {unit}": "torch peak allocated (HF on GPU), NVML device used "
                                       "(vLLM) or peak RSS (CPU)"}
    return Table(headers, rows, fold=_fold("Memory", len(rows)), cls="data sortable",
                 header_titles=titles)


def coverage_table(coverage: pd.DataFrame) -> Table:
    if coverage.empty:
        return Table([], [])
    unit, fmt = ("GiB", R.gib) if coverage["bytes"].max() >= 2**30 else ("MiB", R.mib)
    rows = [(None, [R.short(r["model"], 24), Cell(r["engine"]), Cell(r["family"]),
                    R.num(fmt(r["bytes"]), r["bytes"]),
                    R.num(R.plain(r["elements"]), r["elements"]),
                    R.num(R.pct(r.get("share_4bit")), r.get("share_4bit"))])
            for r in coverage.to_dict("records")]
    return Table(["model", "engine", "family", f"size {unit}", "elements", "stored in 4 bit"],
                 rows, fold=_fold("Coverage", len(rows), True), cls="data sortable")


def quality_table(quality: pd.DataFrame) -> Table:
    if quality.empty:
        return Table([], [])
    keys = ["model", "engine", "adapter", "synthetic"]
    values = [c for c in quality.columns if c not in keys]
    rows = []
    for r in quality.to_dict("records"):
        cells = [R.short(r["model"], 24), Cell(r["engine"]), Cell(r["adapter"]),
                 Cell(str(r.get("synthetic")))]
        for c in values:
            fmt = R.pct if "top1" in c else R.plain
            cells.append(R.num(fmt(r.get(c)), r.get(c)))
        rows.append((None, cells))
    headers = keys + [c.replace("_", " ").replace("top1", "top-1") for c in values]
    return Table(headers, rows, fold=_fold("Agreement and quality", len(rows)))


def env_table(status: pd.DataFrame) -> Table:
    if status.empty:
        return Table([], [])
    env_cols = [c for c in status.columns if c.startswith("env_") and c != "env_started"]
    uniq = status[env_cols].dropna(how="all").drop_duplicates()
    rows = [(None, [R.short(v, 24) for v in r]) for r in uniq.itertuples(index=False)]
    return Table([c.removeprefix("env_") for c in env_cols], rows,
                 fold=_fold("Environment", len(rows), True))
