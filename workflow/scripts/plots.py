"""Rule plots: figures from the aggregated tables only (never from raw JSON)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from int4lora import summary  # noqa: E402
from int4lora.outputs import FIGURES  # noqa: E402
from int4lora.profiling import CLASS_NAMES  # noqa: E402
from int4lora.tables import read_table  # noqa: E402

GIB, MIB = 2**30, 2**20
NOT_PASSED = ("FAIL: do not trust", "unvalidated")


def _empty(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _batch_axis(ax, batches):
    """log2 x axis whose ticks are exactly the measured batch sizes."""
    ticks = sorted({int(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in ticks])
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)


def _save(fig, out: Path, title: str, note: str):
    """Title, then the run's caveat (CPU / synthetic weights) under it, in red."""
    fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, color="firebrick",
                 wrap=True)
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _status(validated) -> str:
    if validated == "PASS":
        return ""
    return " (FAIL)" if "FAIL" in str(validated) else " (unvalidated)"


def _series_label(setting: str, adapter: str, variant: str, engine: str | None = None) -> str:
    what = "base" if variant == "base" else (adapter if variant == "lora-adapter"
                                             else f"{adapter} {variant}")
    who = setting if engine in (None, setting) else f"{engine} · {setting}"
    return f"{who}: {what}"


def _grid(n_rows: int, n_cols: int, width: float = 4.6, height: float = 3.0):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows + 0.6),
                             squeeze=False)
    return fig, axes


def _errbar(g: pd.DataFrame, low: str, high: str):
    """Asymmetric bars from a CI (or quantiles) around the median; None where absent."""
    if low not in g.columns or high not in g.columns or g[[low, high]].isna().all().all():
        return None
    med = g["_y"]
    return [(med - g[low]).clip(lower=0).fillna(0), (g[high] - med).clip(lower=0).fillna(0)]


def _draw_series(ax, g: pd.DataFrame, label: str, color: str, style="-", yerr=None):
    passed = (g["validated"] == "PASS").all() if "validated" in g.columns else True
    ax.errorbar(g["batch"], g["_y"], yerr=yerr, color=color, capsize=3,
                linestyle=style, marker="o",
                markerfacecolor=color if passed else "white", label=label)


def _engine_grid(rows: pd.DataFrame, engines: dict, draw, ylabel: str):
    """One row per model, one panel per engine backend; `draw(ax, g, label, color, style)`
    draws one (setting, adapter, variant) series, already sorted by batch."""
    models, backends = sorted(rows["model"].unique()), sorted(rows["backend"].unique())
    if len(backends) == 1:  # one engine: the models side by side
        fig, row = _grid(1, len(models))
        axes = [[ax] for ax in row[0]]
    else:
        fig, axes = _grid(len(models), len(backends))
    colors = {s: f"C{i % 10}" for i, s in enumerate(sorted(rows["setting"].unique()))}
    styles = dict(zip(sorted(rows["adapter"].unique()), ("-", "--", "-.", ":", (0, (5, 1)))))
    for i, model in enumerate(models):
        for j, backend in enumerate(backends):
            ax, sub = axes[i][j], rows[(rows["model"] == model) & (rows["backend"] == backend)]
            if sub.empty:
                _empty(ax, f"{model}\n{backend}: not run")
                continue
            for (setting, adapter, variant), g in sub.groupby(["setting", "adapter", "variant"]):
                label = _series_label(setting, adapter, variant) + _status(g["validated"].iloc[0])
                draw(ax, g.sort_values("batch"), label, colors[setting], styles.get(adapter, "--"))
            _batch_axis(ax, sub["batch"])
            ax.set_title(f"{model} · {backend}", fontsize=9)
            ax.set_xlabel("batch (concurrent requests)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return fig


def _served(bench: pd.DataFrame, engines: dict) -> pd.DataFrame:
    """ok rows of base requests on the engine without LoRA and of the adapter itself."""
    if bench.empty:
        return bench
    rows = bench[(bench["status"] == "ok") & bench["variant"].isin(["base", "lora-adapter"])]
    return summary.with_setting(summary.with_decode_speed(rows), engines) if not rows.empty \
        else rows


def _save_empty(out: Path, text: str, title: str, note: str):
    """A figure that says why it has nothing to show (the report still embeds it)."""
    fig, axes = _grid(1, 1)
    _empty(axes[0][0], text)
    return _save(fig, out, title, note)


def decode_speed(bench: pd.DataFrame, out: Path, engines: dict, note: str):
    """Decode tok/s vs batch: base requests on the engine without LoRA (solid) and the
    adapter (one line style per adapter), per setting; bars from the CI where recorded."""
    rows = _served(bench, engines)
    if rows.empty:
        return _save_empty(out, "no benchmark rows", "Decode speed vs batch", note)

    def draw(ax, g, label, color, style):
        g = g.assign(_y=g["decode_tok_s_median"])
        _draw_series(ax, g, label, color, style,
                     _errbar(g, "decode_tok_s_ci_low", "decode_tok_s_ci_high"))
    fig = _engine_grid(rows, engines, draw, "decode tok/s (batch / TPOT)")
    _save(fig, out, "Decode speed vs batch (higher is better)", note)


def lora_overhead(overhead: pd.DataFrame, out: Path, engines: dict, note: str):
    """TPOT overhead % of adapter requests vs base requests per batch, one panel per model;
    CI bands where recorded; dotted lines and hollow markers where checks did not pass."""
    models = sorted(overhead["model"].unique()) if not overhead.empty else []
    fig, axes = _grid(1, max(len(models), 1), width=5.2, height=3.4)
    if not models:
        _empty(axes[0][0], "no LoRA overhead rows")
    rows = summary.with_setting(overhead, engines)
    for ax, model in zip(axes[0], models):
        sub = rows[rows["model"] == model]
        for k, ((engine, setting, adapter, variant), g) in enumerate(
                sub.groupby(["engine", "setting", "adapter", "variant"])):
            g = g.sort_values("batch")
            color, passed = f"C{k % 10}", (g["validated"] == "PASS").all()
            pct = (g["tpot_ratio_median"] - 1) * 100
            if {"tpot_ratio_ci_low", "tpot_ratio_ci_high"} <= set(g.columns) \
                    and g["tpot_ratio_ci_low"].notna().any():
                ax.fill_between(g["batch"], (g["tpot_ratio_ci_low"] - 1) * 100,
                                (g["tpot_ratio_ci_high"] - 1) * 100, color=color, alpha=0.15)
            label = _series_label(setting, adapter, variant, engine) + _status(
                g["validated"].iloc[0])
            ax.plot(g["batch"], pct, color=color, marker="o", linestyle="-" if passed else ":",
                    markerfacecolor=color if passed else "white", label=label)
        ax.axhline(0, color="grey", lw=0.8)
        _batch_axis(ax, sub["batch"])
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel("TPOT with adapter vs base requests (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out, "LoRA overhead per decode step (lower is better)", note)


MEMORY_PARTS = (("weights", "weights as stored (4-bit + scales; 16-bit embeddings)", "C0", None),
                ("adapter_lora", "adapter + LoRA slot buffers", "C1", None),
                ("kv_needed", "KV cache the largest batch needs", "C2", None),
                ("process_baseline", "process baseline: memory before the model loads",
                 "lightgrey", "//"))
LEGEND_BELOW = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.16),
                "ncol": 2, "frameon": False}


