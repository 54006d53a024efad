"""The report: summary rows, number formats, table views, the registry of outputs, and the
report rendered from the committed H100 run's tables and from tables with the newer columns."""
import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from conftest import ROOT

import aggregate  # noqa: E402
import plots  # noqa: E402
import report  # noqa: E402
from int4lora import outputs, render, summary  # noqa: E402
from int4lora import views as V  # noqa: E402

H100 = ROOT / "docs" / "runs" / "2026-11-23-h100-gpu-synthetic" / "results" / "tables"
GPU_CONFIG = yaml.safe_load((H100.parents[1] / "config.yaml").read_text())  # the run's preset
ENGINES = {"hf": {"backend": "hf"}, "vllm": {"backend": "vllm"}}
ANCHOR = re.compile(r'<a id="[^"]*"></a>')


# --------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("value, text", [
    (14540.13, "14,540"), (67390.0, "67,390"), (0.0001, "0.0001"), (1.2e-7, "0.00000012"),
    (3.7854, "3.79"), (0.003728, "0.00373"), (4125481856, "4,125,481,856"), (0.0, "0"),
    (float("nan"), "–"), (None, "–"), (True, "True"), ("PASS", "PASS")])
def test_plain_numbers_never_use_scientific_notation(value, text):
    assert render.plain(value) == text


def test_unit_formatters():
    assert render.ms(0.003728) == "3.73" and render.ms(2.0909) == "2,091"
    assert render.tok_s(15.3) == "15.3" and render.tok_s(5083.59) == "5,084"
    assert render.gib(4125481856) == "3.84" and render.mib(13631488) == "13.0"
    assert render.pct(0.355) == "35.5%" and render.overhead(1.4559) == "+46%"
    assert render.overhead(0.9933) == "-1%" and render.ms(None) == "–"


def test_short_names_keep_the_full_name_on_hover():
    name = "void gemm_4bit_simt<__nv_bfloat16, 1>(__nv_bfloat16 const*, unsigned char const*)"
    cell = render.short(name, 36, code=True)
    assert len(cell.text) == 36 and cell.text.endswith("…") and cell.title == name
    assert render.short("hf", 36).title is None
    table = render.Table(["kernel"], [("k1", [cell])])
    assert f'title="{render.html.escape(name)}"' in render.html_table(table)
    assert "`void gemm_4bit_simt<" in render.md_table(table)  # code: < survives Markdown


def test_inline_markup_is_escaped_then_linked():
    out = render.inline_html("**a** `b<c>` [3.1](#bench-x) <script>")
    assert out == ('<strong>a</strong> <code>b&lt;c&gt;</code> <a href="#bench-x">3.1</a> '
                   "&lt;script&gt;")


# --------------------------------------------------------------------------- new-format tables

def _bench_row(engine, setting, adapter, variant, batch, tpot, validated, n=20):
    tok = batch / tpot
    return {"model": "m7", "engine": engine, "adapter": adapter, "mode": "lora",
            "variant": variant, "batch": batch, "status": "ok", "reason": None,
            "setting": setting, "ttft_s_median": 0.02 * batch, "ttft_s_p90": 0.025 * batch,
            "ttft_s_n": n, "ttft_engine_s_median": 0.015 * batch, "tpot_s_median": tpot,
            "tpot_s_ci_low": tpot * 0.97, "tpot_s_ci_high": tpot * 1.04,
            "tpot_s_min": tpot * 0.9, "tpot_s_max": tpot * 1.2, "tpot_s_p90": tpot * 1.05,
            "tpot_s_p99": None, "tpot_s_n": n, "decode_tok_s_median": tok,
            "decode_tok_s_ci_low": tok * 0.96, "decode_tok_s_ci_high": tok * 1.03,
            "output_tok_s_median": tok * 0.8, "prefill_tok_s_median": 9000.0,
            "roofline_fraction": 0.4, "n_excluded_compile": 2, "validated": validated,
            "lora_modules": "q_proj,v_proj", "max_loras": 4, "w4a16_kernel": "machete",
            "lora_kernel_configs": "tuned" if "tuned" in setting else "default"}


