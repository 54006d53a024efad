"""Rule report: Markdown + self-contained HTML from the tables and figures.

Summary first (the answers a reader came for, at each engine's best validated setting, every
number linked to its row), then the figures that carry the story, then the tables. A speed
number whose checks failed is marked wherever it appears and never makes a headline.
"""

import base64
from pathlib import Path

import pandas as pd

from int4lora import render as R
from int4lora import summary as S
from int4lora.outputs import FIGURE_CAPTIONS, FIGURES, STORY_FIGURES
from int4lora.render import Block, Cell, Table
from int4lora.resultio import write_text_atomic
from int4lora.sources import NOT_IN_RUN
from int4lora.tables import read_table
from int4lora import views as V


def _figure(name: str) -> Block:
    return Block("figure", FIGURE_CAPTIONS[name], id=name, src=f"{name}.png")


def _link(text: str, ref: str | None) -> str:
    return f"[{text}](#{ref})" if ref else text


def _status_word(validated) -> str:
    return {"PASS": "PASS", "FAIL: do not trust": "FAIL: do not trust"}.get(validated,
                                                                            "unvalidated")


def _overhead_text(o: dict) -> str:
    if o.get("value") is None:
        return "not measured"
    ci = o.get("ci")
    spread = f"95% CI {R.overhead(ci[0])} to {R.overhead(ci[1])}" if ci else \
        f"no CI in this run, n = {R.plain(o.get('n'))}"
    return f"{_link(R.overhead(o['value']), o['ref'])} ({spread})"


def _why(r: dict) -> str:
    """The first failed check, and how many more."""
    failed = [c for c in str(r.get("failed_checks") or "").split("; ") if c and c != R.DASH]
    if r.get("verdict") != "FAIL" or not failed:
        return ""
    more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
    return f" ({_link(failed[0], r.get('verdict_ref'))}{more})"


def _who(r: dict) -> str:
    return f"**{r['backend']}**" + ("" if r["setting"] == r["backend"] else
                                    f" (setting `{r['setting']}`)")


def headline_items(rows: list[dict]) -> list[str]:
    """One line per (model, adapter): the fastest validated LoRA setting, by how much LoRA
    slows it, and the faster settings that did not pass (named, never as the headline)."""
    items = []
    for h in S.headlines(rows):
        best, text = h["best"], f"**{h['model']}** with `{h['adapter']}`: "
        if best:
            b = best["batch_small"]
            text += (f"fastest validated: {_who(best)} at "
                     f"{_link(R.tok_s(best['lora_small']['value']), best['lora_small']['ref'])}"
                     f" tok/s (batch {b}); LoRA costs "
                     f"{_overhead_text(best['overhead_small'])}; checks PASS.")
        elif {r["lora_small"]["validated"] for r in h["faster_unvalidated"]} == {"unvalidated"}:
            text += "no setting with this adapter was validated in this run."
        else:
            text += "no setting with this adapter passed its checks."
        for r in h["faster_unvalidated"]:
            lora, cost = r["lora_small"], r["overhead_small"]
            text += (f" {'Faster' if best else 'Fastest'}: {_who(r)} "
                     f"{_link(R.tok_s(lora['value']), lora['ref'])} tok/s, LoRA "
                     f"{_link(R.overhead(cost['value']), cost['ref'])}"
                     f", **{_status_word(lora['validated'])}**{_why(r)}.")
        items.append(text)
    return items


def validated_only_items(verdict: pd.DataFrame, rows: list[dict]) -> list[str]:
    """One line per (model, engine, adapter) that was validated but has no speed row in the
    summary (e.g. a run cut short after the expert-LoRA check): its verdict and what failed."""
    timed = {(r["model"], r["adapter"]) for r in rows}
    items = []
    for r in verdict.to_dict("records") if not verdict.empty else []:
        if (r["model"], r["adapter"]) in timed or r["adapter"] in (None, "none"):
            continue
        failed = "" if r["verdict"] == "PASS" else f" ({r['failed_checks']})"
        items.append(f"**{r['model']}** with `{r['adapter']}` on `{r['engine']}`: checks "
                     f"{_link(r['verdict'], S.anchor('verdict', r['model'], r['engine'], r['adapter']))}"
                     f"{failed}; no speed measured in this run.")
    return items


