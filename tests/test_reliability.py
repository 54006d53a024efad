"""Everyday reliability (issue 13): config-file errors, file modes, the schema draft, pinned
environments in step, and rerunning only what failed."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SNAKEFILE, load_tool, run_snakemake

TOOLS = ROOT / "tools"
OFFLINE = ROOT / "config" / "offline-cpu.yaml"
sys.path.insert(0, str(TOOLS))

import configcheck  # noqa: E402
import envpins  # noqa: E402


def _run_tool(name, *args, cwd):
    return subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def _assert_no_traceback(text):
    assert "Traceback" not in text and not re.search(r'^\s*File "', text, re.M), text


# ---- item 2: config files that Snakemake cannot read --------------------------------------

BROKEN_YAML = "preset: x\nmodels:\n  a: [1, 2\n  b: 3\n"


def test_missing_configfile_is_named_without_traceback(tmp_path):
    proc = _run_tool("run", "-s", SNAKEFILE, "-n", "--configfile", "config/offline-cpu.yml",
                     cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "config file 'config/offline-cpu.yml' not found" in proc.stdout
    assert "config/offline-cpu.yaml" in proc.stdout  # the presets that do exist
    _assert_no_traceback(proc.stdout)
    assert not (tmp_path / "results").exists() and not (tmp_path / ".snakemake").exists()


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    (tmp_path / "mine.yaml").write_text(BROKEN_YAML)
    proc = _run_tool("run", "-s", SNAKEFILE, "-n", "--configfile", OFFLINE, "mine.yaml",
                     cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "config file 'mine.yaml', line 4, column 4: YAML syntax error" in proc.stdout
    assert "started at line 3, column 6" in proc.stdout  # where the unclosed [ opened
    assert "tab" not in proc.stdout  # Snakemake's own hint about tabs misleads here
    _assert_no_traceback(proc.stdout)


def test_default_config_yaml_error_is_named_by_the_snakefile(tmp_path):
    """config.yaml is read by the Snakefile's `configfile:` directive (plain snakemake)."""
    (tmp_path / "config.yaml").write_text("benchmark:\n\tbatch_sizes: [1]\n")
    proc = run_snakemake(tmp_path, "-n", timeout=120)
    assert proc.returncode == 1, proc.stdout
    assert "config file 'config.yaml', line 2, column 1: YAML syntax error" in proc.stdout
    _assert_no_traceback(proc.stdout)


def test_run_py_hands_a_good_command_line_to_snakemake(tmp_path):
    proc = _run_tool("run", "-s", SNAKEFILE, "-n", "--configfile", OFFLINE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Job stats" in proc.stdout


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"- a\n- b\n", "not a list"),
    (b"\xff\xfeab", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"a: 1\nb: [\n", "line 3, column 1"),
])
def test_check_configfile_names_what_is_wrong(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(configcheck.ConfigFileError, match=re.escape(expected)) as info:
        configcheck.check_configfile(path)
    assert str(path) in str(info.value)


def test_check_configfile_rejects_a_directory_and_reads_a_good_file(tmp_path):
    with pytest.raises(configcheck.ConfigFileError, match="is a directory"):
        configcheck.check_configfile(tmp_path)
    assert configcheck.check_configfile(OFFLINE)["preset"] == "offline-cpu"


@pytest.mark.parametrize("argv, expected", [
    (["-n", "--configfile", "a.yaml", "b.yaml", "--cores", "1"], ["a.yaml", "b.yaml"]),
    (["--configfiles=a.yaml", "all"], ["a.yaml"]),
    (["-n", "all"], []),
    (["--help"], []),
])
def test_configfiles_in_reads_snakemakes_command_line(argv, expected):
    assert configcheck.configfiles_in(argv) == expected


# ---- item 5: modes, report.zip, the JSON Schema draft -------------------------------------

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_result_json_mode_follows_the_umask_not_mkstemp(tmp_path, umask):
    from int4lora import resultio
    resultio.write_json_atomic(tmp_path / "a.json", {"a": 1})
    assert _mode(tmp_path / "a.json") == 0o644
    umask(0o027)
    resultio.write_json_atomic(tmp_path / "b.json", {"b": 1})
    assert _mode(tmp_path / "b.json") == 0o640


def test_make_public_fixes_a_tree_and_leaves_symlink_targets_alone(tmp_path, umask):
    import tempfile

    import torch
    from safetensors.torch import save_file

    from int4lora import resultio
    tree = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700
    save_file({"w": torch.zeros(2)}, str(tree / "w.safetensors"))  # 0600
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o700)
    outside = tmp_path / "private.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    (tree / "link").symlink_to(outside)
    assert _mode(tree / "w.safetensors") == 0o600  # what the fix is for
    resultio.make_public(tree)
    assert (_mode(tree), _mode(tree / "w.safetensors"), _mode(tree / "run.sh")) == \
        (0o755, 0o644, 0o755)
    assert _mode(outside) == 0o600


