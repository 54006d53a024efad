"""Heavy artefacts in cache_dir (models, quantized checkpoints, adapters): one key, one staged
write, and a manifest that catches a truncated or altered entry.

An entry is built in `<entry>.partial` and renamed into place when complete, so a crash never
leaves something that looks finished. Its `.complete` file is a manifest: the size and a sampled
SHA-256 (first, middle and last MiB) of every file. A full hash of a 20 GB checkpoint would cost
every job that reads it tens of seconds; size and samples catch truncation (the common damage)
and most rewrites.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .resultio import ExpectedFailure, make_public

MANIFEST = ".complete"
SAMPLE = 1 << 20


def cache_key(*parts) -> str:
    """Content key of what an entry is built from: the folder name changes when they do."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sampled_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            fh.seek(offset)
            h.update(fh.read(SAMPLE))
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest(root: Path) -> dict:
    files = {}
    for path in _files(root):
        size = path.stat().st_size
        files[str(path.relative_to(root))] = {"bytes": size, "sha256_sampled":
                                              _sampled_sha256(path, size)}
    return {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}


def damage(root: Path) -> str | None:
    """Why a cache entry cannot be trusted, or None when its files match its manifest."""
    root = Path(root)
    mf = root / MANIFEST
    if not mf.exists():
        return f"{root}: no {MANIFEST} manifest (never finished)"
    try:
        expected = json.loads(mf.read_text())["files"]
    except (ValueError, KeyError):
        return None if mf.read_text().strip() else f"{mf}: empty manifest"
    for rel, want in expected.items():
        path = root / rel
        if not path.exists():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: {size} bytes, {want['bytes']} when it was written (truncated?)"
        if _sampled_sha256(path, size) != want["sha256_sampled"]:
            return f"{path}: contents changed since it was written"
    return None


def is_complete(root: Path) -> bool:
    return (Path(root) / MANIFEST).exists()


@contextmanager
def staged(target: Path):
    """Build a cache entry in <target>.partial (yielded); on success write its manifest, make it
    world-readable and rename it into place; on failure leave nothing behind."""
    target = Path(target)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        (staging / MANIFEST).write_text(json.dumps(manifest(staging), indent=1))
        make_public(staging)
        if target.is_symlink() or target.is_file():
            target.unlink()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def require_intact(root: str | Path, step: str, result_file: str | None = None) -> None:
    """Stop a job that would read a damaged cache entry, naming the file and the remedy."""
    why = damage(Path(root))
    if why is None:
        return
    remedy = (f"delete {result_file} (and the entry) and rerun: Snakemake rebuilds it"
              if result_file else f"delete {root} and rerun the {step} step")
    raise ExpectedFailure("error", f"damaged cache entry of the {step} step: {why}; {remedy}")