def _who_cell(who: str, also: str | None) -> Cell:
    """Engine and setting, cut so that the summary table fits the first screen."""
    cell = R.short(who, 46)
    cell.title = "; ".join(t for t in (cell.title, also) if t) or None
    return cell


ON_LORA_ENGINE = ("base requests on the LoRA-enabled engine, paired with the adapter's: this "
                  "run has no engine without LoRA for this setting")


def _speed_cell(n: dict, formatter=R.tok_s, title: str | None = None) -> Cell:
    """A summary number, coloured and labelled on hover unless its checks passed."""
    if n.get("value") is None:
        return Cell(R.DASH, cls="num notrun", title=title or "not measured")
    # memory numbers carry no verdict: only speed rows are marked
    status = "PASS" if n.get("validated") is None else _status_word(n["validated"])
    cls = "num" if status == "PASS" else f"num {R.STATUS_CLASS[status]}"
    note = None if status == "PASS" else status
    cell = R.num(formatter(n["value"]), n["value"], n["ref"], "; ".join(
        t for t in (title, note) if t) or None, cls)
    cell.md_note = note
    return cell


def _ci_text(o: dict) -> str:
    return R.overhead_ci(o.get("value"), *(o.get("ci") or (None, None)))


def _batch_header(rows: list[dict], key: str) -> str:
    batches = {r[key] for r in rows}
    return f"b={batches.pop()}" if len(batches) == 1 else ("smallest b" if key == "batch_small"
                                                           else "largest b")


def summary_table(rows: list[dict]) -> Table:
    small, large = _batch_header(rows, "batch_small"), _batch_header(rows, "batch_large")
    weights = [r["weights"]["value"] for r in rows if r["weights"]["value"] is not None]
    unit, weight_fmt = ("GiB", R.gib) if max(weights, default=0) >= 2**30 else ("MiB", R.mib)
    headers = ["model", "engine · setting", "adapter", "checks",
               f"decode tok/s {small}: base", "with LoRA", f"decode tok/s {large}: base",
               "with LoRA ", f"LoRA overhead {small} [95% CI]", f"LoRA overhead {large}",
               f"weights {unit}", "adapter + LoRA MiB", f"roofline {small}"]
    out = []
    for r in rows:
        who = r["backend"] if r["setting"] == r["backend"] else f"{r['backend']} · {r['setting']}"
        also = "also measured: " + ", ".join(r["alternatives"]) if r["alternatives"] else None
        no_ci = "no CI recorded in this run" if r["overhead_small"].get("value") is not None \
            and not r["overhead_small"].get("ci") else None
        on_lora = ON_LORA_ENGINE if r.get("base_on_lora_engine") else None
        base_fmt = (lambda v: f"{R.tok_s(v)} †") if on_lora else R.tok_s
        roof_fmt = (lambda v: f"{R.pct(v)} †") if on_lora else R.pct
        out.append((S.anchor("summary", r["model"], r["backend"], r["adapter"]), [
            R.short(r["model"], 24), _who_cell(who, also), Cell(r["adapter"]),
            R.status_cell(r["verdict"], r["failed_checks"], r["verdict_ref"]),
            _speed_cell(r["base_small"], base_fmt, on_lora), _speed_cell(r["lora_small"]),
            _speed_cell(r["base_large"], base_fmt, on_lora), _speed_cell(r["lora_large"]),
            _speed_cell(r["overhead_small"], lambda v: _ci_text(r["overhead_small"]), no_ci),
            _speed_cell(r["overhead_large"], R.overhead),
            _speed_cell(r["weights"], weight_fmt), _speed_cell(r["adapter_mem"], R.mib),
            _speed_cell(r["roofline"], roof_fmt, on_lora)]))
    titles = {"checks": "verdict of every check of this engine with this adapter",
              f"roofline {small}": "fastest possible decode step (bytes it must read over the "
                                   "measured bandwidth) / measured TPOT, base requests"}
    return Table(headers, out, id="summary-table", cls="data summary", header_titles=titles)