def test_cache_entries_and_results_are_world_readable(tmp_path, umask):
    import fetch_model
    import make_adapter
    arch = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
            "max_position_embeddings": 128, "initializer_range": 0.1}
    spec = {"source": "synthetic", "architecture": "llama", "arch": arch, "seed": 0}
    adapter = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "seed": 1}
    cache, results = tmp_path / "cache", tmp_path / "results"
    fetch_model.main("m", spec, str(cache), str(results / "models" / "m.json"))
    make_adapter.main("m", "a", adapter, str(results / "models" / "m.json"), str(cache),
                      str(results / "adapters" / "m" / "a.json"))
    entries = [p for root in (cache, results) for p in root.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in entries)
    wrong = {str(p): oct(_mode(p)) for p in entries
             if _mode(p) != (0o755 if p.is_dir() else 0o644)}
    assert not wrong


def test_report_zip_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("no git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", "report.zip"], cwd=ROOT)
    assert proc.returncode == 0


def test_schemas_name_the_draft_snakemake_validates_with():
    """snakemake.utils.validate always uses Draft202012Validator and warns for any other
    `$schema` (snakemake/utils.py)."""
    import jsonschema
    for path in (ROOT / "workflow" / "schemas").glob("*.json"):
        schema = json.loads(path.read_text())
        assert schema["$schema"] == jsonschema.Draft202012Validator.META_SCHEMA["$schema"], path
        jsonschema.Draft202012Validator.check_schema(schema)


def test_dry_run_prints_no_schema_warning(tmp_path):
    proc = run_snakemake(tmp_path, "-n", configfile=OFFLINE, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "No validator found" not in proc.stdout
    assert "may not be validated correctly" not in proc.stdout


# ---- item 7: pinned environments in step --------------------------------------------------

# Where one source may pin another version than the rest, and why (README: "Pinned environments").
PIN_EXCEPTIONS = {
    ("numpy", "requirements-cpu.txt"):
        "snakemake-executor-plugin-slurm 2.8 (the snakemake driver) needs numpy >= 2.4.5; "
        "mistral-common, a vLLM 0.26 dependency, needs < 2.4 on Python 3.12, so envs/*.yaml and "
        "the GPU node keep 2.3.5 (they never share a process with the driver)",
    ("torch", "requirements-cpu.txt"):
        "the CPU wheel 2.13.0 for tests and the demo; vLLM 0.26 pins torch 2.11.0 (GPU envs; "
        "the GPU node runs 2.11.0+cu130)",
    ("compressed-tensors", "vllm.yaml"):
        "vLLM 0.26.0 pins 0.17.0; llmcompressor 0.14 needs 0.19.0 (quantize.yaml); the GPU "
        "node runs both in one Python with 0.19.0",
}


def test_every_environment_pins_numpy_and_python_3_12():
    for source, pins in envpins.all_pins().items():
        assert "numpy" in pins, source
    for env in envpins.CONDA_ENVS:
        conda, _ = envpins.conda_env_pins(ROOT / "envs" / f"{env}.yaml")
        assert conda.get("python") == "3.12", env


def test_pins_agree_wherever_they_overlap():
    sources = envpins.all_pins()
    disagreements, stale = [], []
    for package in sorted({p for pins in sources.values() for p in pins}):
        pinned = {src: pins[package] for src, pins in sources.items() if package in pins}
        kept = {src: v for src, v in pinned.items() if (package, src) not in PIN_EXCEPTIONS}
        if len(set(kept.values())) > 1:
            disagreements.append(f"{package}: {kept}")
        for src in pinned.keys() - kept.keys():
            if pinned[src] in kept.values() or not kept:
                stale.append(f"{package} in {src}: exception no longer needed")
    assert not disagreements, "\n".join(disagreements)
    assert not stale, "\n".join(stale)


def test_pin_parser_rejects_a_loose_pin(tmp_path):
    (tmp_path / "r.txt").write_text("numpy>=2\n")
    with pytest.raises(ValueError, match=re.escape("'numpy>=2' is not an exact pin")):
        envpins.requirement_pins(tmp_path / "r.txt")


def test_gpu_bundle_lock_is_the_shared_one():
    shared = ROOT.parent / "shared" / "gpu" / "bundle.lock"
    if not shared.exists():
        pytest.skip("no ../shared beside this checkout")
    assert (ROOT / "envs" / "gpu-bundle.lock").read_text() == shared.read_text()


def test_manylinux_platforms_cover_every_tag_up_to_the_floor():
    tags = envpins.manylinux_platforms(31)
    assert tags[0] == "manylinux_2_31_x86_64" and "manylinux_2_5_x86_64" in tags
    assert "manylinux2014_x86_64" in tags and "manylinux_2_32_x86_64" not in tags


# ---- item 10: rerun exactly what failed ---------------------------------------------------

def job_blocks(output):
    """Each job block a (dry) run prints: {"rule", "jobid", "output", "benchmark", "wildcards",
    "resources"}; the list fields as lists, the key=value fields as dicts."""
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n?)+)", output, re.M):
        job = {"rule": m.group(1), "output": [], "benchmark": [], "wildcards": {},
               "resources": {}}
        for line in m.group(2).splitlines():
            key, _, value = line.strip().partition(": ")
            if key in ("output", "benchmark"):
                job[key] = [v.strip() for v in value.split(",")]
            elif key in ("wildcards", "resources"):
                job[key] = dict(kv.split("=", 1) for kv in value.split(", "))
            elif key == "jobid":
                job["jobid"] = value
        jobs.append(job)
    return jobs


