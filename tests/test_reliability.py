"""Everyday reliability (issue 13): config-file errors, file modes, the schema draft, pinned
environments in step, and rerunning only what failed."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SNAKEFILE, run_snakemake

TOOLS = ROOT / "tools"
OFFLINE = ROOT / "config" / "offline-cpu.yaml"
sys.path.insert(0, str(TOOLS))

import configcheck  # noqa: E402
import envpins  # noqa: E402


def _tool(name):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
