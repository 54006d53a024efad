"""The offline preset end to end with Snakemake, in a temporary directory (minutes).

Run with: python -m pytest tests -m integration
Set INT4LORA_TEST_CACHE to a directory to reuse fetched models across runs (default: a fresh
cache inside the temporary directory, so the run is hermetic).
"""
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, job_stats, planned_jobs, run_snakemake

OFFLINE = ROOT / "config" / "offline-cpu.yaml"
RESULTS = "results/offline-cpu"  # every preset keeps its own results
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("offline")
    extra = []
    if os.environ.get("INT4LORA_TEST_CACHE"):
        extra = ["--config", f"cache_dir={os.environ['INT4LORA_TEST_CACHE']}"]
    proc = run_snakemake(workdir, "--cores", "2", *extra, configfile=OFFLINE, timeout=1500)
    if proc.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-2000:]}"
                         for p in sorted((workdir / "logs").rglob("*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{logs}")
    return workdir, extra


def _config():
    return yaml.safe_load(OFFLINE.read_text())


def test_report_files(offline_run):
    workdir, _ = offline_run
    report = workdir / RESULTS / "report"
    assert (report / "report.md").stat().st_size > 0
    html = (report / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 3
    figures = list((workdir / RESULTS / "figures").glob("*.png"))
    assert len(figures) >= 3


def _latency_rows(text):
    section = text.split("## Latency and throughput")[1].split("\n## ")[0]
    section = re.sub(r'<a id="[^"]*"></a>', "", section)  # the rows' anchors
    header = next(line for line in section.splitlines() if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and line != header:
            rows.append(dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_report_has_one_latency_row_per_configuration(offline_run):
    workdir, _ = offline_run
    config = _config()
    batches = config["benchmark"]["batch_sizes"]
    expected = Counter()
    for model, spec in config["models"].items():
        for engine in spec["engines"]:
            for b in batches:
                expected[(model, engine, "none", "base", str(b))] += 1
                for adapter in spec["adapters"]:
                    for variant in ("lora-base", "lora-adapter"):
                        expected[(model, engine, adapter, variant, str(b))] += 1
    rows = _latency_rows((workdir / RESULTS / "report" / "report.md").read_text())
    got = Counter((r["model"], r["engine"], r["adapter"], r["variant"], r["batch"])
                  for r in rows)
    assert got == expected
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["validated"] in ("PASS", "FAIL: do not trust", "unvalidated") for r in rows)


def test_every_result_json_validates(offline_run, result_validator):
    workdir, _ = offline_run
    files = sorted((workdir / RESULTS).rglob("*.json"))
    assert len(files) >= 20
    for path in files:
        data = json.loads(path.read_text())
        errors = sorted(result_validator.iter_errors(data), key=str)
        assert not errors, f"{path}: {errors[0].message}"


def test_bench_results_have_samples_and_lora_changes_outputs(offline_run):
    workdir, _ = offline_run
    results = workdir / RESULTS
    benches = sorted((results / "bench").rglob("*.json"))
    lora = [p for p in benches if p.name != "baseline.json"]
    assert benches and lora
    for path in benches:
        data = json.loads(path.read_text())
        assert data["status"] == "ok", (path, data["reason"])
        assert data["samples"], path
        assert data["metrics"]["runs"], path
        assert all(run["tpot_s"]["n"] >= 1 for run in data["metrics"]["runs"])
    unchanged = []
    for path in lora:
        data = json.loads(path.read_text())
        outputs = data["metrics"]["outputs"]
        assert outputs, path
        assert all(len(o["lora-adapter"]) == len(o["lora-base"]) > 0 for o in outputs.values())
        if all(o["lora-adapter"] == o["lora-base"] for o in outputs.values()):
            unchanged.append(data)
    for data in unchanged:
        model, engine, adapter = data["model"], data["engine"], data["adapter"]
        synthetic = json.loads((results / "models" / f"{model}.json").read_text())[
            "metrics"]["synthetic"]
        # a random adapter on random weights always flips greedy tokens: identical outputs
        # there mean the adapter was not applied
        assert not synthetic, f"{model}/{engine}/{adapter}: adapter did not change outputs"
        # real weights can keep their greedy tokens under a small adapter (SmolLM2-135M with
        # b_std 0.02 does): the adapter must then still move the log-probs in validation
        val = json.loads((results / "validate" / model / engine / f"{adapter}.json").read_text())
        moved = next(c for c in val["metrics"]["checks"]
                     if c["check_id"] == "adapter.effect_over_noise")
        assert moved["verdict"] == "PASS", (model, engine, adapter, moved)
        warnings.warn(f"bench {model}/{engine}/{adapter}: lora-adapter greedy outputs equal "
                      f"lora-base (real weights; log-prob change {moved['value']:.3g})")


def test_forcing_plots_does_not_rerun_benchmarks(offline_run):
    workdir, extra = offline_run
    proc = run_snakemake(workdir, "-n", "-R", "plots", *extra, configfile=OFFLINE,
                         timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # on a complete, up-to-date tree: the figures and the report only
    assert job_stats(proc.stdout) == {"plots": 1, "report": 1, "all": 1}


def test_deleted_bench_result_rebuilds_only_it_and_the_report_chain(offline_run):
    workdir, extra = offline_run
    victim = f"{RESULTS}/bench/tiny-llama/hf/r16-qv.json"
    before = json.loads((workdir / victim).read_text())
    (workdir / victim).unlink()
    # the result JSONs are targets of `all`: a plain run plans that benchmark and the
    # aggregate -> plots -> report chain, and no other benchmark
    proc = run_snakemake(workdir, "-n", *extra, configfile=OFFLINE, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert job_stats(proc.stdout) == {"bench_lora": 1, "aggregate": 1, "plots": 1,
                                      "report": 1, "all": 1}
    assert [j["output"] for j in planned_jobs(proc.stdout) if j["rule"].startswith("bench")] \
        == [[victim]]
    # asked for by name, it plans exactly that one benchmark ...
    proc = run_snakemake(workdir, "-n", victim, *extra, configfile=OFFLINE, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert job_stats(proc.stdout) == {"bench_lora": 1}
    assert [j["output"] for j in planned_jobs(proc.stdout)] == [[victim]]
    # ... rebuilds it ...
    proc = run_snakemake(workdir, "--cores", "2", victim, *extra, configfile=OFFLINE,
                         timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    after = json.loads((workdir / victim).read_text())
    assert after["status"] == "ok" and after["samples"]
    assert set(after["metrics"]["outputs"]) == set(before["metrics"]["outputs"])
    assert all(o["lora-adapter"] != o["lora-base"] for o in after["metrics"]["outputs"].values())
    # ... and then the aggregate -> plots -> report chain, and nothing else, is out of date
    proc = run_snakemake(workdir, "-n", *extra, configfile=OFFLINE, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert job_stats(proc.stdout) == {"aggregate": 1, "plots": 1, "report": 1, "all": 1}