# (engine, setting): (base TPOT or None, LoRA TPOT, validated of the LoRA rows)
SETTINGS = {("hf", "HF defaults"): (0.035, 0.05, "PASS"),
            ("vllm", "vLLM defaults"): (0.0037, 0.006, "PASS"),
            ("vllm", "q,v only + tuned"): (None, 0.005, "PASS"),
            ("vllm", "Marlin"): (0.0032, 0.004, "unvalidated")}


def _new_tables(root: Path) -> Path:
    bench, overhead = [], []
    for (engine, setting), (base, lora, validated) in SETTINGS.items():
        for batch in (1, 16):
            if base:
                bench.append(_bench_row(engine, setting, "none", "base", batch, base, "PASS"))
            bench.append(_bench_row(engine, setting, "r16", "lora-adapter", batch, lora,
                                    validated))
            ratio = 1.08 if "tuned" in setting else 1.3
            overhead.append({"model": "m7", "engine": engine, "setting": setting,
                             "adapter": "r16", "batch": batch, "variant": "lora-adapter",
                             "against": "lora-base", "tpot_ratio_median": ratio,
                             "tpot_ratio_ci_low": ratio - 0.03, "tpot_ratio_ci_high": ratio + 0.04,
                             "tpot_ratio_n": 20, "e2e_ratio_median": ratio - 0.02,
                             "ttft_ratio_median": 1.01, "validated": validated})
    checks = [{"model": "m7", "engine": e, "adapter": "r16", "check_id": cid, "scope": scope,
               "value": value, "limit": limit, "floor": 0.2, "verdict": "PASS", "reason": None}
              for e in ("hf", "vllm") for cid, scope, value, limit in (
                  ("coverage.linear_4bit", "model", 1.0, 0.99),
                  ("control.same_call", "adapter", 0.0, 0.0001))]
    memory = [{"model": "m7", "engine": e, "adapter": a, "source": "bench sweep", "batch": 16,
               "peak_bytes": 7.3e10, "mem_weights_bytes": 4.1e9,
               "mem_adapter_lora_bytes": 3.4e8 if a != "none" else None,
               "mem_kv_needed_bytes": 1.3e9, "mem_kv_pool_reserved_bytes": 6.6e10,
               "mem_process_baseline_bytes": 5.2e8}
              for e in ("hf", "vllm") for a in ("none", "r16")]
    status = [{"kind": "bench", "model": "m7", "engine": "vllm", "adapter": "r16",
               "status": "ok", "reason": None, "file": "x.json", "env_device": "cuda",
               "env_gpu": "NVIDIA H100 80GB HBM3", "env_torch": "2.11.0", "env_vllm": "0.26.0",
               "env_git_commit": "0123456789abcdef", "env_started": "2026-12-01T10:00:00Z"}]
    frames = {
        "bench": bench, "overhead": overhead, "validation": checks, "memory": memory,
        "status": status, "quality": [], "coverage": [], "decode_profile": [],
        "noise_floor": [{"model": "m7", "engine": "vllm", "adapter": "r16", "scope": "base",
                         "p50": 0.01, "p99": 0.17, "max": 0.2, "confident_flips": 0,
                         "positions": 512}],
        "peer_check": [{"model": "m7", "engine": "vllm", "batch": 1, "input_len": 128,
                        "output_len": 32, "harness_e2e_ms": 131.2, "vllm_bench_e2e_ms": 129.9,
                        "ratio": 1.01, "within": True},
                       {"model": "m7", "engine": "vllm", "batch": 8, "input_len": 128,
                        "output_len": 32, "harness_e2e_ms": 160.0, "vllm_bench_e2e_ms": 140.0,
                        "ratio": 1.14, "within": False}],
        "sources": [{"source": "vLLM INT4 + LoRA report", "system": "qwen-32b · vllm",
                     "metric": "LoRA decode overhead, batch 1", "source_value": "+20%",
                     "our_value": "+8%", "our_config": "m7 · q,v only + tuned · r16",
                     "validated": "PASS", "bandwidth_normalised": 0.93}]}
    return _write_tables(root, **frames)


