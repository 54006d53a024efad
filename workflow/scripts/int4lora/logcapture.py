"""Send a process's file descriptors 1 and 2 (and its children's) to a log file.

Used by the Snakemake bridge (a job's whole output goes to its log) and by the vLLM engine, whose
engine core is a subprocess that inherits the redirected descriptors.
"""
from __future__ import annotations

import contextlib
import os
import sys
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def fd_redirect(log_path: str | None):
    """Send fds 1 and 2 (this process and its children) to the log, appending; restore them
    afterwards."""
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


class FdCapture:
    """fd_redirect into an append-only log for each block, remembering where this capture
    started so that text() returns only what was written since; with tee, each block's new
    output is also copied to the real stderr (outside a Snakemake job, whose fds already go
    to the log)."""

    def __init__(self, path: str, tee: bool = True):
        self.path = path
        self._tee_enabled = tee
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
        self.start = os.path.getsize(path)
        self._teed = self.start

    @contextlib.contextmanager
    def capture(self):
        try:
            with fd_redirect(self.path):
                yield
        finally:
            self.tee()

    def tee(self) -> None:
        if not self._tee_enabled:
            return
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            f.seek(self._teed)
            data = f.read()
            self._teed += len(data)
            if data:
                os.write(2, data)

    def text(self) -> str:
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", errors="replace")
        return ""
