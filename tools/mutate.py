"""Mutation check: does the test suite notice when a computation it relies on breaks?

    python tools/mutate.py                      # every mutation in tools/mutations.yaml
    python tools/mutate.py --only control-vs-base-itself --only 'roofline-*'
    python tools/mutate.py --full               # the whole unit suite for every mutation
    python tools/mutate.py --tests tests/test_judge.py   # these tests for every mutation
    python tools/mutate.py --list               # names, files and tests; runs nothing

Each mutation (tools/mutations.yaml) changes one spot of one file. The tool copies the repository
(tracked and untracked, not ignored, files) into a private temporary folder, runs the chosen tests
there once unmutated (they must pass), then applies each mutation alone, runs its tests
(`pytest -x`) and puts the file back. A mutation is *caught* when a test fails, *survived* when
the tests still pass. Exit status 1 if any survived or could not be run, 0 if all were caught.

Why not mutmut / cosmic-ray: they generate every operator mutant of whole modules (thousands
here), each a run of a suite that takes ~3 minutes on a 2-core CI machine; a short curated list
of named, behaviour-level mutations (a check compared with the wrong side, a label swapped, a
threshold ignored) says which protection each test gives, and runs in ~15 minutes.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = ROOT / "tools" / "mutations.yaml"
DEFAULT_TESTS = ["tests"]
KEYS = {"name", "file", "old", "regex", "new", "tests", "why"}


@dataclass
class Mutation:
    name: str
    file: str
    new: str
    old: str | None = None
    regex: str | None = None
    tests: list[str] = field(default_factory=lambda: list(DEFAULT_TESTS))
    why: str = ""

    def apply(self, text: str) -> str:
        """The file's text with this mutation applied; ValueError unless it matches once."""
        if self.old is not None:
            count = text.count(self.old)
            if count != 1:
                raise ValueError(f"mutation {self.name!r}: `old` occurs {count} times in "
                                 f"{self.file} (must be exactly once): {self.old!r}")
            return text.replace(self.old, self.new)
        matches = list(re.finditer(self.regex, text, re.M))
        if len(matches) != 1:
            raise ValueError(f"mutation {self.name!r}: `regex` matches {len(matches)} times in "
                             f"{self.file} (must be exactly once): {self.regex!r}")
        return text[:matches[0].start()] + matches[0].expand(self.new) + text[matches[0].end():]


def parse_mutation(entry, index: int) -> Mutation:
    if not isinstance(entry, dict):
        raise ValueError(f"mutation #{index + 1}: not a mapping: {entry!r}")
    name = entry.get("name", f"#{index + 1}")
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise ValueError(f"mutation {name!r}: unknown keys {unknown} (known: {sorted(KEYS)})")
    missing = [k for k in ("name", "file", "new") if not isinstance(entry.get(k), str)]
    if missing:
        raise ValueError(f"mutation {name!r}: needs a string {', '.join(missing)}")
    if (entry.get("old") is None) == (entry.get("regex") is None):
        raise ValueError(f"mutation {name!r}: give exactly one of `old` and `regex`")
    tests = entry.get("tests", DEFAULT_TESTS)
    if isinstance(tests, str):
        tests = [tests]
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"mutation {name!r}: `tests` must be a list of test paths or ids")
    return Mutation(name=name, file=entry["file"], new=entry["new"], old=entry.get("old"),
                    regex=entry.get("regex"), tests=list(tests), why=entry.get("why", ""))


def load_mutations(path: Path) -> list[Mutation]:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: must hold a list of mutations")
    mutations = [parse_mutation(e, i) for i, e in enumerate(data)]
    names = [m.name for m in mutations]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate mutation names {dupes}")
    return mutations


def check_mutation(m: Mutation, root: Path) -> str:
    """The mutated text of m's file, after checking that it applies, changes the file and still
    compiles (a syntax error would be 'caught' by any test)."""
    path = root / m.file
    if not path.is_file():
        raise ValueError(f"mutation {m.name!r}: no file {m.file}")
    text = path.read_text()
    mutated = m.apply(text)
    if mutated == text:
        raise ValueError(f"mutation {m.name!r}: the replacement leaves {m.file} unchanged")
    for target in m.tests:
        if not (root / target.split("::")[0]).exists():
            raise ValueError(f"mutation {m.name!r}: no test path {target}")
    if path.suffix == ".py":
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError as exc:
            raise ValueError(f"mutation {m.name!r}: the mutated {m.file} does not compile "
                             f"(line {exc.lineno}: {exc.msg})") from None
    return mutated


