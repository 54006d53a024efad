"""Rule report: Markdown + self-contained HTML from the tables and figures.

Correctness first: the verdict table opens the report, and every speed row of a
configuration whose validation failed is marked, never shown as a plain result.
"""

import base64
import html
from pathlib import Path

import pandas as pd

from plots import FIGURES

CAPTIONS = {
    "decode_throughput": "Output tokens/s vs batch, per model: engine without LoRA (base), "
                         "LoRA-enabled engine serving base requests (lora-base) and the adapter.",
    "lora_overhead": "Decode time per token of adapter requests relative to base requests on "
                     "the same LoRA-enabled engine, interleaved in one process (error bar: std).",
    "memory_breakdown": "Peak memory attributed to runtime, weights, adapter, KV cache and the "
                        "rest (activations, workspace).",
    "ttft": "Time to first token (prefill) vs batch.",
    "weight_coverage": "Share of weight elements stored in 4-bit, by module family.",
    "decode_time": "Batch-1 decode step: GPU kernel time per class (profiled call), then the "
                   "host gap up to the unprofiled TPOT.",
}
SECTION_FIGURES = ("decode_time",)  # shown in their own section, only when it has rows


def _figure(name: str) -> str:
    return f"![{name}](../figures/{name}.png)\n\n_{CAPTIONS[name]}_\n"


def _read(tables: Path, name: str) -> pd.DataFrame:
    try:
        return pd.read_csv(tables / f"{name}.csv")
    except (pd.errors.EmptyDataError, FileNotFoundError):
        return pd.DataFrame()


def _fmt(v, digits=4):
    if isinstance(v, float):
        if pd.isna(v):
            return "–"
        return f"{v:.{digits}g}"
    return "–" if v is None else str(v)


def md_table(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    if df.empty:
        return "_none_\n"
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v).replace("|", "/") for v in row) + " |")
    return "\n".join(lines) + "\n"


BASE_CHECKS = ("coverage", "agreement: base", "quantization", "quality")


def verdicts(validation: pd.DataFrame) -> pd.DataFrame:
    """Per (model, engine, adapter): the verdict of all checks, and of the checks that concern
    the base model alone (so an adapter-only failure does not condemn base speed rows)."""
    cols = ["model", "engine", "adapter", "verdict", "base_verdict", "failed_checks"]
    if validation.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (model, engine, adapter), g in validation.groupby(["model", "engine", "adapter"]):
        failed = g[g["verdict"] == "FAIL"]["check"].tolist()
        base_failed = g[(g["verdict"] == "FAIL") & (g["scope"] == "base")]["check"].tolist() \
            if "scope" in g else [c for c in failed if c.startswith(BASE_CHECKS)]
        rows.append({"model": model, "engine": engine, "adapter": adapter,
                     "verdict": "FAIL" if failed else "PASS",
                     "base_verdict": "FAIL" if base_failed else "PASS",
                     "failed_checks": "; ".join(failed) or "–"})
    return pd.DataFrame(rows, columns=cols)


def mark_speed_rows(bench: pd.DataFrame, verdict: pd.DataFrame) -> pd.DataFrame:
    """validated: PASS / FAIL: do not trust / unvalidated. Rows serving an adapter take that
    adapter's verdict; base rows take the base checks of every validation of the engine."""
    if bench.empty:
        return bench
    full = {(r.model, r.engine, r.adapter): r.verdict for r in verdict.itertuples()}
    base = {}
    for r in verdict.itertuples():
        key = (r.model, r.engine)
        base[key] = "FAIL" if "FAIL" in (base.get(key), r.base_verdict) else "PASS"

    def mark(r):
        serves_adapter = r.variant not in ("base", "lora-base")
        got = full.get((r.model, r.engine, r.adapter)) if serves_adapter \
            else base.get((r.model, r.engine))
        return {"PASS": "PASS", "FAIL": "FAIL: do not trust"}.get(got, "unvalidated")
    bench = bench.copy()
    bench["validated"] = [mark(r) for r in bench.itertuples()]
    return bench


def compare_sources(overhead: pd.DataFrame, sources: list[dict], models: dict,
                    engines: dict) -> pd.DataFrame:
    rows = []
    for src in sources:
        ours = overhead[(overhead["variant"] == "lora-adapter") & (overhead["batch"] == 1)] \
            if not overhead.empty else overhead
        matches = [m for m, spec in models.items() if spec.get("reference_shape") == src["shape"]]
        ours = ours[ours["model"].isin(matches) & (ours["engine"].map(
            lambda e: engines.get(e, {}).get("backend")) == src["engine"])] \
            if not ours.empty else ours
        if ours.empty:
            rows.append({**src, "ours": "not in this run", "our_config": "–"})
        for r in ours.itertuples():
            rows.append({**src, "ours": f"{(r.tpot_ratio_median - 1) * 100:+.1f}% "
                                        f"(std {r.tpot_ratio_std * 100:.1f})",
                         "our_config": f"{r.model} / {r.engine} / {r.adapter}, batch 1"})
    return pd.DataFrame(rows)


DECODE_LEAD = (
    "One batch-1 generate per configuration, torch-profiled after the timed sweep: "
    "`kernel µs/step` is the GPU kernel time of one decode step, split by kernel class in the "
    "class columns. `kernel/TPOT` divides it by the unprofiled batch-1 TPOT of the same "
    "variant; the rest, `host gap`, is time the GPU waits for the host (kernel launch, Python, "
    "scheduling). `whole trace` rows had no decode-step annotations: their kernel time is the "
    "whole capture, prefill included, over the number of decode steps.\n\n")


