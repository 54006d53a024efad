"""Results restored from an earlier GPU lease belong to that lease's GPU. If this machine has
another GPU model (the lent kind changed between sessions, an H100 then an H200), continuing would
mix two GPUs' timings in one run folder: set the restored results aside, so that this lease runs
the preset from scratch on one GPU, and say so.

    python3 tools/restored-gpu.py results/PRESET     (tools/restore-results.sh calls it)
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path


def this_gpu() -> str | None:
    """The first GPU's name as the driver reports it (torch reports the same), None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def restored_gpus(root: Path) -> set[str]:
    """The GPU models that the results under root were measured on."""
    gpus = set()
    for path in root.rglob("*.json"):
        try:
            env = json.loads(path.read_text()).get("env") or {}
        except (ValueError, AttributeError):
            continue
        if env.get("device") == "cuda" and env.get("gpu"):
            gpus.add(env["gpu"])
    return gpus


def main(root: str, gpu: str | None = None) -> int:
    root = Path(root)
    gpu = gpu if gpu is not None else this_gpu()
    if gpu is None or not root.is_dir():
        return 0
    others = sorted(restored_gpus(root) - {gpu})
    if not others:
        return 0
    aside = root.with_name(f"{root.name}.from-" + re.sub(r"[^A-Za-z0-9]+", "-", others[0]).strip("-"))
    shutil.rmtree(aside, ignore_errors=True)
    root.rename(aside)
    print(f"restored results were measured on {', '.join(others)}; this machine has {gpu}: "
          f"set aside in {aside}, this lease runs the preset from scratch")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