# every table report.load reads; a test names the ones it fills
REPORT_TABLES = ("bench", "overhead", "validation", "memory", "status", "quality", "coverage",
                 "decode_profile", "noise_floor", "peer_check", "sources")


def _write_tables(root: Path, **frames) -> Path:
    """<root>/tables/<name>.csv for every table report.load reads (empty where not given)."""
    tables = root / "tables"
    tables.mkdir(parents=True)
    for name in dict.fromkeys((*REPORT_TABLES, *frames)):
        pd.DataFrame(frames.get(name, [])).to_csv(tables / f"{name}.csv", index=False)
    return tables


@pytest.fixture()
def new_run(tmp_path):
    tables = _new_tables(tmp_path)
    t = report.load(tables, [], {}, ENGINES)
    return tables, t


def test_summary_takes_the_fastest_validated_setting(new_run):
    _, t = new_run
    rows = {r["backend"]: r for r in t["summary"]}
    vllm = rows["vllm"]
    # Marlin is faster but unvalidated: the validated tuned setting is the engine's best
    assert vllm["setting"] == "q,v only + tuned"
    assert vllm["lora_small"]["value"] == pytest.approx(200.0)
    assert vllm["overhead_small"]["ci"] == pytest.approx((1.05, 1.12))
    # the tuned setting has no baseline of its own: the engine's defaults stand in
    assert vllm["base_small"]["ref"] == "bench-m7-vllm-vllm-defaults-none-base-1"
    assert vllm["weights"]["value"] == 4.1e9 and vllm["adapter_mem"]["value"] == 3.4e8
    assert sorted(vllm["alternatives"]) == ["vllm · Marlin", "vllm · vLLM defaults"]
    (head,) = summary.headlines(t["summary"])
    assert head["best"]["setting"] == "q,v only + tuned"
    assert [r["setting"] for r in head["faster_unvalidated"]] == ["Marlin"]


def test_summary_base_from_the_lora_engine_where_no_baseline_engine_ran(tmp_path):
    """A preset without a LoRA-less engine (gpu-seeds): the base columns show the LoRA engine's
    own base requests, marked, never an empty cell nor another engine's baseline."""
    rows = [_bench_row("vllm", "q,v", "r16", variant, b, tpot, "PASS")
            for b in (1, 8) for variant, tpot in (("lora-base", 0.004), ("lora-adapter", 0.005))]
    tables = _write_tables(tmp_path, bench=rows)
    t = report.load(tables, [], {}, ENGINES)
    (row,) = t["summary"]
    assert row["base_on_lora_engine"] is True
    assert row["base_small"]["value"] == pytest.approx(250.0)  # 1 / 0.004, the lora-base row
    assert row["base_small"]["ref"] == "bench-m7-vllm-q-v-r16-lora-base-1"
    assert row["base_large"]["value"] == pytest.approx(2000.0)
    assert row["roofline"]["value"] == pytest.approx(0.4)
    text = ANCHOR.sub("", report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES))
    line = next(x for x in text.splitlines() if x.startswith("| m7 | vllm"))
    assert "250 †" in line and "2,000 †" in line
    assert "† base requests on the LoRA-enabled engine" in text


def test_summary_base_prefers_the_engine_without_lora(new_run):
    _, t = new_run
    vllm = next(r for r in t["summary"] if r["backend"] == "vllm")
    assert vllm["base_on_lora_engine"] is False


