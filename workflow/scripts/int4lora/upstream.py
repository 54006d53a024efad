"""Propagate an upstream step's failure into this step's result (never drop a config), and stop
before reading a cache entry that was damaged since it was written."""
from __future__ import annotations

from pathlib import Path

from .cache import require_intact
from .resultio import ExpectedFailure, read_result


def cache_entries(step: str, res: dict) -> list[str]:
    """The cache folders an upstream result points to (a `local` model is the user's own)."""
    m = res["metrics"]
    if step == "fetch" and m.get("path"):
        return [] if res["params"].get("spec", {}).get("source") == "local" else [m["path"]]
    if step == "quantize" and m.get("recipe", {}).get("method") == "llmcompressor.oneshot":
        return [m["path"]]
    if step == "adapter" and m.get("paths"):
        return [str(Path(m["paths"][0]).parent)]
    return []


def require_ok(**paths) -> dict:
    """Read upstream results; raise ExpectedFailure naming the first one that did not pass, or
    whose cache entry no longer matches what was written."""
    loaded = {}
    for step, path in paths.items():
        if path is None:
            continue
        res = read_result(path)
        if res["status"] != "ok":
            raise ExpectedFailure(res["status"], f"{step} step: {res.get('reason')}")
        for entry in cache_entries(step, res):
            require_intact(entry, step, str(path))
        if step == "tuning":
            _require_readable_configs(res, str(path))
        loaded[step] = res
    return loaded


def _require_readable_configs(res: dict, result_file: str) -> None:
    """vLLM reads tuned kernel configs inside its engine, where a missing or damaged file is a
    JSONDecodeError deep in a worker's log: check each one here, naming it and the remedy."""
    import json
    for name in res["metrics"].get("files") or []:
        try:
            json.loads(Path(name).read_text())
        except (OSError, ValueError) as exc:
            why = "missing" if isinstance(exc, FileNotFoundError) else f"not JSON ({exc})"
            raise ExpectedFailure("error", f"tuned LoRA kernel config {name} is {why}; delete "
                                           f"{result_file} and rerun: Snakemake tunes again")


def adapter_dirs(meta: dict, backend: str) -> tuple[list[str], str]:
    """(adapter copies, zero-B control) of a make_adapter result in the layout `backend` loads:
    vLLM needs expert adapters rewritten per expert (make_adapter writes both layouts)."""
    if backend == "vllm" and meta.get("vllm_paths"):
        return list(meta["vllm_paths"]), meta["vllm_control_path"]
    return list(meta["paths"]), meta["control_path"]


def tuned_dir(upstream: dict) -> str | None:
    """VLLM_TUNED_CONFIG_FOLDER of a job whose engine runs tuned LoRA kernel configs."""
    tuning = upstream.get("tuning")
    return tuning["metrics"]["config_folder"] if tuning else None
