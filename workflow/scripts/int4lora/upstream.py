"""Propagate an upstream step's failure into this step's result (never drop a config)."""
from __future__ import annotations

from .resultio import ExpectedFailure, read_json


def require_ok(**paths) -> dict:
    """Read upstream results; raise ExpectedFailure naming the first one that did not pass."""
    loaded = {}
    for step, path in paths.items():
        if path is None:
            continue
        res = read_json(path)
        if res["status"] != "ok":
            raise ExpectedFailure(res["status"], f"{step} step: {res.get('reason')}")
        loaded[step] = res
    return loaded


def adapter_dirs(meta: dict, backend: str) -> tuple[list[str], str]:
    """(adapter copies, zero-B control) of a make_adapter result in the layout `backend` loads:
    vLLM needs expert adapters rewritten per expert (make_adapter writes both layouts)."""
    if backend == "vllm" and meta.get("vllm_paths"):
        return list(meta["vllm_paths"]), meta["vllm_control_path"]
    return list(meta["paths"]), meta["control_path"]