def test_new_columns_render(new_run, tmp_path):
    tables, _ = new_run
    text = report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES)
    plain = ANCHOR.sub("", text)
    head = plain.split("## Summary")[1].split("\n|")[0]
    assert "fastest validated: **vllm** (setting `q,v only + tuned`)" in head
    assert "(95% CI +5% to +12%)" in head
    assert "Faster: **vllm** (setting `Marlin`)" in head and "**unvalidated**" in head
    row = next(line for line in plain.splitlines() if line.startswith("| m7 | vllm · q,v"))
    assert "+8% [+5%, +12%]" in row
    latency = plain.split("## Latency and throughput")[1].split("\n## ")[0]
    header = next(line for line in latency.splitlines() if line.startswith("| model"))
    for column in ("setting", "TTFT ms (engine)", "TPOT ms 95% CI", "TPOT ms p90",
                   "n excl. (compile)", "decode tok/s", "validated"):
        assert f"| {column} |" in header, column
    assert "p99" not in header  # n = 20 supports a p90, not a p99
    assert "| Marlin | r16 | lora-adapter | 1 |" in latency and "| unvalidated |" in latency
    assert "## Noise floor" in plain and "## Peer check" in plain
    html = report.to_html(report.build_blocks(tables, "p", "", [], {}, ENGINES), tmp_path, "p")
    assert '<td class="fail">FAIL</td>' in html and '<td class="pass">PASS</td>' in html
    assert "ours, bandwidth-normalised" in html and "vLLM INT4 + LoRA report" in html
    assert "| control.same_call | adapter | 0 | 0.0001 | 0.2 | PASS |" in plain


def test_verdicts_use_scope_where_the_table_has_it():
    rows = [{"model": "m", "engine": "e", "adapter": "a", "check_id": cid, "scope": scope,
             "verdict": verdict} for cid, scope, verdict in (
                 ("control.same_call", "adapter", "FAIL"), ("coverage.linear", "model", "PASS"))]
    v = summary.verdicts(pd.DataFrame(rows)).iloc[0]
    assert (v.verdict, v.base_verdict, v.failed_checks) == ("FAIL", "PASS", "control.same_call")
    rows[1]["verdict"] = "FAIL"
    v = summary.verdicts(pd.DataFrame(rows)).iloc[0]
    assert v.base_verdict == "FAIL"


def test_mark_rows_prefers_the_aggregates_validated_column():
    bench = pd.DataFrame([{"model": "m", "engine": "e", "adapter": "a", "variant": v,
                           "validated": got} for v, got in (
                               ("lora-adapter", "FAIL"), ("base", "PASS"),
                               ("lora-adapter", "unvalidated"), ("lora-x2", "not run"))])
    marked = summary.mark_rows(bench, summary.verdicts(pd.DataFrame()))
    assert list(marked["validated"]) == ["FAIL: do not trust", "PASS", "unvalidated", "not run"]


def test_mark_rows_gives_a_row_that_did_not_run_no_verdict():
    verdict = pd.DataFrame([{"model": "m", "engine": "e", "adapter": "a", "check_id": "c",
                             "scope": "adapter", "verdict": "PASS"}])
    bench = pd.DataFrame([{"model": "m", "engine": "e", "adapter": "a", "variant": "lora-x2",
                           "status": status} for status in ("ok", "not run")])
    marked = summary.mark_rows(bench, summary.verdicts(verdict))
    assert list(marked["validated"]) == ["PASS", "not run"]


# --------------------------------------------------------------------------- the H100 run

@pytest.fixture(scope="module")
def h100(tmp_path_factory):
    out = tmp_path_factory.mktemp("h100")
    plots.main(str(H100), str(out / "figures"), GPU_CONFIG["models"], GPU_CONFIG["engines"])
    text = report.main(str(H100), str(out / "figures"), str(out / "report" / "report.md"),
                       str(out / "report" / "index.html"), "gpu-synthetic",
                       GPU_CONFIG["description"], GPU_CONFIG["source_reports"],
                       GPU_CONFIG["models"], GPU_CONFIG["engines"])
    return {"md": text, "html": (out / "report" / "index.html").read_text(), "out": out}


