"""Did the engine compile anything? A monotonic count of entries in the JIT caches.

Triton writes one directory per compiled kernel into its cache (TRITON_CACHE_DIR, default
~/.triton/cache) and TorchInductor writes its artefacts into TORCHINDUCTOR_CACHE_DIR (default
/tmp/torchinductor_<user>); vLLM's engine core is a child process with the same environment, so
its JIT compiles land there too. A timed call during which the count grows was still compiling.
"""
from __future__ import annotations

import getpass
import os
from pathlib import Path


def cache_dirs() -> list[Path]:
    triton = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or f"/tmp/torchinductor_{_user()}"
    return [Path(triton), Path(inductor)]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _entries(path: Path, depth: int) -> int:
    """Entries under path, down to `depth` levels (Inductor nests its kernels 3 deep)."""
    try:
        with os.scandir(path) as it:
            total = 0
            for entry in it:
                total += 1
                if depth > 1 and entry.is_dir(follow_symlinks=False):
                    total += _entries(Path(entry.path), depth - 1)
            return total
    except OSError:
        return 0


class CompileWatch:
    """count() grows whenever a JIT cache gains an entry or `extra` (an engine's own counter, e.g.
    dynamo's graph count) grows."""

    def __init__(self, dirs: list[Path] | None = None, extra=None, depth: int = 3):
        self.dirs = dirs if dirs is not None else cache_dirs()
        self.extra = extra
        self.depth = depth

    def count(self) -> int:
        total = sum(_entries(d, self.depth) for d in self.dirs)
        return total + (int(self.extra()) if self.extra else 0)