def sources_blocks(sources: pd.DataFrame) -> list:
    """The source figures this run has a configuration for, in a table; the others in one
    sentence (a run of other shapes should not fill the first screen with dashes)."""
    absent = sources["our_config"] == NOT_IN_RUN
    blocks = [Block("h3", "Source reports beside ours", id="sources")]
    if not absent.all():
        blocks.append(sources_table(sources[~absent]))
    if absent.any():
        systems = sources[absent].drop_duplicates(["source", "system"])
        listed = "; ".join(f"{r['source']} ({r['system']})" for r in systems.to_dict("records"))
        blocks.append(Block("p", f"Not in this run ({int(absent.sum())} figures): {listed}."))
    return blocks


def sources_table(sources: pd.DataFrame) -> Table:
    rows = []
    for i, r in zip(sources.index, sources.to_dict("records")):
        cells = [R.short(r.get("source"), 36), R.short(r.get("system"), 28),
                 R.short(r.get("metric"), 34), R.short(r.get("source_value"), 40),
                 Cell(R.plain(r.get("our_value")), href=r.get("ref") if not S.missing(
                     r.get("ref")) else None, cls="num"),
                 R.short(r.get("our_config"), 44), R.status_cell(r.get("validated"))]
        if "bandwidth_normalised" in r:
            cells.insert(5, Cell(R.plain(r["bandwidth_normalised"]), cls="num"))
        rows.append((S.anchor("source", i), cells))
    headers = ["source report", "system", "metric", "their figure", "ours", "our configuration",
               "checks"]
    if "bandwidth_normalised" in sources.columns:
        headers.insert(5, "ours, bandwidth-normalised")
    return Table(headers, rows, id="sources-table")


def load(tables: Path, sources: list[dict], models: dict, engines: dict) -> dict:
    """Every table, with verdicts applied (validated on each speed row), memory components,
    the summary rows and the source comparison."""
    t = {name: read_table(tables, name) for name in
         ("bench", "overhead", "memory", "validation", "coverage", "quality", "decode_profile",
          "status", "noise_floor", "peer_check", "sources", "tuning", "job_times")}
    t["verdict"] = S.verdicts(t["validation"])
    t["bench"] = S.with_setting(S.with_decode_speed(S.mark_rows(t["bench"], t["verdict"])),
                                engines)
    t["overhead"] = S.with_setting(S.mark_rows(t["overhead"], t["verdict"]), engines)
    t["memory_parts"] = S.memory_components(t["memory"])
    t["summary"] = S.summary_rows(t["bench"], t["overhead"], t["memory_parts"], t["verdict"],
                                  engines)
    if t["sources"].empty:
        t["sources"] = S.compare_sources(t["overhead"], sources, models, engines)
    return t


def summary_blocks(t: dict, preset: str, models: dict) -> list:
    caveat = S.run_kind(t["status"], models, t["quality"])
    blocks = [Block("h1", f"int4-lora-bench validation report: `{preset}`"),
              Block("p", f"**Run:** {S.run_line(t['status'])}")]
    if caveat:
        blocks.append(Block("p", f"**Read with care:** {caveat}."))
    blocks += [Block("h2", "Summary", id="summary"),
               Block("ul", items=headline_items(t["summary"])
                     + validated_only_items(t["verdict"], t["summary"])
                     or ["no configuration with an adapter ran"], id="headlines"),
               summary_table(t["summary"]) if t["summary"] else Block("p", "_no benchmark rows_"),
               Block("p", "Each engine at its best setting (validated first, then fastest with "
                          "the adapter); decode tok/s = batch / TPOT median; LoRA overhead = "
                          "TPOT of adapter requests over base requests on the same engine, "
                          "paired. Coloured numbers did not pass their checks: "
                          "**FAIL: do not trust** (red) or **unvalidated** (yellow). Every "
                          "number links to the row it comes from." +
                          (" † base requests on the LoRA-enabled engine (paired with the "
                           "adapter's): no engine without LoRA ran for that setting."
                           if any(r.get("base_on_lora_engine") for r in t["summary"]) else ""))]
    if not t["sources"].empty:
        blocks += sources_blocks(t["sources"])
    return blocks