def test_h100_summary_answers_first(h100):
    text = ANCHOR.sub("", h100["md"])
    assert text.index("## Summary") < text.index("## Figures") < text.index("## Verdicts")
    assert "NVIDIA H100 80GB HBM3 · torch 2.11.0 · vLLM 0.26.0" in text
    assert "2026-11-23 · commits bb09a4b, f2030d9" in text
    head = text.split("## Summary")[1].split("\n|")[0]
    mistral = next(line for line in head.splitlines() if "**mistral-7b-shape**" in line)
    assert "fastest validated: **hf**" in mistral and "checks PASS" in mistral
    assert "+35%" in mistral and "no CI in this run, n = 3" in mistral
    assert re.search(r"Faster: \*\*vllm\*\* \[183\].*\+46%.*\*\*FAIL: do not trust\*\*", mistral)
    row = next(line for line in text.splitlines()
               if line.startswith("| mistral-7b-shape | vllm | r16-qv |"))
    assert "[183](#bench-mistral-7b-shape-vllm-vllm-r16-qv-lora-adapter-1) (FAIL: do not trust)" \
        in row
    assert "[268](#bench-mistral-7b-shape-vllm-vllm-none-base-1) |" in row  # base passed
    assert "| [3.84](#memory-mistral-7b-shape-vllm-r16-qv) | [327.7](#" in row
    assert "| +34.9% |" in ANCHOR.sub("", text.split("### Source reports")[1]).replace(
        "[+34.9%](#overhead-mistral-7b-shape-hf-hf-r16-qv-lora-adapter-1)", "+34.9%")


def test_h100_numbers_read(h100):
    text = h100["md"]
    assert not re.search(r"\d\.?\d*e[+-]\d", text)  # no scientific notation
    assert not re.search(r"\d\.\d{5,}", text)        # no raw floats
    for header in ("TPOT ms", "decode tok/s", "weights GiB", "KV pool reserved GiB",
                   "adapter + LoRA MiB", "kernel µs/step"):
        assert f"| {header} |" in text or f"| {header}" in text, header
    full = ("void gemm_4bit_simt<__nv_bfloat16, 1>(__nv_bfloat16 const*, unsigned char const*, "
            "float const*")
    assert full not in text  # cut in the table, whole on hover
    assert f'title="{render.html.escape(full)}' in h100["html"]


def test_h100_html_links_resolve_and_long_tables_fold(h100):
    html = h100["html"]
    ids = set(re.findall(r'\sid="([^"]+)"', html))
    hrefs = set(re.findall(r'href="#([^"]+)"', html))
    assert len(hrefs) > 40 and hrefs <= ids, sorted(hrefs - ids)[:5]
    for fold in ("All checks (58 rows)", "Latency and throughput (78 rows)",
                 "Decode profile (12 rows)", "Coverage (24 rows)"):
        assert f"<details><summary>{fold}: show</summary><table" in html, fold
    assert html.index('id="summary-table"') < html.index("<details>")
    assert html.count('src="data:image/png;base64,') == len(outputs.FIGURES)


def test_h100_memory_components_from_older_columns():
    parts = summary.memory_components(pd.read_csv(H100 / "memory.csv"))
    row = parts[(parts["engine"] == "vllm") & (parts["adapter"] == "r16-qv")
                & (parts["model"] == "mistral-7b-shape")].iloc[0]
    assert row["weights"] == 4123536896
    # vLLM's weight figure with LoRA (4.17 GiB) over the one without (3.85 GiB): slot buffers
    assert row["adapter_lora"] == pytest.approx(0.32 * 2**30)
    assert row["kv_pool_reserved"] == 65680787374 and row["kv_needed"] == 1342177280
    hf = parts[(parts["engine"] == "hf") & (parts["adapter"] == "r16-qv")
               & (parts["model"] == "mistral-7b-shape")].iloc[0]
    assert hf["weights"] == 4125481856  # the base weights, not the ones with the adapter
    assert hf["adapter_lora"] == 4234533760 - 4125481856
    assert pd.isna(hf["process_baseline"])  # 0 meant "not measured" on the GPU


def test_h100_sources_from_the_config():
    overhead = summary.mark_rows(pd.read_csv(H100 / "overhead.csv"),
                                 summary.verdicts(pd.read_csv(H100 / "validation.csv")))
    src = summary.compare_sources(overhead, GPU_CONFIG["source_reports"], GPU_CONFIG["models"],
                                  GPU_CONFIG["engines"])
    mistral = src[src["system"] == "mistral-7b · hf"].iloc[0]
    assert mistral["our_value"] == "+34.9%" and mistral["validated"] == "PASS"
    assert src[src["system"] == "qwen-32b · vllm"].iloc[0]["our_config"] == "not in this run"


