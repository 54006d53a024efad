"""Rerun only the configurations whose result says they failed, and what depends on them.

    python tools/rerun-failed.py [--status error,oom] [--results DIR]... [-- SNAKEMAKE ARGS]
    python tools/rerun-failed.py -- -n --configfile config/gpu-synthetic.yaml   # plan only

With `record_errors: true` a failed or out-of-memory configuration is a result JSON with
`status: error` or `oom`; Snakemake takes it as done, and `-R bench_lora` would rerun every
bench_lora job. This finds the result JSONs under the results folder (default: `results/` of
Snakemake's working directory, searched recursively, so `results/<preset>/...` too) whose status
is in the set, and runs `snakemake --forcerun <those files> SNAKEMAKE ARGS`: those jobs rerun,
and after them what reads their results (aggregate, plots, report).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from configcheck import check_all, configfiles_in

STATUSES = ("ok", "oom", "unsupported", "error")


def parse_statuses(text: str) -> set[str]:
    statuses = {s.strip() for s in text.split(",") if s.strip()}
    unknown = sorted(statuses - set(STATUSES))
    if unknown or not statuses:
        raise argparse.ArgumentTypeError(
            f"--status {text!r}: unknown status {', '.join(unknown) or '(none given)'} "
            f"(statuses: {', '.join(STATUSES)})")
    return statuses


def _status(path: Path) -> tuple[str | None, str | None]:
    """(status, problem) of one JSON file; status None for a file that is no result."""
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: not a readable JSON result ({exc}); delete it to have it rebuilt"
    if isinstance(result, dict) and str(result.get("schema", "")).startswith("bench/"):
        return result.get("status"), None
    return None, None


def failed_results(roots: list[Path], statuses: set[str]) -> tuple[list[Path], list[str]]:
    """(result files whose status is in `statuses`, problems met on the way), sorted."""
    found, problems = [], []
    for root in roots:
        if not root.is_dir():
            problems.append(f"{root}: no such results folder")
            continue
        for path in sorted(root.rglob("*.json")):
            status, problem = _status(path)
            if problem:
                problems.append(problem)
            elif status in statuses:
                found.append(path)
    return sorted(set(found)), problems


def snakemake_workdir(snakemake_args: list[str]) -> Path:
    """The working directory Snakemake will use (--directory, else here)."""
    from snakemake.cli import get_argument_parser
    try:
        args, _ = get_argument_parser().parse_known_args(snakemake_args)
    except SystemExit:
        return Path(".")
    return Path(args.directory or ".")


def dag_outputs(snakemake_args: list[str]) -> set[str]:
    """Output files (relative to the working directory) of the DAG these Snakemake arguments
    build, from `snakemake --summary` (plans, deploys and runs nothing)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", *snakemake_args, "--summary"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = proc.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("output_file\t")), None)
    if proc.returncode != 0 or header is None:
        raise RuntimeError(f"snakemake --summary failed:\n{proc.stdout[-3000:]}")
    return {line.split("\t", 1)[0] for line in lines[header + 1:] if "\t" in line}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, snakemake_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status", type=parse_statuses, default={"error", "oom"},
                        help="comma-separated statuses to rerun (default: error,oom)")
    parser.add_argument("--results", type=Path, action="append",
                        help="results folder(s), relative to Snakemake's working directory "
                             "(default: results)")
    return parser.parse_args(ours), snakemake_args


def main(argv: list[str] | None = None) -> int:
    args, snakemake_args = parse_args(sys.argv[1:] if argv is None else argv)
    errors = check_all(configfiles_in(snakemake_args))
    workdir = snakemake_workdir(snakemake_args)
    roots = [workdir / r for r in (args.results or [Path("results")])]
    failed, problems = failed_results(roots, args.status)
    for message in errors + problems:
        print(f"{'error' if message in errors else 'warning'}: {message}", file=sys.stderr)
    if errors:
        return 1
    wanted = ",".join(sorted(args.status))
    if not failed:
        where = ", ".join(map(str, roots))
        print(f"no result with status {wanted} under {where}: nothing to rerun")
        return 0
    try:
        in_dag = dag_outputs(snakemake_args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    targets = [os.path.relpath(p, workdir) for p in failed]
    for target in sorted(set(targets) - in_dag):  # Snakemake would stop: "No rule to produce"
        print(f"warning: {target}: not an output of this configuration (another preset's, or of "
              "a model or engine no longer configured): left as it is", file=sys.stderr)
    targets = [t for t in targets if t in in_dag]
    if not targets:
        print("no failed result belongs to this configuration: nothing to rerun")
        return 0
    print(f"rerunning {len(targets)} result(s) with status {wanted}:", *targets, sep="\n  ")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "snakemake", *snakemake_args,
                              "--forcerun", *targets])
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
