"""Result JSON: environment capture, schema validation and atomic writes.

Every rule's script ends in `write_result`, which validates against
workflow/schemas/result.schema.json and renames a temp file into place, so a crash
never leaves a half-written JSON that Snakemake would take as done.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = "bench/v2"
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
PACKAGES = ("torch", "transformers", "vllm", "bitsandbytes", "peft", "llmcompressor",
            "compressed-tensors", "accelerate", "snakemake")


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    if os.environ.get("INT4LORA_GIT_COMMIT"):  # set where the tree travels without .git
        return os.environ["INT4LORA_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info() -> dict:
    info = {"device": "cpu", "gpu": None, "driver": None, "cuda": None,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info.update(device="cuda", gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
            try:
                import pynvml
                pynvml.nvmlInit()
                info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            except Exception:  # NVML is optional; the torch figures still stand
                pass
    except ImportError:
        pass
    return info


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def capture_env(config: dict | None = None, started: float | None = None) -> dict:
    env = {**device_info(), **package_versions()}
    env.update(git_commit=git_commit(), hostname=socket.gethostname(),
               config_hash=config_hash(config) if config is not None else None,
               started=_iso(started or time.time()), finished=_iso(time.time()))
    return env


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def load_schema(name: str = "result") -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def validate_result(result: dict) -> None:
    import jsonschema
    jsonschema.validate(result, load_schema("result"))


def new_result(kind: str, model: str | None, engine: str | None = None,
               adapter: str | None = None, params: dict | None = None) -> dict:
    return {"schema": SCHEMA_VERSION, "kind": kind, "status": "ok", "reason": None,
            "model": model, "engine": engine, "adapter": adapter, "params": params or {},
            "metrics": {}, "samples": [], "env": {}}


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_public(path: str | os.PathLike) -> None:
    """Give a file, or every file and folder of a tree, the mode a plain open()/mkdir() gives
    (0644/0755 under the usual umask 022). Temp-file writers (tempfile.mkstemp, safetensors'
    save_file) create 0600, and a rename into place keeps that mode."""
    mask = current_umask()
    entries = [Path(path)]
    for parent, dirs, files in os.walk(path):  # symlinks (e.g. to a user's model) stay as they are
        entries += [Path(parent) / name for name in dirs + files]
    for entry in entries:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to a temp file beside `path` and rename it into place: a crash never leaves a
    half-written file that Snakemake would take as done; the mode is a plain file's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())  # mkstemp's 0600 survives renames
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_result(path, result: dict, config: dict | None = None, started: float | None = None):
    result["env"] = capture_env(config, started)
    validate_result(result)
    write_json_atomic(path, result)
    return result


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it and rerun the rule that "
                         f"writes it") from None


def read_result(path) -> dict:
    """A result JSON, checked against the result schema; errors name the file and the remedy."""
    import jsonschema
    result = read_json(path)
    try:
        validate_result(result)
    except jsonschema.ValidationError as exc:
        raise ValueError(f"{path}: not a valid result ({exc.message}); delete it and rerun the "
                         f"rule that writes it") from None
    return result


class ExpectedFailure(Exception):
    """A configuration that cannot run (OOM, unsupported): recorded as a result, not a crash."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# Set from config `record_errors` (GPU presets): an unexpected exception becomes a result with
# status "error" and its message, so one broken configuration does not hide the others.
RECORD_ERRORS = False


@contextmanager
def recorded_failures(result: dict):
    """Turn ExpectedFailure / CUDA OOM into result["status"] + reason; other errors propagate
    (or are recorded as status "error" when RECORD_ERRORS is set)."""
    try:
        yield result
    except ExpectedFailure as exc:
        result.update(status=exc.status, reason=exc.reason)
    except Exception as exc:  # torch.OutOfMemoryError without importing torch here
        if type(exc).__name__ == "OutOfMemoryError":
            result.update(status="oom", reason=f"GPU out of memory: {str(exc).splitlines()[0]}")
        elif RECORD_ERRORS:
            import traceback
            traceback.print_exc()
            result.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:2000])
        else:
            raise
