"""The thin bridge between a rule's `snakemake` object and a script's `main()`."""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager, suppress


@contextmanager
def fd_redirect(log_path: str | None):
    """Send fds 1 and 2 (this process and its children, e.g. vLLM's engine core) to the log,
    appending; restore them afterwards."""
    if not log_path:
        yield
        return
    _flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield
    finally:
        _flush()
        for fd, old in saved.items():
            os.dup2(old, fd)
            os.close(old)
        os.close(log_fd)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()


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
