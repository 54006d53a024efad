"""Rule plots: figures from the aggregated tables only (never from raw JSON)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from int4lora.profiling import CLASS_NAMES  # noqa: E402

FIGURES = ("decode_throughput", "lora_overhead", "memory_breakdown", "ttft", "weight_coverage",
           "decode_time")


def _read(tables: str, name: str) -> pd.DataFrame:
    path = Path(tables) / f"{name}.csv"
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _empty(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _per_model_axes(models: list[str]):
    n = max(len(models), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    return fig, axes[0]


def decode_throughput(bench: pd.DataFrame, out: Path, metric: str, ylabel: str, title: str):
    ok = bench[bench["status"] == "ok"] if not bench.empty else bench
    models = sorted(ok["model"].unique()) if not ok.empty else []
    fig, axes = _per_model_axes(models)
    if not models:
        _empty(axes[0], "no benchmark rows")
    for ax, model in zip(axes, models):
        sub = ok[ok["model"] == model]
        for (engine, adapter, variant), g in sub.groupby(["engine", "adapter", "variant"]):
            g = g.sort_values("batch")
            label = f"{engine} {variant}" + ("" if adapter == "none" else f" ({adapter})")
            ax.errorbar(g["batch"], g[f"{metric}_median"], yerr=g[f"{metric}_std"],
                        marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(model)
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def lora_overhead(overhead: pd.DataFrame, out: Path):
    models = sorted(overhead["model"].unique()) if not overhead.empty else []
    fig, axes = _per_model_axes(models)
    if not models:
        _empty(axes[0], "no LoRA overhead rows")
    for ax, model in zip(axes, models):
        sub = overhead[overhead["model"] == model]
        for (engine, adapter, variant), g in sub.groupby(["engine", "adapter", "variant"]):
            g = g.sort_values("batch")
            pct = (g["tpot_ratio_median"] - 1) * 100
            ax.errorbar(g["batch"], pct, yerr=g["tpot_ratio_std"] * 100, marker="o", capsize=3,
                        label=f"{engine} {adapter} {variant}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(model)
        ax.set_xlabel("batch")
        ax.set_ylabel("decode time per token vs base requests (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("LoRA overhead (TPOT, same engine, interleaved)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def memory_breakdown(memory: pd.DataFrame, out: Path):
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(memory)), 4))
    parts = [c for c in memory.columns if c.startswith("part_")] if not memory.empty else []
    if not parts:
        _empty(ax, "no memory rows")
    else:
        labels = [f"{r.model}\n{r.engine}/{r.adapter}" for r in memory.itertuples()]
        bottom = pd.Series(0.0, index=memory.index)
        for part in parts:
            values = memory[part].fillna(0) / 2**20
            ax.bar(labels, values, bottom=bottom, label=part.removeprefix("part_"))
            bottom += values
        ax.set_ylabel("MiB at peak")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    ax.set_title("Memory at peak, by component")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


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


def main(tables: str, outdir: str) -> list[str]:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    bench = _read(tables, "bench")
    decode_throughput(bench, out / "decode_throughput.png", "e2e_tok_s",
                      "output tokens/s (median ± std)", "Decode throughput vs batch")
    decode_throughput(bench, out / "ttft.png", "ttft_s", "TTFT s (median ± std)",
                      "Time to first token vs batch")
    lora_overhead(_read(tables, "overhead"), out / "lora_overhead.png")
    memory_breakdown(_read(tables, "memory"), out / "memory_breakdown.png")
    weight_coverage(_read(tables, "coverage"), out / "weight_coverage.png")
    decode_time(_read(tables, "decode_profile"), out / "decode_time.png")
    return [str(out / f"{name}.png") for name in FIGURES]


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
