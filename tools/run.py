"""Run Snakemake after checking the config files it will read (tools/configcheck.py says why).

    python tools/run.py --cores 1 --configfile config/offline-cpu.yaml   # any snakemake arguments

A missing or malformed config file stops here with one line naming the file (and line and
column for YAML); otherwise this process becomes `python -m snakemake <the same arguments>`.
"""
from __future__ import annotations

import os
import sys

from configcheck import check_all, configfiles_in


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    errors = check_all(configfiles_in(argv))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if errors:
        return 1
    os.execv(sys.executable, [sys.executable, "-m", "snakemake", *argv])
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
