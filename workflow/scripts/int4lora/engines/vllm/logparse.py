"""Facts the vLLM engine printed about itself, parsed from its captured log (pure)."""
from __future__ import annotations

import re
from typing import Iterable, Sequence


# Format of every vLLM record (vllm/logger.py _FORMAT):
#   "%(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s", datefmt "%m-%d %H:%M:%S"
# lines from the engine core process carry a "(EngineCore pid=N) " prefix
# (vllm/utils/system_utils.py _add_prefix), so no regex is anchored at the line start.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RECORD = re.compile(
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{2}-\d{2} \d{2}:\d{2}:\d{2} "
    r"\[[^\]]*\] (?P<msg>.*)$"
)
_PY_WARNING = re.compile(r"\b(\w*Warning): (.*)$")

# Each message the parser reads, by name: the vLLM 0.26 source that prints it, and its pattern.
_MESSAGES = {
    # compressed_tensors_wNa16.py: logger.info("Using %s for CompressedTensorsWNA16", kernel)
    "w4a16_kernel": r"Using (\w+) for CompressedTensorsWNA16\b",
    # compressed_tensors_moe.py: logger.info_once("Using CompressedTensorsWNA16MarlinMoEMethod")
    "moe_method": r"Using (CompressedTensors\w*MoEMethod)\b",
    # fused_moe/oracle/int_wna16.py: f"Using '{backend.value}' WNA16 MoE backend." (other
    # oracles: "Using X Fp8 MoE backend ...", "Using TRITON Unquantized MoE LoRA backend")
    "moe_backend": r"Using '?(?P<backend>\w+)'?(?: (?P<kind>[\w ]+?))? MoE (?:LoRA )?backend",
    # lora/ops/triton_ops/utils.py
    "lora_tuned": r"Using tuned LoRA kernel configs from (\S+?)\.?\s*$",
    "lora_missing": r"No LoRA kernel configs found in (\S+)",
    "lora_default": r"Using default LoRA kernel configs",
    # v1/worker/gpu_model_runner.py "Model loading took %s GiB memory and %.6f seconds",
    # v1/worker/gpu/model_runner.py "Model loading took %s GiB and %.6f seconds"
    "model_loading": r"Model loading took (-?[\d.]+) GiB (?:memory )?and ([\d.]+) seconds",
    # v1/worker/gpu_worker.py: "Available KV cache memory: %s GiB"
    "kv_gib": r"Available KV cache memory: (-?[\d.]+) GiB",
    # v1/core/kv_cache_utils.py: "GPU KV cache size: %s tokens" with f"{num_tokens:,}"
    "kv_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    # gpu_model_runner.py: "Graph capturing finished in %.0f secs, took %.2f GiB"
    "graph": r"Graph capturing finished in ([\d.]+) secs, took (-?[\d.]+) GiB",
    # compilation/monitor.py "torch.compile took %.2f s in total"; compilation/decorators.py
    # "torch.compile and initial profiling/warmup run together took %.2f s in total"
    "torch_compile": r"torch\.compile (?:and initial profiling/warmup run together )?took "
                     r"([\d.]+) s in total",
    # v1/engine/core.py: "init engine (profile, create kv cache, warmup model) took %.2f s"
    # optionally followed by " (compilation: %.2f s" (and " — language_model: ..., ...)")
    "init_engine": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
                   r"(?: \(compilation: ([\d.]+) s)?",
}
RE = {name: re.compile(pattern) for name, pattern in _MESSAGES.items()}


def _last(regex: re.Pattern, lines: Sequence[str]) -> re.Match | None:
    for line in reversed(lines):
        m = regex.search(line)
        if m:
            return m
    return None


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for it in items:
        seen.setdefault(it, None)
    return list(seen)


def parse_engine_log(text: str) -> dict:
    """Facts the engine printed about itself, from captured vLLM log text.

    Numbers come from the last occurrence (the most recent engine in a shared log).
    lora_kernel_configs: "tuned" (every LoRA op found a tuned JSON), "default" (none did),
    "mixed" (some ops tuned, others fell back to defaults), None (no LoRA kernels ran).
    moe_kernel: "<MoE method>/<backend>" (e.g. "CompressedTensorsWNA16MarlinMoEMethod/MARLIN"),
    or whichever part was logged; None for dense models.
    warnings: vLLM WARNING/ERROR records and Python "...Warning: ..." lines, de-duplicated.
    """
    text = _ANSI.sub("", text or "")
    lines = [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]

    w4a16 = _unique(m.group(1) for ln in lines for m in [RE["w4a16_kernel"].search(ln)] if m)

    moe_method = _last(RE["moe_method"], lines)
    moe_backend = _last(RE["moe_backend"], lines)
    moe_parts = [p for p in (moe_method and moe_method.group(1),
                             moe_backend and moe_backend.group("backend")) if p]
    moe_kernel = "/".join(moe_parts) if moe_parts else None

    tuned = any(RE["lora_tuned"].search(ln) for ln in lines)
    default = any(RE["lora_default"].search(ln) for ln in lines)
    lora_cfg = "mixed" if tuned and default else "tuned" if tuned else "default" if default else None

    m_load = _last(RE["model_loading"], lines)
    m_kv = _last(RE["kv_gib"], lines)
    m_tok = _last(RE["kv_tokens"], lines)
    m_graph = _last(RE["graph"], lines)
    m_init = _last(RE["init_engine"], lines)
    m_compile = _last(RE["torch_compile"], lines)
    compile_s = _fnum(m_init, 2)
    if compile_s is None:
        compile_s = _fnum(m_compile)
    return {
        "w4a16_kernels": w4a16,
        "moe_kernel": moe_kernel,
        "lora_kernel_configs": lora_cfg,
        "model_weights_gib": _fnum(m_load),
        "model_load_s": _fnum(m_load, 2),
        "kv_cache_gib": _fnum(m_kv),
        "kv_cache_tokens": int(m_tok.group(1).replace(",", "")) if m_tok else None,
        "cuda_graph_gib": _fnum(m_graph, 2),
        "cuda_graph_s": _fnum(m_graph, 1),
        "compile_s": compile_s,
        "engine_init_s": _fnum(m_init),
        "warnings": _warnings(lines),
    }


def _fnum(m: re.Match | None, group: int = 1) -> float | None:
    return float(m.group(group)) if m and m.group(group) is not None else None


def _warnings(lines: Sequence[str]) -> list[str]:
    """vLLM WARNING/ERROR records and Python "...Warning: ..." lines, de-duplicated."""
    warnings: list[str] = []
    for ln in lines:
        rec = _RECORD.search(ln)
        if rec:
            if rec.group("level") in ("WARNING", "ERROR", "CRITICAL"):
                prefix = "" if rec.group("level") == "WARNING" else rec.group("level") + ": "
                warnings.append(prefix + rec.group("msg").strip())
            continue
        pw = _PY_WARNING.search(ln)
        if pw:
            warnings.append(f"{pw.group(1)}: {pw.group(2).strip()}")
    return _unique(warnings)

