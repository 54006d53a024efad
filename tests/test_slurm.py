"""profiles/slurm through the real SLURM executor plugin (snakemake-executor-plugin-slurm 2.8).

A dry run never creates the executor, so these tests run for real: stand-in `sbatch`, `sacct`,
`squeue`, `scancel` (and the `sinfo`/`scontrol`/`sacctmgr` the plugin consults) on PATH record
what the plugin asks of SLURM and answer as SLURM would. The stand-in `sbatch` is the compute node
too: it writes the submitted job's declared outputs as placeholders (nothing is computed here;
the other tests run the rules' scripts), so that Snakemake moves on and every rule of the
gpu-smoke DAG is submitted. No conda here: `--sdm env-modules` replaces the profile's conda
(no rule declares modules), everything else is the profile as shipped.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, SNAKEFILE
from test_reliability import job_blocks

if shutil.which("flock") is None:  # util-linux; the stand-in sbatch numbers its jobs with it
    pytest.skip("the stand-in sbatch needs flock", allow_module_level=True)

PROFILE = ROOT / "profiles" / "slurm"
GPU_SMOKE = ROOT / "config" / "gpu-smoke.yaml"

SBATCH = r"""#!/usr/bin/env bash
set -euo pipefail
state="${SLURM_STANDIN:?stand-in sbatch: SLURM_STANDIN is not set}"
comment=""; prev=""
for arg in "$@"; do [ "$prev" = "--comment" ] && comment="$arg"; prev="$arg"; done
outputs="$state/outputs/$comment"
if [ -z "$comment" ] || [ ! -f "$outputs" ]; then
  echo "sbatch: error: no planned job for --comment '$comment'" >&2; exit 1
fi
next_id='n=$(( $(cat "$1" 2>/dev/null || echo 1000) + 1 )); echo $n > "$1"; echo $n'
id=$(flock "$state/lock" sh -c "$next_id" _ "$state/next_id")  # the plugin submits in 2 threads
printf '%s\0' "$@" > "$state/job.$id.argv"
while IFS= read -r f; do
  mkdir -p "$(dirname "$f")"; echo "placeholder from the stand-in SLURM node" > "$f"
done < "$outputs"
echo "$id"
"""

# every stand-in logs its call; sacct/squeue report each submitted job as completed
LOG_CALL = 'echo "$(basename "$0") $*" >> "${SLURM_STANDIN:?}/calls.log"\n'
JOB_STATES = 'for f in "$SLURM_STANDIN"/job.*.argv; do [ -e "$f" ] || continue; ' \
             'id=${f##*/job.}; echo "${id%.argv}|COMPLETED"; done\n'
STANDINS = {
    "sbatch": SBATCH,
    "sacct": "#!/usr/bin/env bash\n" + LOG_CALL + JOB_STATES,
    "squeue": "#!/usr/bin/env bash\n" + LOG_CALL + JOB_STATES,
    "scancel": "#!/usr/bin/env bash\n" + LOG_CALL,
    "sinfo": "#!/usr/bin/env bash\n" + LOG_CALL + 'printf "cpu*\\ngpu\\n"\n',
    "scontrol": "#!/usr/bin/env bash\n" + LOG_CALL,
    "sacctmgr": "#!/usr/bin/env bash\n" + LOG_CALL + 'cat "$SLURM_STANDIN/accounts"\n',
    "sshare": "#!/usr/bin/env bash\n" + LOG_CALL,
}


def _standin_env(tmp_path, accounts):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    (state / "outputs").mkdir(parents=True)
    (state / "accounts").write_text("".join(f"{a}\n" for a in accounts))
    for name, text in STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, SLURM_STANDIN=str(state), PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("SLURM_JOB_ID", None)
    return env, state


def _config(tmp_path):
    config = yaml.safe_load(GPU_SMOKE.read_text())
    config["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "gpu-smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake(workdir, configfile, *args, env=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(configfile), *map(str, args)]
    return subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def _comment(job):
    """The plugin's `--comment`: rule_<rule>[_wildcards_<values joined by _>]."""
    values = "_".join(job["wildcards"].values()).replace("/", "_")
    return f"rule_{job['rule']}" + (f"_wildcards_{values}" if values else "")


def _plan_outputs(workdir, configfile, state):
    """Dry-run the DAG and tell the stand-in node which files each job writes."""
    proc = _snakemake(workdir, configfile, "-n")
    assert proc.returncode == 0, proc.stdout[-3000:]
    planned = [j for j in job_blocks(proc.stdout) if j["output"]]
    for job in planned:
        files = [str(workdir / f) for f in job["output"] + job["benchmark"]]
        (state / "outputs" / _comment(job)).write_text("\n".join(files) + "\n")
    return planned