def _unit(values) -> tuple[float, str]:
    top = max([v for v in values if pd.notna(v)] or [0])
    return (GIB, "GiB") if top >= GIB else (MIB, "MiB")


def memory_breakdown(memory: pd.DataFrame, out: Path, note: str):
    """Left: what the workload needs, stacked, with the process baseline apart (hatched).
    Right: what an engine reserves up front (KV pool) and the measured peak."""
    mem = summary.memory_components(memory)
    fig, axes = plt.subplots(1, 2, figsize=(12, 2.2 + 0.4 * max(len(mem), 2)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    need, apart = axes[0]
    if mem.empty:
        _empty(need, "no memory rows")
        _empty(apart, "")
        return _save(fig, out, "Memory", note)
    labels = [f"{r.model} · {r.engine} · {r.adapter}" for r in mem.itertuples()]
    scale, unit = _unit((mem[["weights", "adapter_lora", "kv_needed", "process_baseline"]]
                         .fillna(0).sum(axis=1)))
    left = pd.Series(0.0, index=mem.index)
    for key, label, color, hatch in MEMORY_PARTS:
        values = mem[key].fillna(0) / scale
        if values.gt(0).any():
            need.barh(labels, values, left=left, color=color, hatch=hatch, edgecolor="grey",
                      linewidth=0.3, label=label)
            left += values
    need.invert_yaxis()
    need.set_xlabel(unit)
    need.set_title("What the workload needs", fontsize=9)
    need.legend(**LEGEND_BELOW)
    need.tick_params(axis="y", labelsize=7)
    _reserved_panel(apart, mem, labels)
    _save(fig, out, "Memory: needed vs reserved", note)


def _reserved_panel(ax, mem: pd.DataFrame, labels: list[str]):
    scale, unit = _unit(list(mem["kv_pool_reserved"]) + list(mem["peak"]))
    pool = mem["kv_pool_reserved"].fillna(0) / scale
    ax.barh(labels, pool, color="lightsteelblue", label="KV pool reserved by the engine")
    ax.scatter(mem["peak"] / scale, labels, color="black", marker="|", s=120, zorder=3,
               label="measured peak (torch / NVML / RSS)")
    ax.invert_yaxis()
    ax.set_yticklabels([])
    ax.set_xlabel(unit)
    ax.set_title("Reserved up front, and the measured peak\n(the peak also holds libraries, "
                 "activations and allocator slack)", fontsize=9)
    ax.legend(**LEGEND_BELOW)


def ttft(bench: pd.DataFrame, out: Path, engines: dict, note: str):
    """TTFT median per batch in the same grid; bars up to the p90 only where n >= 10."""
    rows = _served(bench, engines)
    if rows.empty:
        return _save_empty(out, "no benchmark rows", "Time to first token vs batch", note)

    def draw(ax, g, label, color, style):
        g = g.assign(_y=g["ttft_s_median"] * 1e3)
        upper = (g["ttft_s_p90"] * 1e3 - g["_y"]).where(g["ttft_s_n"] >= 10).clip(lower=0)
        yerr = [upper * 0, upper.fillna(0)] if upper.notna().any() else None
        _draw_series(ax, g, label, color, style, yerr)
    fig = _engine_grid(rows, engines, draw, "TTFT, client side (ms)")
    _save(fig, out, "Time to first token vs batch (lower is better)", note)


def weight_coverage(coverage: pd.DataFrame, out: Path):
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if coverage.empty:
        _empty(ax, "no coverage rows")
    else:
        cov = coverage.dropna(subset=["share_4bit"])
        pivot = cov.pivot_table(index=["model", "engine"], columns="family",
                                values="share_4bit", aggfunc="first")
        pivot.plot.bar(ax=ax)
        ax.set_ylabel("share of weight elements stored in 4-bit")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.set_title("Quantization coverage by module family")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def decode_segments(profile: pd.DataFrame) -> pd.DataFrame:
    """µs per batch-1 decode step: one column per kernel class with time in some row, then
    `host gap` (unprofiled TPOT − kernel time, at least 0); one row per profiled request."""
    rows = profile.dropna(subset=["kernel_us_per_step"]) if not profile.empty else profile
    if rows.empty:
        return pd.DataFrame()
    index = [f"{r.model} {r.engine} {r.profiled_request}"
             + (" (whole trace)" if r.attribution != "per-step" else "")
             for r in rows.itertuples()]
    seg = pd.DataFrame(index=index)
    for col in [c for c in rows.columns if c.startswith("share_")]:
        us = (rows[col].fillna(0) * rows["kernel_us_per_step"]).to_numpy()
        if (us > 0).any():
            seg[col.removeprefix("share_")] = us
    gap = rows["sweep_tpot_ms_batch1"] * 1e3 - rows["kernel_us_per_step"]
    seg["host gap"] = gap.clip(lower=0).fillna(0).to_numpy()
    return seg


def decode_time(profile: pd.DataFrame, out: Path):
    """Batch-1 decode step: kernel µs per class, then the host gap up to the unprofiled TPOT."""
    seg = decode_segments(profile)
    fig, ax = plt.subplots(figsize=(9, max(2.8, 1.2 + 0.45 * len(seg))))
    if seg.empty:
        _empty(ax, "no decode profile rows")
    else:
        left = pd.Series(0.0, index=seg.index)
        for col in seg.columns:
            # one colour per class whichever classes a run has
            style = {"color": "lightgrey", "hatch": "//", "edgecolor": "grey"} \
                if col == "host gap" else {"color": f"C{CLASS_NAMES.index(col) % 10}"}
            ax.barh(seg.index, seg[col], left=left,
                    label="host gap (TPOT − kernels)" if col == "host gap" else col, **style)
            left += seg[col]
        ax.invert_yaxis()
        ax.set_xlabel("µs per decode step (batch 1)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.tick_params(axis="y", labelsize=7)
    ax.set_title("Where batch-1 decode time goes")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(tables: str, outdir: str, models: dict | None = None,
         engines: dict | None = None) -> list[str]:
    """Every figure of FIGURES from the tables; `models`/`engines` (the config) name the
    engine backends and say which models have synthetic weights."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    engines = engines or {}
    status, validation = read_table(tables, "status"), read_table(tables, "validation")
    note = summary.run_kind(status, models or {}, read_table(tables, "quality"))
    verdict = summary.verdicts(validation)
    bench = summary.mark_rows(read_table(tables, "bench"), verdict)
    overhead = summary.mark_rows(read_table(tables, "overhead"), verdict)
    decode_speed(bench, out / "decode_throughput.png", engines, note)
    lora_overhead(overhead, out / "lora_overhead.png", engines, note)
    memory_breakdown(read_table(tables, "memory"), out / "memory_breakdown.png", note)
    ttft(bench, out / "ttft.png", engines, note)
    weight_coverage(read_table(tables, "coverage"), out / "weight_coverage.png")
    decode_time(read_table(tables, "decode_profile"), out / "decode_time.png")
    return [str(out / f"{name}.png") for name in FIGURES]


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
