"""The thin bridge between a rule's `snakemake` object and a script's `main()`."""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager


@contextmanager
def fd_redirect(log_path: str | None):
    """Send fds 1 and 2 (this process and its children, e.g. vLLM's engine core) to the log."""
    if not log_path:
        yield
        return
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def run(snakemake, main, **kwargs):
    from . import resultio
    resultio.RECORD_ERRORS = bool(snakemake.config.get("record_errors", False))
    log = snakemake.log[0] if len(snakemake.log) else None
    with fd_redirect(log):
        try:
            return main(**kwargs)
        except BaseException:
            traceback.print_exc()  # into the rule's log, where users look first
            raise