def _sbatch_calls(state):
    """{slurm job id: {"argv": [...], "flags": {flag: value}}} of every sbatch call."""
    calls = {}
    for f in state.glob("job.*.argv"):
        argv = f.read_bytes().decode().split("\0")[:-1]
        flags = {}
        for i, arg in enumerate(argv):
            if arg.startswith("--") and "=" in arg:
                key, _, value = arg.partition("=")
                flags[key] = value
            elif arg.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                flags[arg] = argv[i + 1]
        calls[f.name.split(".")[1]] = {"argv": argv, "flags": flags}
    return calls


def _submitted(output):
    """{snakemake jobid: slurm job id} from the executor's log lines."""
    return dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output))


def _run_with_profile(tmp_path, accounts):
    env, state = _standin_env(tmp_path, accounts)
    workdir = tmp_path / "work"
    workdir.mkdir()
    configfile = _config(tmp_path)
    planned = _plan_outputs(workdir, configfile, state)
    proc = _snakemake(workdir, configfile, "--profile", PROFILE, "--sdm", "env-modules",
                      "--slurm-init-seconds-before-status-checks", 1,
                      "--seconds-between-status-checks", 1, "--latency-wait", 5, env=env)
    return proc, state, planned


def _expect_cpu_job(rule, flags, resources):
    assert flags.get("-p") == "cpu", (rule, flags)
    assert "--gpus" not in flags and "--cpus-per-gpu" not in flags, (rule, flags)
    assert flags.get("--cpus-per-task") == resources.get("cpus_per_task", "1"), (rule, flags)


def _expect_gpu_job(rule, flags, resources):
    assert flags.get("-p") == "gpu", (rule, flags)
    assert flags.get("--gpus") == f"h100:{resources['gpu']}", (rule, flags)
    assert flags.get("--cpus-per-gpu") == "8", (rule, flags)
    assert "--cpus-per-task" not in flags, (rule, flags)


def test_every_rule_gets_its_partition_gpu_cpus_memory_time_and_account(tmp_path):
    proc, state, planned = _run_with_profile(tmp_path, accounts=["your_account", "other"])
    assert proc.returncode == 0, proc.stdout[-5000:]
    jobs = {j["jobid"]: j for j in job_blocks(proc.stdout) if "jobid" in j}
    submitted = _submitted(proc.stdout)
    calls = _sbatch_calls(state)
    assert sorted(submitted.values()) == sorted(calls), (submitted, list(calls))
    assert {jobs[j]["rule"] for j in submitted} == {j["rule"] for j in planned}
    assert len(calls) == len(planned)
    for jobid, slurm_id in submitted.items():
        rule, resources = jobs[jobid]["rule"], jobs[jobid]["resources"]
        flags = calls[slurm_id]["flags"]
        assert flags.get("-A") == "your_account", (rule, flags)
        assert flags.get("--mem") == resources["mem_mb"], (rule, flags, resources)
        assert flags.get("-t") == resources["runtime"], (rule, flags, resources)
        if int(resources.get("gpu", 0)) > 0:
            _expect_gpu_job(rule, flags, resources)
        else:
            _expect_cpu_job(rule, flags, resources)
    gpu_rules = {jobs[j]["rule"] for j in submitted if int(jobs[j]["resources"].get("gpu", 0))}
    assert {"measure_bandwidth", "fetch_model", "bench_lora", "validate"} <= gpu_rules
    assert not gpu_rules & {"make_adapter", "aggregate", "plots", "report"}
    assert any(line.startswith("sacct ") for line in (state / "calls.log").read_text().splitlines())
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    unknown = set(profile["set-resources"]) - {j["rule"] for j in planned}
    assert not unknown, f"profiles/slurm set-resources names no rule of the workflow: {unknown}"


def test_the_account_placeholder_stops_the_run_before_any_submission(tmp_path):
    proc, state, _ = _run_with_profile(tmp_path, accounts=["lab_a", "lab_b"])
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "your_account appears to be invalid" in proc.stdout, proc.stdout[-3000:]
    assert not list(state.glob("job.*.argv"))


def test_standin_sbatch_refuses_a_job_it_was_not_told_about(tmp_path):
    """The stand-in node is no blank cheque: an unplanned job fails its submission."""
    env, state = _standin_env(tmp_path, ["your_account"])
    proc = subprocess.run(["sbatch", "--parsable", "--comment", "rule_nope"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "rule_nope" in proc.stderr
    assert not list(state.glob("job.*.argv")), shlex.join(proc.args)