def select(mutations: list[Mutation], patterns: list[str]) -> list[Mutation]:
    if not patterns:
        return mutations
    chosen = [m for m in mutations if any(fnmatch.fnmatch(m.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatch(m.name, p) for m in mutations)]
    if unmatched:
        raise ValueError(f"--only {', '.join(unmatched)}: no mutation of that name "
                         f"(see --list)")
    return chosen


def scratch_copy(root: Path) -> Path:
    """The repository's tracked and untracked (not ignored) files, in a private temp folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=root, capture_output=True, check=True)
    dest = Path(tempfile.mkdtemp(prefix="int4lora-mutate-"))
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = root / rel
        if src.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_tests(workdir: Path, python: str, targets: list[str], timeout: float) -> dict:
    """pytest -x on `targets` in workdir: {"rc", "seconds", "failed": [...], "tail"}."""
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *targets]
    # no bytecode: a same-size mutation written within a second of the original could otherwise
    # be served from a stale .pyc
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # the copy leaves ignored folders behind: the tests that read vLLM's source read this tree's
    if (ROOT / ".cache" / "vllm-src" / "vllm").is_dir():
        env.setdefault("VLLM_SRC", str(ROOT / ".cache" / "vllm-src" / "vllm"))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"rc": None, "seconds": time.monotonic() - t0, "failed": [], "tail": out[-2000:]}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return {"rc": proc.returncode, "seconds": time.monotonic() - t0, "failed": failed,
            "tail": proc.stdout[-2000:]}


def outcome(run: dict) -> str:
    """pytest's exit status as a verdict on the mutant: 1 = a test failed = caught."""
    if run["rc"] is None:
        return "caught (timeout)"
    return {0: "SURVIVED", 1: "caught"}.get(run["rc"], f"error (pytest exit {run['rc']})")


def mutate_one(m: Mutation, mutated: str, workdir: Path, python: str, targets: list[str],
               timeout: float) -> dict:
    path = workdir / m.file
    original = path.read_text()
    path.write_text(mutated)
    try:
        run = run_tests(workdir, python, targets, timeout)
    finally:
        path.write_text(original)
    return {"name": m.name, "file": m.file, "tests": targets, **run, "outcome": outcome(run)}


def print_summary(results: list[dict]) -> None:
    width = max(len(r["name"]) for r in results)
    print("\nmutation".ljust(width + 1), " outcome            seconds  caught by")
    for r in results:
        by = r["failed"][0] if r["failed"] else ""
        print(f"{r['name']:<{width}}  {r['outcome']:<18} {r['seconds']:7.0f}  {by}")
    caught = sum(r["outcome"].startswith("caught") for r in results)
    print(f"\n{caught} of {len(results)} mutations caught")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutations", type=Path, default=MUTATIONS, help="the mutation list (YAML)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only mutations whose name matches (glob; repeatable)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true",
                       help="run the whole unit suite (tests/) for every mutation")
    group.add_argument("--tests", nargs="+", metavar="PATH",
                       help="run these test files / ids for every mutation")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    p.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the unmutated run (only when you know the tests pass)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy (path printed)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    return p.parse_args(argv)


def targets_of(m: Mutation, args) -> list[str]:
    return DEFAULT_TESTS if args.full else (args.tests or m.tests)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        chosen = select(load_mutations(args.mutations), args.only)
        mutated = {m.name: check_mutation(m, ROOT) for m in chosen}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"mutate: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file} -> {' '.join(targets_of(m, args))}")
        return 0
    workdir = scratch_copy(ROOT)
    print(f"scratch copy: {workdir}", flush=True)
    try:
        return run_all(chosen, mutated, workdir, args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_all(chosen: list[Mutation], mutated: dict, workdir: Path, args) -> int:
    if not args.no_baseline:
        union = sorted({t for m in chosen for t in targets_of(m, args)})
        base = run_tests(workdir, args.python, union, args.timeout)
        print(f"unmutated: pytest exit {base['rc']} in {base['seconds']:.0f} s", flush=True)
        if base["rc"] != 0:
            print(f"the tests fail without any mutation: fix them first\n{base['tail']}",
                  file=sys.stderr)
            return 2
    results = []
    for m in chosen:
        r = mutate_one(m, mutated[m.name], workdir, args.python, targets_of(m, args),
                       args.timeout)
        results.append(r)
        print(f"{r['outcome']:<18} {r['seconds']:5.0f} s  {m.name}", flush=True)
        if not r["outcome"].startswith(("caught", "SURVIVED")):
            print(r["tail"], file=sys.stderr)
    print_summary(results)
    return 0 if all(r["outcome"].startswith("caught") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