def test_run_kind_names_cpu_and_synthetic_runs():
    cpu = pd.DataFrame([{"env_device": "cpu"}])
    note = summary.run_kind(cpu, {"a": {"source": "synthetic"}, "b": {"source": "hub"}})
    assert note == ("CPU run: timings show the method, not GPU serving speed; synthetic "
                    "weights (seeded random): a")
    assert summary.run_kind(pd.DataFrame([{"env_device": "cuda"}]), {"b": {}}) == ""


def test_run_kind_warns_when_results_come_from_two_gpu_models():
    one = pd.DataFrame([{"env_device": "cuda", "env_gpu": "NVIDIA H100 80GB HBM3"}] * 2)
    assert summary.run_kind(one, {"b": {}}) == ""
    two = pd.DataFrame([{"env_device": "cuda", "env_gpu": "NVIDIA H100 80GB HBM3"},
                        {"env_device": "cuda", "env_gpu": "NVIDIA H200"}])
    assert summary.run_kind(two, {"b": {}}) == (
        "results from 2 GPU models (NVIDIA H100 80GB HBM3, NVIDIA H200): compare rows only "
        "where their GPU is the same")


# --------------------------------------------------------------------------- figures

def test_batch_axis_ticks_are_the_measured_batches():
    fig, ax = plots.plt.subplots()
    ax.plot([1, 8, 32, 64], [1, 2, 3, 4])
    plots._batch_axis(ax, pd.Series([64, 1, 8, 32, 8]))
    assert list(ax.get_xticks()) == [1, 8, 32, 64]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "32", "64"]
    plots.plt.close(fig)


def test_error_bars_come_from_cis_and_never_go_below_zero():
    g = pd.DataFrame({"_y": [10.0, 20.0], "lo": [9.0, 21.0], "hi": [12.0, None]})
    low, high = plots._errbar(g, "lo", "hi")
    assert list(low) == [1.0, 0.0] and list(high) == [2.0, 0.0]
    assert plots._errbar(g, "absent_lo", "absent_hi") is None


# --------------------------------------------------------------------------- the registry

def test_one_registry_of_outputs():
    assert aggregate.TABLES is outputs.TABLES and plots.FIGURES is outputs.FIGURES
    assert set(outputs.FIGURE_CAPTIONS) == set(outputs.FIGURES)
    assert set(outputs.TABLE_CAPTIONS) == set(outputs.TABLES)
    assert set(outputs.STORY_FIGURES) <= set(outputs.FIGURES)
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(ast.parse((ROOT / "workflow/scripts/report.py").read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert "plots" not in imported
    smk = (ROOT / "workflow" / "rules" / "report.smk").read_text()
    assert "from int4lora.outputs import" in smk
    for name in (*outputs.FIGURES, *outputs.TABLES):
        assert f'"{name}"' not in smk, f"{name} is listed in report.smk, not taken from outputs"


@pytest.mark.parametrize("name", outputs.FIGURES)
def test_each_figure_has_its_own_caption(name):
    from jinja2 import Template
    stub = (ROOT / "workflow" / "report" / "figures" / f"{name}.rst").read_text()
    sm = SimpleNamespace(params=SimpleNamespace(captions=outputs.FIGURE_CAPTIONS))
    assert Template(stub).render(snakemake=sm).strip() == outputs.FIGURE_CAPTIONS[name]


def test_job_time_section_only_where_the_run_has_job_times(new_run, tmp_path):
    tables, _ = new_run
    plain = ANCHOR.sub("", report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES))
    assert "## Job time" not in plain
    pd.DataFrame([{"rule": "bench_lora", "model": "m7", "engine": "vllm", "adapter": "r16",
                   "job_s": 123.5, "engine_start_s": 101.0, "compile_s": 28.0}]).to_csv(
        tables / "job_times.csv", index=False)
    plain = ANCHOR.sub("", report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES))
    section = plain.split("## Job time")[1].split("\n## ")[0]
    assert "1 jobs took 2.1 min of job time" in section
    assert "| bench_lora | m7 | vllm | r16 | 124 | 101 | 28 |" in section