def _pct(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{v * 100:.1f}%"


def _num(v, digits: int) -> str:
    return "–" if v is None or pd.isna(v) else f"{v:,.{digits}f}"


def decode_profile_view(profile: pd.DataFrame) -> pd.DataFrame:
    """The decode_profile table for reading: percentages, µs to 0.1, ms to 0.01; only the
    kernel classes that hold time in some row."""
    shares = [c for c in profile.columns if c.startswith("share_")
              and profile[c].fillna(0).gt(0).any()]
    rows = []
    for r in profile.to_dict("records"):
        name = r.get("top_kernel")
        name = "–" if name is None or pd.isna(name) else \
            "`" + (name if len(name) <= 60 else name[:59] + "…").replace("`", "'") + "`"
        rows.append({
            "model": r["model"], "engine": r["engine"], "adapter": r["adapter"],
            "request": r["profiled_request"], "attribution": r["attribution"],
            "kernel µs/step": _num(r.get("kernel_us_per_step"), 1),
            "step period µs": _num(r.get("step_period_us"), 1),
            "TPOT ms (b=1)": _num(r.get("sweep_tpot_ms_batch1"), 2),
            "kernel/TPOT": _pct(r.get("kernel_fraction_of_tpot")),
            "host gap": _pct(r.get("host_gap_fraction")),
            **{c.removeprefix("share_"): _pct(r.get(c)) for c in shares},
            "top kernel": name, "top share": _pct(r.get("top_kernel_share"))})
    return pd.DataFrame(rows)


def environment(status: pd.DataFrame) -> str:
    if status.empty:
        return "_no results_\n"
    env_cols = [c for c in status.columns if c.startswith("env_")]
    uniq = status[env_cols].drop_duplicates(subset=[c for c in env_cols if c != "env_started"])
    return md_table(uniq.rename(columns=lambda c: c.removeprefix("env_")).drop(
        columns=["started"], errors="ignore"))


def decode_section(profile: pd.DataFrame) -> list[str]:
    if profile.empty:
        return []
    return ["## Where batch-1 decode time goes\n", DECODE_LEAD,
            md_table(decode_profile_view(profile)), _figure("decode_time")]


def build_markdown(tables: Path, figures: Path, preset: str, description: str,
                   sources: list[dict], models: dict, engines: dict) -> str:
    bench, overhead = _read(tables, "bench"), _read(tables, "overhead")
    validation, status = _read(tables, "validation"), _read(tables, "status")
    verdict = verdicts(validation)
    if "validated" not in bench:
        bench = mark_speed_rows(bench, verdict)
    failing = status[status["status"] != "ok"] if not status.empty else status
    parts = [f"# int4-lora-bench validation report: `{preset}`\n", description + "\n",
             "## Verdicts (correctness gates every speed number)\n", md_table(verdict),
             "### Checks\n", md_table(validation, ["model", "engine", "adapter", "adapter_kind",
                                                    "check", "value", "op", "limit", "floor",
                                                    "verdict", "reason", "note"]),
             "## Configurations that did not run\n",
             md_table(failing, ["kind", "model", "engine", "adapter", "status", "reason"]),
             "## Source reports side by side (LoRA decode overhead, batch 1)\n",
             md_table(compare_sources(overhead, sources, models, engines)),
             "## Latency and throughput (one row per model, engine, adapter, variant, batch)\n",
             "Times in seconds; `tok/s` is output tokens per second of the whole batch. "
             "`roofline` is the fastest possible decode step (bytes it must read over the "
             "measured memory bandwidth) divided by the measured TPOT.\n\n",
             md_table(bench, ["model", "engine", "adapter", "variant", "batch", "status",
                              "ttft_s_median", "ttft_s_p90", "ttft_s_p99", "tpot_s_median",
                              "tpot_s_p90", "tpot_s_p99", "tpot_s_std", "tpot_s_n",
                              "decode_tok_s_median", "e2e_tok_s_median", "prefill_tok_s_median",
                              "roofline_fraction", "validated"]),
             "## LoRA overhead (paired ratios against base requests on the same engine)\n",
             md_table(overhead, ["model", "engine", "adapter", "variant", "against", "batch",
                                 "tpot_ratio_median", "tpot_ratio_p90", "tpot_ratio_std",
                                 "tpot_ratio_n", "e2e_ratio_median", "ttft_ratio_median"]),
             *decode_section(_read(tables, "decode_profile")),
             "## Memory\n", md_table(_read(tables, "memory")),
             "## Quantization coverage\n", md_table(_read(tables, "coverage")),
             "## Agreement and quality\n", md_table(_read(tables, "quality")),
             "## Figures\n"]
    parts += [_figure(name) for name in FIGURES if name not in SECTION_FIGURES]
    parts += ["## Environment\n", environment(status)]
    return "\n".join(parts)


def to_html(markdown_text: str, figures: Path) -> str:
    import markdown
    body = markdown.markdown(markdown_text, extensions=["tables"])
    for name in FIGURES:
        png = figures / f"{name}.png"
        if png.exists():
            data = base64.b64encode(png.read_bytes()).decode()
            body = body.replace(f'src="../figures/{name}.png"',
                                f'src="data:image/png;base64,{data}"')
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>int4-lora-bench</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def main(tables: str, figures: str, out_md: str, out_html: str, preset: str,
         description: str = "", sources: list | None = None, models: dict | None = None,
         engines: dict | None = None):
    text = build_markdown(Path(tables), Path(figures), preset, html.escape(description),
                          sources or [], models or {}, engines or {})
    for path, content in ((out_md, text), (out_html, to_html(text, Path(figures)))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(content)
        tmp.replace(path)
    return text


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
