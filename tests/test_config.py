"""Config validation the way Snakemake does it: `snakemake -n` on broken configs.

Snakemake runs as a subprocess with `-s <repo>/Snakefile --directory <tmp>`, so nothing is
written into the repository. Dry runs need no network and no GPU.
"""
import copy
import re
import shutil

import pytest
import yaml

from conftest import ROOT, job_stats, planned_jobs, run_snakemake

OFFLINE = ROOT / "config" / "offline-cpu.yaml"
GPU_SMOKE = ROOT / "config" / "gpu-smoke.yaml"
GPU_SYNTHETIC = ROOT / "config" / "gpu-synthetic.yaml"
DEFAULT = ROOT / "config.yaml"


def _load(path):
    return yaml.safe_load(path.read_text())


def _typo(c):
    c["benchmrk"] = c.pop("benchmark")


def _unknown_engine(c):
    c["models"]["tiny-llama"]["engines"] = ["hf", "hf-turbo"]


def _backend_trt(c):
    c["engines"]["hf"]["backend"] = "trt"


def _rank0(c):
    c["adapters"]["r16-qv"]["rank"] = 0


def _rank1024(c):
    c["adapters"]["r16-qv"]["rank"] = 1024


def _unknown_adapter(c):
    c["models"]["tiny-llama"]["adapters"] = ["r16-qv", "r64-everything"]


def _experts_adapter_on_dense(c):
    c["models"]["tiny-llama"]["adapters"] = ["r16-qv", "r16-experts"]


def _engine_key_typo(c):
    c["engines"]["hf"]["quantisation"] = c["engines"]["hf"].pop("quantization")


def _only_unknown_model(c):
    c["only_models"] = ["tiny-llama", "llama-70b"]


def _iterations(c):
    c["benchmark"]["min_iterations"], c["benchmark"]["max_iterations"] = 5, 2


def _too_long(c):
    c["benchmark"]["output_tokens"] = 100000


def _duplicate_batches(c):
    c["benchmark"]["batch_sizes"] = [1, 4, 4]


def _empty_targets(c):
    c["adapters"]["r16-qv"]["target_modules"] = []


def _cache_is_a_file(c):
    c["cache_dir"] = "/etc/hostname/cache"


def _gpu_util(c):
    c["engines"]["vllm"]["settings"] = {"gpu_memory_utilization": 1.7}


def _vllm_setting_typo(c):
    c["engines"]["vllm"]["settings"] = {"max_modle_len": 512}


def _vllm_max_model_len(c):
    c["engines"]["vllm"]["settings"] = {"max_model_len": 128}


def _two_schema_errors(c):
    c["benchmark"]["batch_sizes"] = []
    c["adapters"]["r16-qv"]["rank"] = "sixteen"


def _heads_do_not_divide_hidden(c):
    c["models"]["tiny-llama"]["arch"]["num_attention_heads"] = 7


def _kv_heads_do_not_divide_heads(c):
    c["models"]["tiny-llama"]["arch"]["num_key_value_heads"] = 3


def _top_k_above_experts(c):
    c["models"]["tiny-mixtral"]["arch"]["num_experts_per_tok"] = 9


def _vocab_below_tokenizer(c):
    c["models"]["tiny-llama"]["arch"]["vocab_size"] = 100


def _local_path_missing(c):
    c["models"]["tiny-llama"] = {"source": "local", "path": "/nonexistent/model",
                                 "engines": ["hf"], "adapters": ["r16-qv"]}


def _cache_dir_unwritable(c):
    c["cache_dir"] = "/proc/int4lora-cache"  # os.access() says yes to root here