def test_lora_cost_by_setting_puts_each_setting_in_one_row(new_run, tmp_path):
    tables, t = new_run
    plain = ANCHOR.sub("", report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES))
    plain = re.sub(r"\[([^\]]*\])\]\(#[^)]*\)", r"\1", plain)  # numbers without their links
    section = plain.split("## LoRA cost by engine setting")[1].split("\n## ")[0]
    header = next(x for x in section.splitlines() if x.startswith("| model"))
    assert "| adapter TPOT ms b=1 | overhead b=1 [95% CI] | overhead b=16 [95% CI] |" in header
    rows = [x for x in section.splitlines() if x.startswith("| m7 |")]
    assert len(rows) == 4  # hf, and vLLM at three settings
    tuned = next(x for x in rows if "q,v only + tuned" in x)
    assert "| 5 | +8% [+5%, +12%] | +8% [+5%, +12%] | PASS |" in tuned
    marlin = next(x for x in rows if "Marlin" in x)
    assert "| +30% [+27%, +34%] |" in marlin and marlin.endswith("| unvalidated |")


def test_lora_cost_by_setting_only_where_there_is_a_choice(tmp_path):
    over = pd.DataFrame([{"model": "m", "engine": "e", "setting": "e", "adapter": "a",
                          "variant": "lora-adapter", "batch": 1, "tpot_ratio_median": 1.1}])
    assert V.lora_cost_table(over, pd.DataFrame()) is None


def test_tuning_section_shows_the_gain_only_where_kernels_were_tuned(new_run, tmp_path):
    tables, _ = new_run
    plain = ANCHOR.sub("", report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES))
    assert "## Punica kernels tuned on this GPU" not in plain
    keys = [("shrink[5/3/1/4096/16]", "decode", "tuned", 5.87, 4.57),
            ("expand_true[5/3/1/16/4096]", "decode", "tuned", 8.14, 4.28),
            ("shrink[5/3/128/4096/16]", "prefill", "tuned", 12.8, 5.9),  # not a decode size
            ("shrink[5/3/8192/4096/16]", "prefill", "skipped_budget", None, None)]
    pd.DataFrame([{"model": "m7", "engine": "vllm-tuned", "adapter": "r16", "label": lab,
                   "phase": ph, "status": st, "default_us": d, "tuned_us": tu,
                   "speedup": d / tu if d else None, "candidates": 9}
                  for lab, ph, st, d, tu in keys]).to_csv(tables / "tuning.csv", index=False)
    plain = ANCHOR.sub("", report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES))
    section = plain.split("## Punica kernels tuned on this GPU")[1].split("\n## ")[0]
    assert "m7 · vllm-tuned: 3 of 4 keys tuned; at decode sizes the tuned configs run " \
           "1.28–1.90× faster than vLLM's defaults." in section
    assert "| m7 | vllm-tuned | expand_true[5/3/1/16/4096] | decode | tuned | 8.14 | 4.28 |" \
        in section


def test_source_figures_of_systems_not_in_the_run_fold_into_one_sentence():
    """gpu-lora-cost has no configuration of the source reports' systems: 14 rows of dashes
    filled its first screen (H100 run of 2026-11-25)."""
    from int4lora.sources import NOT_IN_RUN
    rows = [{"source": "vLLM report", "system": "Qwen2 32B", "metric": m, "source_value": v,
             "our_value": None, "our_config": NOT_IN_RUN, "validated": None}
            for m, v in (("decode_tok_s_b1_lora", 52.26), ("weights_gib", 18.29))]
    rows.append({"source": "bnb report", "system": "Mistral-7B", "metric": "lora_overhead",
                 "source_value": 28.57, "our_value": 30.6, "our_config": "m7 / hf / r16",
                 "validated": "PASS"})
    blocks = report.sources_blocks(pd.DataFrame(rows))
    md = ANCHOR.sub("", render.to_markdown(blocks))
    assert "| bnb report | Mistral-7B | lora_overhead | 28.57 | 30.6 |" in md
    assert "Qwen2 32B |" not in md  # no table row of dashes
    assert "Not in this run (2 figures): vLLM report (Qwen2 32B)." in md
    only_absent = render.to_markdown(report.sources_blocks(pd.DataFrame(rows[:2])))
    assert "| source report |" not in only_absent and "Not in this run" in only_absent