def detail_blocks(t: dict, description: str) -> list:
    failing = t["status"][t["status"]["status"] != "ok"] if not t["status"].empty else t["status"]
    blocks = [Block("h2", "Figures", id="figures"), *[_figure(n) for n in STORY_FIGURES],
              Block("h2", "About this run", id="about"), Block("p", description or "–"),
              Block("h2", "Verdicts (correctness gates every speed number)", id="verdicts"),
              V.verdict_table(t["verdict"]), V.checks_table(t["validation"]),
              Block("h2", "Configurations that did not run", id="not-run"),
              V.missing_table(failing)]
    for name, title, view in (("noise_floor", "Noise floor (same engine, same inputs)",
                               V.noise_floor_table),
                              ("peer_check", "Peer check against `vllm bench latency`",
                               V.peer_check_table)):
        if not t[name].empty:
            blocks += [Block("h2", title, id=name.replace("_", "-")), view(t[name])]
    cost = V.lora_cost_table(t["overhead"], t["bench"])
    if cost is not None:
        blocks += [Block("h2", "LoRA cost by engine setting", id="lora-cost"),
                   Block("p", "The same adapter served under each engine setting this run "
                              "measured: TPOT of adapter requests over base requests on the same "
                              "engine, paired, per batch. Pick the fastest row that passed."), cost]
    kernels = V.kernel_table(t["bench"])
    if kernels is not None:
        blocks += [Block("h2", "W4A16 kernels by batch", id="kernels"),
                   Block("p", V.KERNEL_LEAD + " " + V.kernel_lead(t["bench"])), kernels]
    if not t["tuning"].empty:
        blocks += [Block("h2", "Punica kernels tuned on this GPU", id="tuning"),
                   Block("p", V.TUNING_LEAD + " " + V.tuning_lead(t["tuning"])),
                   V.tuning_table(t["tuning"])]
    blocks += [Block("h2", "Latency and throughput", id="latency"),
               Block("p", V.LATENCY_LEAD), V.latency_table(t["bench"]),
               Block("h2", "LoRA overhead (paired ratios against base requests on the same "
                           "engine)", id="overhead"), V.overhead_table(t["overhead"])]
    if not t["decode_profile"].empty:
        blocks += [Block("h2", "Where batch-1 decode time goes", id="decode-profile"),
                   Block("p", V.DECODE_LEAD), V.decode_profile_table(t["decode_profile"]),
                   _figure("decode_time")]
    blocks += [Block("h2", "Memory", id="memory"), V.memory_table(t["memory_parts"]),
               Block("h2", "Quantization coverage", id="coverage"),
               V.coverage_table(t["coverage"]), _figure("weight_coverage"),
               Block("h2", "Agreement and quality", id="quality"), V.quality_table(t["quality"]),
               Block("h2", "Time to first token", id="ttft"), _figure("ttft")]
    if not t["job_times"].empty:
        blocks += [Block("h2", "Job time", id="job-time"),
                   Block("p", V.job_time_lead(t["job_times"])), V.job_time_table(t["job_times"])]
    blocks += [Block("h2", "Glossary", id="glossary"), Block("ul", items=V.GLOSSARY),
               Block("h2", "Environment", id="environment"), V.env_table(t["status"])]
    return blocks


def build_blocks(tables: Path, preset: str, description: str, sources: list[dict],
                 models: dict, engines: dict) -> list:
    t = load(tables, sources, models, engines)
    return summary_blocks(t, preset, models) + detail_blocks(t, description)


def build_markdown(tables: Path, figures: Path, preset: str, description: str,
                   sources: list[dict], models: dict, engines: dict) -> str:
    return R.to_markdown(build_blocks(tables, preset, description, sources, models, engines))


def to_html(blocks: list, figures: Path, preset: str) -> str:
    images = {}
    for name in FIGURES:
        png = figures / f"{name}.png"
        if png.exists():
            images[png.name] = "data:image/png;base64," + base64.b64encode(
                png.read_bytes()).decode()
    return R.page(f"int4-lora-bench · {preset}", R.to_html(blocks, images))


def main(tables: str, figures: str, out_md: str, out_html: str, preset: str,
         description: str = "", sources: list | None = None, models: dict | None = None,
         engines: dict | None = None) -> str:
    blocks = build_blocks(Path(tables), preset, description, sources or [],
                          models or {}, engines or {})
    text = R.to_markdown(blocks)
    for path, content in ((out_md, text), (out_html, to_html(blocks, Path(figures), preset))):
        write_text_atomic(path, content)
    return text


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
