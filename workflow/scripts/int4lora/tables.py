"""The aggregated tables: written by aggregate with a manifest, read by plots and report through
one function that stops on a table damaged since aggregate wrote it.

A truncated CSV still parses (a cut header becomes other columns, a cut row a row of blanks), so
without a check the figures and the report would quietly lose rows. `manifest.json` beside the
tables holds each table's size, SHA-256 and row count; tables without one (run folders written
before it existed) are read as they are.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from .resultio import write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
REMEDY = "rebuild the tables from the result JSONs: snakemake --cores 1 -R aggregate"


class TableDamaged(ValueError):
    """A table that no longer matches what aggregate wrote; the message names it and the fix."""


def write_tables(outdir: str | Path, frames: dict[str, pd.DataFrame]) -> None:
    """Each table as CSV (atomically), then the manifest of all of them."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, df in frames.items():
        text = df.to_csv(index=False)
        write_text_atomic(outdir / f"{name}.csv", text)
        data = text.encode()
        entries[f"{name}.csv"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                  "rows": len(df)}
    write_json_atomic(outdir / MANIFEST, {"tables": entries})


def read_table(tables: str | Path, name: str) -> pd.DataFrame:
    """One table (empty when aggregate wrote it empty or never wrote it), checked against the
    manifest when there is one."""
    path = Path(tables) / f"{name}.csv"
    manifest = Path(tables) / MANIFEST
    if manifest.is_file() and path.is_file():
        try:
            want = json.loads(manifest.read_text())["tables"].get(path.name)
        except (ValueError, KeyError) as exc:
            raise TableDamaged(f"{manifest}: unreadable ({exc}); {REMEDY}") from None
        if want is not None:
            data = path.read_bytes()
            if len(data) != want["bytes"]:
                raise TableDamaged(f"{path}: {len(data)} bytes, {want['bytes']} when aggregate "
                                   f"wrote it (truncated?); {REMEDY}")
            if hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise TableDamaged(f"{path}: changed since aggregate wrote it; {REMEDY}")
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, FileNotFoundError):
        return pd.DataFrame()