def test_summary_names_a_check_without_speed_rows_and_says_unvalidated_not_failed(tmp_path):
    """gpu-lora-cost cut short: the Mixtral expert check ran without a benchmark (it was not
    in the summary at all), and settings never validated read as 'failed their checks'."""
    rows = [_bench_row("vllm", "q,v", "r64", variant, 1, tpot, "unvalidated")
            for variant, tpot in (("lora-base", 0.0037), ("lora-adapter", 0.0045))]
    checks = [{"model": "mx", "engine": "vllm-moe", "adapter": "experts", "scope": "adapter",
               "check": "adapter: effect / engine noise", "verdict": "FAIL"},
              {"model": "mx", "engine": "vllm-moe", "adapter": "experts", "scope": "base",
               "check": "coverage", "verdict": "PASS"}]
    tables = _write_tables(tmp_path, bench=rows, validation=checks)
    text = ANCHOR.sub("", report.build_markdown(tables, tmp_path, "p", "", [], {}, ENGINES))
    summary_part = text.split("## Summary")[1].split("\n| model")[0]
    assert "with `r64`: no setting with this adapter was validated in this run." in summary_part
    assert "**mx** with `experts` on `vllm-moe`: checks [FAIL](#verdict-mx-vllm-moe-experts) " \
           "(adapter: effect / engine noise); no speed measured in this run." in summary_part


def _kernel_row(engine, kernel, variant, batch, tpot, checkpoint="mistral-abc", status="ok"):
    return {"model": "m7", "engine": engine, "setting": engine, "adapter": "none",
            "variant": variant, "batch": batch, "status": status, "w4a16_kernel": kernel,
            "checkpoint": checkpoint, "tpot_s_median": tpot}


def test_kernel_section_names_the_fastest_kernel_per_batch_on_one_checkpoint():
    """gpu-lora-cost's kernel sweep: ExLlama is fastest at batch 1 and collapses at 32, Marlin
    wins 8-32; a kernel seen only as a LoRA engine's base requests is marked †."""
    rows = [_kernel_row("ex", "ExllamaLinearKernel", "base", 1, 0.00311),
            _kernel_row("ex", "ExllamaLinearKernel", "base", 32, 0.0154),
            _kernel_row("ma", "MarlinLinearKernel", "base", 1, 0.00320),
            _kernel_row("ma", "MarlinLinearKernel", "base", 32, 0.00413),
            _kernel_row("ma-lora", "MarlinLinearKernel", "lora-base", 1, 0.00300),  # no: LoRA engine
            _kernel_row("mc-lora", "MacheteLinearKernel", "lora-base", 1, 0.00372),
            _kernel_row("mc-lora", "MacheteLinearKernel", "lora-adapter", 1, 0.00100),
            _kernel_row("tr", "TritonW4A16LinearKernel", "base", 1, 0.0005, status="error"),
            _kernel_row("other", "MarlinLinearKernel", "base", 1, 0.001, checkpoint="one-kernel")]
    bench = pd.DataFrame(rows)
    assert V.kernel_lead(bench) == ("Fastest base decode (median) on mistral-abc: "
                                    "b=1: Exllama (3.11 ms); b=32: Marlin (4.13 ms).")
    md = ANCHOR.sub("", render.to_markdown([V.kernel_table(bench)]))
    md = re.sub(r"\[([^\]]*)\]\(#[^)]*\)", r"\1", md)
    assert "| mistral-abc | Marlin | ma | 3.2 | 4.13 |" in md
    assert "| mistral-abc | Machete | mc-lora | 3.72 † | – |" in md
    assert "one-kernel" not in md and "TritonW4A16" not in md
    assert V.kernel_table(bench[bench["checkpoint"] == "one-kernel"]) is None