# (base config, edit, strings the error message must contain)
BROKEN = {
    "typo-top-level-key": (OFFLINE, _typo, ["benchmrk"]),
    "typo-engine-key": (OFFLINE, _engine_key_typo, ["quantisation"]),
    "unknown-engine": (OFFLINE, _unknown_engine, ["hf-turbo", "models.tiny-llama.engines"]),
    "backend-trt": (OFFLINE, _backend_trt, ["'trt'", "backend"]),
    "adapter-rank-0": (OFFLINE, _rank0, ["rank", "minimum of 1"]),
    "adapter-rank-1024-vllm": (GPU_SMOKE, _rank1024, ["adapters.r16-qv.rank=1024", "vLLM"]),
    "unknown-adapter": (OFFLINE, _unknown_adapter, ["r64-everything"]),
    "only-models-unknown": (OFFLINE, _only_unknown_model, ["only_models", "llama-70b"]),
    "experts-adapter-on-dense-model": (OFFLINE, _experts_adapter_on_dense,
                                       ["r16-experts", "tiny-llama", "not a MoE"]),
    "max-below-min-iterations": (OFFLINE, _iterations, [
        "benchmark.max_iterations=2 is below benchmark.min_iterations=5"]),
    "output-beyond-context": (OFFLINE, _too_long, [
        "benchmark.prompt_tokens + benchmark.output_tokens=100032", "tiny-llama",
        "max_position_embeddings=512"]),
    "duplicate-batch-sizes": (OFFLINE, _duplicate_batches, ["batch_sizes", "non-unique"]),
    "empty-adapter-targets": (OFFLINE, _empty_targets, ["target_modules", "should be non-empty"]),
    "cache-dir-not-a-directory": (OFFLINE, _cache_is_a_file, [
        "cache_dir='/etc/hostname/cache'", "not a directory"]),
    "gpu-memory-utilization": (GPU_SMOKE, _gpu_util, [
        "engines.vllm.settings.gpu_memory_utilization=1.7: must be in (0, 1]"]),
    "vllm-setting-typo": (GPU_SMOKE, _vllm_setting_typo, [
        "engines.vllm.settings.max_modle_len: not a vLLM 0.26.0 EngineArgs field"]),
    "vllm-max-model-len": (GPU_SMOKE, _vllm_max_model_len, [
        "exceeds engines.vllm.settings.max_model_len=128"]),
    "two-schema-errors-at-once": (OFFLINE, _two_schema_errors, [
        "benchmark.batch_sizes: [] should be non-empty",
        "adapters.r16-qv.rank: 'sixteen' is not of type 'integer'"]),
    "heads-do-not-divide-hidden": (OFFLINE, _heads_do_not_divide_hidden, [
        "models.tiny-llama.arch: The hidden size (256) is not a multiple of the number of "
        "attention heads (7)"]),
    "kv-heads-do-not-divide-heads": (OFFLINE, _kv_heads_do_not_divide_heads, [
        "models.tiny-llama.arch.num_key_value_heads=3: must divide num_attention_heads=8"]),
    "top-k-above-experts": (OFFLINE, _top_k_above_experts, [
        "models.tiny-mixtral.arch.num_experts_per_tok=9: must be between 1 and "
        "num_local_experts=8"]),
    "vocab-below-tokenizer": (OFFLINE, _vocab_below_tokenizer, [
        "models.tiny-llama.arch.vocab_size=100: below the byte tokenizer's 259 tokens"]),
    "local-path-missing": (OFFLINE, _local_path_missing, [
        "models.tiny-llama.path='/nonexistent/model': /nonexistent/model is not a directory"]),
    "cache-dir-unwritable": (OFFLINE, _cache_dir_unwritable, [
        "cache_dir='/proc/int4lora-cache': cannot create a folder in /proc"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_config_is_rejected_before_anything_runs(case, tmp_path):
    base, edit, expected = BROKEN[case]
    config = copy.deepcopy(_load(base))
    edit(config)
    cfg_path = tmp_path / "broken.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = run_snakemake(workdir, "-n", configfile=cfg_path, timeout=120)
    assert proc.returncode != 0, proc.stdout
    for text in expected:
        assert text in proc.stdout, f"{text!r} not in:\n{proc.stdout[-3000:]}"
    assert "Job stats" not in proc.stdout
    assert "Failed validating" not in proc.stdout  # one line per error, not schema dumps
    for out in ("results", "logs", "benchmarks"):
        assert not (workdir / out).exists(), out


def test_the_unbroken_base_configs_are_accepted(tmp_path):
    """The broken cases above fail because of their edit, not because of the base."""
    for base in (OFFLINE, GPU_SMOKE):
        proc = run_snakemake(tmp_path, "-n", configfile=base, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert not (tmp_path / "results").exists()


def _bench_and_validate_engines(output):
    jobs = planned_jobs(output)
    found = {}
    for job in jobs:
        if job["rule"] in ("bench_baseline", "bench_lora", "validate"):
            found.setdefault(job["rule"], set()).add(job["wildcards"]["engine"])
    return jobs, found


def test_default_config_plans_both_engines(tmp_path):
    """`snakemake -n` with the default config.yaml (picked up by the Snakefile's
    `configfile:` directive, as a user in the repository root gets it)."""
    shutil.copy(DEFAULT, tmp_path / "config.yaml")  # the directive reads it from the workdir
    proc = run_snakemake(tmp_path, "-n", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    jobs, found = _bench_and_validate_engines(proc.stdout)
    for rule in ("bench_baseline", "bench_lora", "validate"):
        assert {"hf", "vllm"} <= found.get(rule, set()), (rule, found)
    stats = job_stats(proc.stdout)
    assert stats["report"] == 1 and stats["aggregate"] == 1
    config = _load(DEFAULT)
    n_lora = sum(len(spec["adapters"]) * len(spec["engines"])
                 for spec in config["models"].values())
    assert stats["bench_lora"] == n_lora
    # every engine runs its baseline unless its stages leave it out (vllm-lora-defaults)
    with_baseline = sum(1 for s in config["models"].values() for e in s["engines"]
                        if "stages" not in config["engines"][e]
                        or "baseline" in config["engines"][e]["stages"])
    assert with_baseline < sum(len(s["engines"]) for s in config["models"].values())
    assert stats["bench_baseline"] == with_baseline
    # GPU rules declare a GPU
    bench = next(j for j in jobs if j["rule"] == "bench_lora")
    assert bench["output"][0].startswith("results/gpu-hub/bench/")  # results per preset
    assert re.search(r"rule bench_lora:\n(?:    .*\n)*?    resources: .*gpu=1", proc.stdout)
    assert not (tmp_path / "results").exists()


def test_gpu_synthetic_config_plans_both_engines(tmp_path):
    proc = run_snakemake(tmp_path, "-n", configfile=GPU_SYNTHETIC, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    _, found = _bench_and_validate_engines(proc.stdout)
    for rule in ("bench_baseline", "bench_lora", "validate"):
        assert {"hf", "vllm"} <= found.get(rule, set()), (rule, found)
    assert not (tmp_path / "results").exists()


def test_config_override_keeps_the_default_config(tmp_path):
    """--config on top of config.yaml changes the key it names and keeps every other one."""
    shutil.copy(DEFAULT, tmp_path / "config.yaml")
    plain = run_snakemake(tmp_path, "-n", timeout=120)
    proc = run_snakemake(tmp_path, "-n", "--config", "device=cpu", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    # the same matrix as config.yaml alone, in the same preset's results
    assert job_stats(proc.stdout) == job_stats(plain.stdout)
    assert job_stats(proc.stdout)["bench_lora"] > 0 and "results/gpu-hub/bench/" in proc.stdout
    # ... and the device the override names: GPU rules no longer ask for a GPU
    lora = re.search(r"rule bench_lora:\n(?:    .*\n)*?    resources: (.*)", proc.stdout)
    assert "gpu=0" in lora.group(1)
    assert "gpu=1" in re.search(r"rule bench_lora:\n(?:    .*\n)*?    resources: (.*)",
                                plain.stdout).group(1)


def test_lint_offline_config(tmp_path):
    proc = run_snakemake(tmp_path, "--lint", configfile=OFFLINE, timeout=120)
    lints = re.findall(r"^Lints for rule (\w+) .*\n((?:    \*.*\n(?:      .*\n)*)+)",
                       proc.stdout, re.M)
    assert not lints, lints
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout
