"""Pins of the project's environments, and a check that each one resolves with pip.

    python tools/envpins.py                   # resolve envs/*.yaml for Python 3.12, x86_64
    python tools/envpins.py --glibc 2.28      # ... allowing manylinux wheels up to glibc 2.28 only

Resolving asks the package index (a dry run: nothing is installed). The pins themselves are read
without network by tests/test_reliability.py, which checks that they agree across the envs,
envs/requirements-cpu.txt and envs/gpu-bundle.lock.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"
CONDA_ENVS = ("hf", "quantize", "report", "vllm")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)$")
CONDA_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*=\s*([^\s=]+)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_pins(lines, where: str, pattern=PIN) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = pattern.match(line)
        if not m:
            raise ValueError(f"{where}: {line!r} is not an exact pin (name==version)")
        pins[normalize(m.group(1))] = m.group(2)
    return pins


def requirement_pins(path: str | Path) -> dict[str, str]:
    """name -> version of a requirements file or lock (one `name==version` per line)."""
    path = Path(path)
    return _parse_pins(path.read_text().splitlines(), str(path))


def conda_env_pins(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """(conda pins, pip pins) of a conda environment file."""
    path = Path(path)
    deps = yaml.safe_load(path.read_text())["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]
    return _parse_pins(conda, str(path), CONDA_PIN), _parse_pins(pip, str(path))


def all_pins() -> dict[str, dict[str, str]]:
    """{source file name: {package: version}} for every pinned environment of the project."""
    sources = {f"{env}.yaml": conda_env_pins(ENVS / f"{env}.yaml")[1] for env in CONDA_ENVS}
    sources["requirements-cpu.txt"] = requirement_pins(ENVS / "requirements-cpu.txt")
    sources["gpu-bundle.lock"] = requirement_pins(ENVS / "gpu-bundle.lock")
    return sources


def manylinux_platforms(glibc_minor: int) -> list[str]:
    """Every x86_64 manylinux tag a machine with glibc 2.<glibc_minor> accepts."""
    tags = [f"manylinux_2_{n}_x86_64" for n in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014_x86_64", 12: "manylinux2010_x86_64", 5: "manylinux1_x86_64"}
    return tags + [tag for floor, tag in legacy.items() if glibc_minor >= floor] + ["linux_x86_64"]


def resolve(pins: dict[str, str], python: str = "3.12", glibc_minor: int = 39) -> dict[str, str]:
    """What pip would install for these pins on Python `python`, x86_64, glibc 2.<glibc_minor>
    (binary wheels only, dry run). Raises RuntimeError with pip's message when it cannot."""
    platforms = [a for tag in manylinux_platforms(glibc_minor) for a in ("--platform", tag)]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
               "--python-version", python, "--implementation", "cp", "--only-binary=:all:",
               *platforms, "--report", str(report), *[f"{n}=={v}" for n, v in pins.items()]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
            raise RuntimeError("\n".join(errors) or proc.stderr[-2000:])
        installed = json.loads(report.read_text())["install"]
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in installed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--glibc", default="2.39", help="highest glibc of the target machine")
    parser.add_argument("envs", nargs="*", default=list(CONDA_ENVS))
    args = parser.parse_args(argv)
    glibc_minor = int(args.glibc.split(".")[1])
    failed = 0
    for env in args.envs:
        pins = conda_env_pins(ENVS / f"{env}.yaml")[1]
        try:
            resolved = resolve(pins, args.python, glibc_minor)
        except RuntimeError as exc:
            failed += 1
            print(f"{env}: does NOT resolve for Python {args.python}, glibc {args.glibc}:\n{exc}")
            continue
        moved = {n: (v, resolved.get(n)) for n, v in pins.items() if resolved.get(n) != v}
        print(f"{env}: resolves ({len(resolved)} packages), numpy {resolved.get('numpy')}"
              + (f"; pins not kept: {moved}" if moved else ""))
        failed += bool(moved)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
