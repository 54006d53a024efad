"""tools/gpu-phases.sh, the driver of a GPU session, run with a stand-in `python3` on PATH that
records each command instead of running Snakemake (the tools' own logic: which targets each phase
asks for, what a budget that runs out skips, what a restored earlier lease has already done)."""
import os
import shutil
import subprocess
import tarfile

import pytest

from conftest import ROOT, load_tool

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _tree(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    for name in ("gpu-phases.sh", "gpu-node.sh", "restore-results.sh"):
        shutil.copy(ROOT / "tools" / name, repo / "tools" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls"}\n')
    shim.chmod(0o755)
    (repo / "phases").write_text(
        "# a comment line\n"
        "bench/m/e/r16.json validate/m/e/r16.json  # first\n"
        "\n"
        "bench/m/e/baseline.json\n")
    return repo, bin_dir


def _run(repo, bin_dir, budget):
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BUDGET_S": str(budget)}
    env.pop("OUT", None)
    return subprocess.run(["bash", "tools/gpu-phases.sh", "p", "phases"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)


def _snakemake_targets(tmp_path) -> list[list[str]]:
    calls = (tmp_path / "calls").read_text().splitlines()
    runs = [c for c in calls if c.startswith("-m snakemake --cores")]
    return [[a for a in c.split() if a.startswith("results/")] for c in runs]


def test_phases_run_in_order_with_targets_under_the_presets_results(tmp_path):
    repo, bin_dir = _tree(tmp_path)
    proc = _run(repo, bin_dir, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _snakemake_targets(tmp_path) == [
        ["results/p/bench/m/e/r16.json", "results/p/validate/m/e/r16.json"],
        ["results/p/bench/m/e/baseline.json"]]


def test_a_budget_that_ran_out_names_the_phases_it_skipped(tmp_path):
    repo, bin_dir = _tree(tmp_path)
    proc = _run(repo, bin_dir, 30)
    assert proc.returncode == 124
    assert not (tmp_path / "calls").exists() or _snakemake_targets(tmp_path) == []
    assert proc.stdout.count("not started") == 2 and "bench/m/e/baseline.json" in proc.stdout


def test_targets_an_earlier_lease_finished_are_not_asked_for_again(tmp_path):
    """Restored results whose weights are rebuilt here would rerun if asked for (mtime)."""
    repo, bin_dir = _tree(tmp_path)
    done = repo / "staging" / "results" / "p" / "bench" / "m" / "e" / "r16.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    (repo / ".gpu-results").mkdir()
    with tarfile.open(repo / ".gpu-results" / "results.tar.gz", "w:gz") as tar:
        tar.add(repo / "staging" / "results", arcname="results")
    proc = _run(repo, bin_dir, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (repo / "results" / "p" / "bench" / "m" / "e" / "r16.json").is_file()  # restored
    assert _snakemake_targets(tmp_path) == [["results/p/validate/m/e/r16.json"],
                                            ["results/p/bench/m/e/baseline.json"]]
    # the restore ran before the first phase, and dropped stale cache results
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "tools/restored-gpu.py results/p"
    assert calls[1].startswith("tools/drop-stale-cache-results.py results/p")


def _result(path, gpu, device="cuda"):
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": "ok", "env": {"device": device, "gpu": gpu}}))


def test_results_of_another_gpu_model_are_set_aside_not_mixed_in(tmp_path, capsys):
    rg = load_tool("restored-gpu")
    root = tmp_path / "results" / "p"
    _result(root / "bench" / "m" / "e" / "r16.json", "NVIDIA H100 80GB HBM3")
    _result(root / "models" / "m.json", None, device="cpu")
    assert rg.main(str(root), gpu="NVIDIA H100 80GB HBM3") == 0 and root.is_dir()  # same GPU
    assert rg.main(str(root), gpu="NVIDIA H200") == 0
    aside = tmp_path / "results" / "p.from-NVIDIA-H100-80GB-HBM3"
    assert not root.exists() and (aside / "bench" / "m" / "e" / "r16.json").is_file()
    assert "measured on NVIDIA H100 80GB HBM3; this machine has NVIDIA H200" in \
        capsys.readouterr().out


def test_this_gpu_reads_nvidia_smi_and_none_without_it(tmp_path, monkeypatch):
    rg = load_tool("restored-gpu")
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = --query-gpu=name ] && printf "NVIDIA H200\\nNVIDIA H200\\n"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert rg.this_gpu() == "NVIDIA H200"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert rg.this_gpu() is None


def test_a_session_runs_the_ct017_check_then_the_phases_within_one_budget(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "gpu-session.sh", repo / "tools")
    calls = tmp_path / "calls"
    (repo / "tools" / "ct017-check.sh").write_text(f'echo "ct017 $*" >> {calls}; sleep 2\n')
    (repo / "tools" / "gpu-phases.sh").write_text(
        f'echo "phases $* budget=$BUDGET_S" >> {calls}; mkdir -p results/p; echo x > results/p/r\n')
    env = {**os.environ, "BUDGET_S": "100", "CT_BUDGET_S": "1", "PRESET": "p",
           "SESSION_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", "tools/gpu-session.sh", "/tmp/ct.whl"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "ct017 /tmp/ct.whl"
    phases, budget = lines[1].rsplit(" budget=", 1)
    assert phases == "phases p config/p.phases" and 95 <= int(budget) <= 99  # the check's time
    assert "ct017 check exit code 124" in proc.stdout  # stopped at CT_BUDGET_S
    with tarfile.open(tmp_path / "session.tar.gz") as tar:
        assert {"results/p/r", "logs/ct017.log"} <= set(tar.getnames())
