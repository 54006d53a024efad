"""The aggregated tables: written by aggregate with a checksum file, read by plots and report
through one function that stops on a table damaged since aggregate wrote it.

A truncated CSV still parses (a cut header becomes other columns, a cut row a row of blanks), so
without a check the figures and the report would quietly lose rows. `SHA256SUMS` beside the
tables is in `sha256sum` format (`cd tables && sha256sum -c SHA256SUMS` checks it by hand) and not
JSON, so that nothing that reads every result JSON mistakes it for a result. Tables without it
(run folders written before it existed) are read as they are.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from .resultio import write_text_atomic

CHECKSUMS = "SHA256SUMS"
REMEDY = "rebuild the tables from the result JSONs: snakemake --cores 1 -R aggregate"


class TableDamaged(ValueError):
    """A table that no longer matches what aggregate wrote; the message names it and the fix."""


def write_tables(outdir: str | Path, frames: dict[str, pd.DataFrame]) -> None:
    """Each table as CSV (atomically), then the checksums of all of them."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, df in frames.items():
        text = df.to_csv(index=False)
        write_text_atomic(outdir / f"{name}.csv", text)
        sums.append(f"{hashlib.sha256(text.encode()).hexdigest()}  {name}.csv\n")
    write_text_atomic(outdir / CHECKSUMS, "".join(sums))


def _recorded(tables: Path) -> dict[str, str]:
    sums = tables / CHECKSUMS
    if not sums.is_file():
        return {}
    recorded = {}
    for line in sums.read_text().splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise TableDamaged(f"{sums}: unreadable line {line!r}; {REMEDY}")
        recorded[name] = digest
    return recorded


def read_table(tables: str | Path, name: str) -> pd.DataFrame:
    """One table (empty when aggregate wrote it empty or never wrote it), checked against the
    recorded checksum when there is one."""
    path = Path(tables) / f"{name}.csv"
    want = _recorded(Path(tables)).get(path.name)
    if want is not None and path.is_file() \
            and hashlib.sha256(path.read_bytes()).hexdigest() != want:
        raise TableDamaged(f"{path}: changed since aggregate wrote it (truncated or edited); "
                           f"{REMEDY}")
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, FileNotFoundError):
        return pd.DataFrame()