def _up_to_date_workdir(workdir):
    """Every output of the offline DAG present and newer than its inputs, without running a
    job: placeholders with mtimes in the dry run's (topological) order."""
    proc = run_snakemake(workdir, "-n", configfile=OFFLINE, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    jobs = job_blocks(proc.stdout)
    start = time.time() - 0.01 * len(jobs)  # after every code change: no rule looks changed
    for i, job in enumerate(jobs):
        for name in job["output"] + job["benchmark"]:
            path = workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n" if path.suffix == ".json" else "")
            os.utime(path, (start + 0.01 * i, start + 0.01 * i))
    return jobs


def _plant(path, status):
    """Rewrite a result as failed, keeping its time (as if the job had written it)."""
    stat = path.stat()
    path.write_text(json.dumps({"schema": "bench/v1", "kind": "bench", "status": status,
                                "reason": "RuntimeError: planted by the test"}))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_rerun_failed_plans_only_the_failed_job_and_what_reads_it(tmp_path):
    from conftest import job_stats
    jobs = _up_to_date_workdir(tmp_path)
    failed = next(j["output"][0] for j in jobs if j["rule"] == "bench_lora")
    _plant(tmp_path / failed, "error")
    _plant(tmp_path / next(j["output"][0] for j in jobs if j["rule"] == "validate"), "ok")
    stranger = tmp_path / "results" / "old-preset" / "bench" / "m" / "hf" / "r16-qv.json"
    stranger.parent.mkdir(parents=True)
    stranger.write_text(json.dumps({"schema": "bench/v1", "status": "oom"}))
    plain = run_snakemake(tmp_path, "-n", configfile=OFFLINE, timeout=120)
    assert "Nothing to be done" in plain.stdout, plain.stdout[-3000:]  # Snakemake: all done
    proc = _run_tool("rerun-failed", "--", "-s", SNAKEFILE, "-n", "--configfile", OFFLINE,
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert job_stats(proc.stdout) == {"bench_lora": 1, "aggregate": 1, "plots": 1, "report": 1,
                                      "all": 1}, proc.stdout[-3000:]
    rerun = [j for j in job_blocks(proc.stdout) if j["rule"] == "bench_lora"]
    assert [j["output"] for j in rerun] == [[failed]]
    # a failed result that this configuration does not produce is left alone, and named
    assert "results/old-preset/bench/m/hf/r16-qv.json: not an output of this configuration" \
        in proc.stdout


def test_rerun_failed_finds_results_per_preset_and_names_broken_files(tmp_path):
    rerun = load_tool("rerun-failed")
    root = tmp_path / "results"
    for rel, status in {"gpu/bench/m/vllm/r16.json": "oom", "gpu/bench/m/hf/r16.json": "ok",
                        "cpu/validate/m/hf/r16.json": "error", "bench/m/hf/none.json": "error",
                        "cpu/memory/m/hf/x.json": "unsupported"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps({"schema": "bench/v1", "status": status}))
    (root / "cpu" / "tables").mkdir()
    (root / "cpu" / "tables" / "broken.json").write_text('{"schema": "bench/v1", "sta')
    found, problems = rerun.failed_results([root], {"error", "oom"})
    assert [str(p.relative_to(root)) for p in found] == [
        "bench/m/hf/none.json", "cpu/validate/m/hf/r16.json", "gpu/bench/m/vllm/r16.json"]
    assert len(problems) == 1 and "broken.json" in problems[0]


def test_rerun_failed_with_nothing_failed_runs_nothing(tmp_path):
    (tmp_path / "results").mkdir()
    proc = _run_tool("rerun-failed", "--", "-n", cwd=tmp_path)
    assert proc.returncode == 0 and "nothing to rerun" in proc.stdout, proc.stdout


def test_rerun_failed_rejects_an_unknown_status(tmp_path):
    proc = _run_tool("rerun-failed", "--status", "error,crashed", cwd=tmp_path)
    assert proc.returncode == 2 and "crashed" in proc.stdout, proc.stdout
