"""vLLM backend: compressed-tensors W4A16 (or in-flight bitsandbytes NF4) + vLLM LoRA (Punica).

Written against the vLLM 0.26.0 source (see docs/notes/vllm-engine.md for file paths and the
exact source strings behind every regex below). vLLM is imported lazily, so this module imports
on a machine without vLLM and its pure helpers are unit-tested there.

Pure helpers (tested without vLLM):
    build_llm_kwargs, kernel_env, parse_engine_log, timing_from_outputs, prompt_logprobs_to_scored,
    profiler_config_from_settings
Engine (GPU only):
    VllmEngine

Scripts that create a VllmEngine must guard their entry point with ``if __name__ == "__main__":``
(vLLM starts its engine core in a subprocess).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from int4lora.engines.base import BatchTiming, ScoredSequence
from int4lora.memory import nvml_memory
from int4lora.smk import fd_redirect

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
ALLOWED_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# vllm/config/model.py: ModelConfig.max_logprobs default 20 (caps logprobs and prompt_logprobs).
DEFAULT_MAX_LOGPROBS = 20

# vllm/model_executor/kernels/linear/__init__.py: _POSSIBLE_KERNELS[PlatformEnum.CUDA], in the
# priority order choose_mp_linear_kernel() tries them. A kernel whose class name is listed in
# VLLM_DISABLED_KERNELS (comma separated) is skipped.
CUDA_MP_LINEAR_KERNELS: tuple[str, ...] = (
    "CutlassW4A8LinearKernel",
    "MacheteLinearKernel",
    "AllSparkLinearKernel",
    "MarlinLinearKernel",
    "ConchLinearKernel",
    "ExllamaLinearKernel",
    "TritonW4A16LinearKernel",
    "HummingLinearKernel",
)

# Config name -> the MPLinearKernel class that must be chosen for every WNA16 linear layer.
W4A16_KERNELS: dict[str, str] = {
    "machete": "MacheteLinearKernel",
    "marlin": "MarlinLinearKernel",
    "allspark": "AllSparkLinearKernel",
    "conch": "ConchLinearKernel",
    "exllama": "ExllamaLinearKernel",
    "triton": "TritonW4A16LinearKernel",
}

QUANTIZATIONS = (None, "compressed-tensors", "bitsandbytes")

# settings keys passed to vllm.LLM verbatim when present (anything else in settings is ignored;
# settings["engine_args"] (a dict) is an explicit escape hatch merged last).
_PASSTHROUGH_KEYS = (
    "gpu_memory_utilization",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory_bytes",
    "seed",
    "dtype",
    "compilation_config",
    "moe_backend",
    "trust_remote_code",
    "tokenizer",
)


# --------------------------------------------------------------------------------------------
# engine arguments and environment
# --------------------------------------------------------------------------------------------


def build_llm_kwargs(
    model_path: str,
    settings: dict,
    *,
    enable_lora: bool,
    max_loras: int,
    max_lora_rank: int,
    quantization: str | None,
) -> dict:
    """Keyword arguments for ``vllm.LLM(**kwargs)``.

    - ``enforce_eager`` defaults to False (CUDA graphs + torch.compile: the engine's real speed).
    - ``disable_log_stats=False``: LLM() defaults it to True, and then RequestOutput.metrics is
      None (vllm/v1/engine/output_processor.py builds RequestStateStats only when log_stats).
      We need those per-request timestamps for TTFT/TPOT.
    - ``enable_prefix_caching`` defaults to False so that repeated benchmark prompts are really
      prefilled each time (settings may turn it on).
    - ``max_logprobs`` = max(20, settings["max_logprobs"]) so score(top_k) is not capped.
    - quantization None -> not passed (vLLM reads the checkpoint's quantization_config, i.e.
      compressed-tensors); "bitsandbytes" -> in-flight NF4 of a bf16 checkpoint (vLLM sets
      load_format="bitsandbytes" itself, vllm/engine/arg_utils.py).
    - ``profiler_config`` only when settings["profile_dir"] is set (opt-in torch profiler, see
      profiler_config_from_settings); absent otherwise, so the default engine is unchanged.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization={quantization!r} is not supported by the vllm engine "
            f"(allowed: None, 'compressed-tensors', 'bitsandbytes')"
        )
    settings = dict(settings or {})
    kwargs: dict[str, Any] = {"model": str(model_path)}
    for key in _PASSTHROUGH_KEYS:
        if settings.get(key) is not None:
            kwargs[key] = settings[key]
    kwargs["enforce_eager"] = bool(settings.get("enforce_eager", False))
    kwargs["enable_prefix_caching"] = bool(settings.get("enable_prefix_caching", False))
    kwargs["disable_log_stats"] = False
    kwargs["max_logprobs"] = max(DEFAULT_MAX_LOGPROBS, int(settings.get("max_logprobs") or 0))
    if quantization is not None:
        kwargs["quantization"] = quantization

    if enable_lora:
        if int(max_lora_rank) not in ALLOWED_MAX_LORA_RANKS:
            raise ValueError(
                f"max_lora_rank={max_lora_rank} is not supported by vLLM "
                f"(allowed: {', '.join(map(str, ALLOWED_MAX_LORA_RANKS))})"
            )
        if int(max_loras) < 1:
            raise ValueError(f"max_loras={max_loras} must be >= 1")
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = int(max_loras)
        kwargs["max_lora_rank"] = int(max_lora_rank)
        max_cpu_loras = settings.get("max_cpu_loras")
        if max_cpu_loras is not None:
            if int(max_cpu_loras) < int(max_loras):
                raise ValueError(
                    f"max_cpu_loras={max_cpu_loras} must be >= max_loras={max_loras}"
                )
            kwargs["max_cpu_loras"] = int(max_cpu_loras)
    prof = profiler_config_from_settings(settings)
    if prof is not None:
        kwargs["profiler_config"] = prof
    extra = settings.get("engine_args")
    if extra:
        kwargs.update(dict(extra))
    return kwargs


def kernel_env(w4a16_kernel: str | None, tuned_lora_config_dir: str | None) -> dict[str, str]:
    """Environment variables to set before creating ``vllm.LLM``.

    w4a16_kernel: None/"auto" -> vLLM's own choice (Machete on Hopper for W4A16). Any other name
    forces that kernel by listing every other CUDA mixed-precision kernel in
    VLLM_DISABLED_KERNELS, so a layer the forced kernel cannot implement fails loudly instead
    of silently falling back. This affects only dense (MPLinearKernel) layers; MoE experts pick
    their backend separately (settings["moe_backend"]).
    tuned_lora_config_dir -> VLLM_TUNED_CONFIG_FOLDER (absolute path), read by
    vllm/lora/ops/triton_ops/utils.py:load_lora_op_config.
    """
    env: dict[str, str] = {}
    name = None if w4a16_kernel is None else str(w4a16_kernel).strip().lower()
    if name not in (None, "", "auto"):
        if name not in W4A16_KERNELS:
            raise ValueError(
                f"unknown w4a16_kernel {w4a16_kernel!r} "
                f"(allowed: auto, {', '.join(sorted(W4A16_KERNELS))})"
            )
        keep = W4A16_KERNELS[name]
        env["VLLM_DISABLED_KERNELS"] = ",".join(k for k in CUDA_MP_LINEAR_KERNELS if k != keep)
    if tuned_lora_config_dir:
        env["VLLM_TUNED_CONFIG_FOLDER"] = os.path.abspath(str(tuned_lora_config_dir))
    return env


# Opt-in torch profiler (vLLM 0.26). Source facts:
# - vllm/config/profiler.py ProfilerConfig: profiler: Literal["torch", "cuda"] | None = None;
#   torch_profiler_dir (required when profiler == "torch", made absolute by the validator);
#   torch_profiler_with_stack=True, torch_profiler_use_gzip=True,
#   torch_profiler_dump_cuda_time_total=True, torch_profiler_record_shapes=False,
#   delay_iterations=0, max_iterations=0 (no limit), warmup/wait_iterations=0 (no schedule),
#   ignore_frontend=False (only AsyncLLM has a front-end profiler; vllm.LLM uses LLMEngine).
#   compute_hash() has no factors: profiling does not change the compiled graph / compile cache.
# - vllm/entrypoints/llm.py LLM.__init__(..., profiler_config: dict | ProfilerConfig | None)
#   (dict -> ProfilerConfig via _make_config), forwarded to EngineArgs(profiler_config=...).
#   The env var VLLM_TORCH_PROFILER_DIR no longer exists in 0.26 (not in vllm/envs.py).
# - LLM.start_profile(profile_prefix=None) / LLM.stop_profile() -> v1/engine/llm_engine.py
#   -> engine_core.profile(is_start, prefix) (core_client.py: a blocking call_utility in the
#   multiprocess client) -> v1/engine/core.py EngineCore.profile -> executor.collective_rpc
#   ("profile") -> v1/worker/gpu_worker.py Worker.profile. Without a profiler_config it raises
#   RuntimeError("Profiling is not enabled. Please set --profiler-config ...").
# - Worker.profile creates TorchProfilerWrapper (vllm/profiler/wrapper.py) on the first start,
#   activities CPU+CUDA, on_trace_ready=torch.profiler.tensorboard_trace_handler(dir,
#   worker_name=trace_name, use_gzip=...). trace_name = "<prefix>_<suffix>" or "<suffix>",
#   suffix = vllm/distributed/utils.py get_worker_rank_suffix(rank) =
#   "dp{dp}_pp{pp}_tp{tp}_dcp{dcp}_ep{ep}_rank{rank}"; the name of the first start is kept for
#   later starts. torch writes "<dir>/<trace_name>.<time.time_ns()>.pt.trace.json[.gz]"
#   (torch/profiler/profiler.py tensorboard_trace_handler) when the profiler stops. On stop the
#   wrapper also prints a key_averages table sorted by self_cuda_time_total (rank 0, to stdout
#   -> our engine log) and writes it to "<dir>/profiler_out_<rank>.txt".
# - Worker.execute_model wraps each step in Worker.annotate_profile: record_function(
#   "execute_context_<n>(<tok>)_generation_<n>(<tok>)") (int4lora.profiling.STEP_ANNOTATION).
PROFILE_SETTINGS_DEFAULTS: dict[str, Any] = {
    # no Python stacks: much smaller traces and less CPU overhead; kernel times are what we need
    "torch_profiler_with_stack": False,
    "torch_profiler_use_gzip": True,
    "torch_profiler_record_shapes": False,
}


def profiler_config_from_settings(settings: dict | None) -> dict | None:
    """``profiler_config`` for ``vllm.LLM`` from settings, or None (profiling off, the default).

    settings["profile_dir"]: directory for torch traces (made absolute) -> profiler="torch".
    settings["profiler_config"]: optional dict of further ProfilerConfig fields, merged over
    PROFILE_SETTINGS_DEFAULTS (e.g. {"torch_profiler_record_shapes": True}); ignored without
    profile_dir. The engine then behaves as before until VllmEngine.profile_decode is called
    (the worker creates its profiler lazily, on the first start_profile).
    """
    settings = settings or {}
    d = settings.get("profile_dir")
    if not d:
        return None
    cfg: dict[str, Any] = dict(PROFILE_SETTINGS_DEFAULTS)
    cfg.update(dict(settings.get("profiler_config") or {}))
    cfg["profiler"] = "torch"
    cfg["torch_profiler_dir"] = os.path.abspath(os.path.expanduser(str(d)))
    return cfg


def tuned_lora_config_filenames(gpu_name: str) -> list[str]:
    """File names vLLM looks for in VLLM_TUNED_CONFIG_FOLDER for a GPU (torch.cuda.get_device_name())."""
    g = gpu_name.replace(" ", "_").replace("-", "_")
    ops = ["SHRINK", "EXPAND_TRUE", "EXPAND_FALSE", "FUSED_MOE_LORA_W13_SHRINK",
           "FUSED_MOE_LORA_W13_EXPAND", "FUSED_MOE_LORA_W2_SHRINK", "FUSED_MOE_LORA_W2_EXPAND"]
    return [f"{g}_{op}.json" for op in ops]


# --------------------------------------------------------------------------------------------
# log parsing
# --------------------------------------------------------------------------------------------

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

# compressed_tensors_wNa16.py: logger.info("Using %s for CompressedTensorsWNA16", kernel)
RE_W4A16_KERNEL = re.compile(r"Using (\w+) for CompressedTensorsWNA16\b")
# compressed_tensors_moe.py: logger.info_once("Using CompressedTensorsWNA16MarlinMoEMethod") etc.
RE_MOE_METHOD = re.compile(r"Using (CompressedTensors\w*MoEMethod)\b")
# fused_moe/oracle/int_wna16.py: f"Using '{backend.value}' WNA16 MoE backend."
# (other oracles: "Using X Fp8 MoE backend ...", "Using TRITON Unquantized MoE LoRA backend",
#  unquantized.py "Using %s MoE backend")
RE_MOE_BACKEND = re.compile(
    r"Using '?(?P<backend>\w+)'?(?: (?P<kind>[\w ]+?))? MoE (?:LoRA )?backend"
)
# lora/ops/triton_ops/utils.py
RE_LORA_TUNED = re.compile(r"Using tuned LoRA kernel configs from (\S+?)\.?\s*$")
RE_LORA_MISSING = re.compile(r"No LoRA kernel configs found in (\S+)")
RE_LORA_DEFAULT = re.compile(r"Using default LoRA kernel configs")
# v1/worker/gpu_model_runner.py: "Model loading took %s GiB memory and %.6f seconds"
# v1/worker/gpu/model_runner.py: "Model loading took %s GiB and %.6f seconds"
RE_MODEL_LOADING = re.compile(r"Model loading took (-?[\d.]+) GiB (?:memory )?and ([\d.]+) seconds")
# v1/worker/gpu_worker.py: "Available KV cache memory: %s GiB"
RE_KV_GIB = re.compile(r"Available KV cache memory: (-?[\d.]+) GiB")
# v1/core/kv_cache_utils.py: "GPU KV cache size: %s tokens" with f"{num_tokens:,}"
RE_KV_TOKENS = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
# gpu_model_runner.py / gpu/model_runner.py: "Graph capturing finished in %.0f secs, took %.2f GiB"
RE_GRAPH = re.compile(r"Graph capturing finished in ([\d.]+) secs, took (-?[\d.]+) GiB")
# compilation/monitor.py: "torch.compile took %.2f s in total"
# compilation/decorators.py: "torch.compile and initial profiling/warmup run together took %.2f s in total"
RE_TORCH_COMPILE = re.compile(
    r"torch\.compile (?:and initial profiling/warmup run together )?took ([\d.]+) s in total"
)
# v1/engine/core.py: "init engine (profile, create kv cache, warmup model) took %.2f s"
#   optionally followed by " (compilation: %.2f s" (and " — language_model: ..., encoder: ...)")
RE_INIT_ENGINE = re.compile(
    r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
    r"(?: \(compilation: ([\d.]+) s)?"
)


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

    w4a16 = _unique(m.group(1) for ln in lines for m in [RE_W4A16_KERNEL.search(ln)] if m)

    moe_method = _last(RE_MOE_METHOD, lines)
    moe_backend = _last(RE_MOE_BACKEND, lines)
    moe_parts = [p for p in (moe_method and moe_method.group(1),
                             moe_backend and moe_backend.group("backend")) if p]
    moe_kernel = "/".join(moe_parts) if moe_parts else None

    tuned = any(RE_LORA_TUNED.search(ln) for ln in lines)
    default = any(RE_LORA_DEFAULT.search(ln) for ln in lines)
    lora_cfg = "mixed" if tuned and default else "tuned" if tuned else "default" if default else None

    def fnum(m: re.Match | None, group: int = 1) -> float | None:
        return float(m.group(group)) if m and m.group(group) is not None else None

    m_load = _last(RE_MODEL_LOADING, lines)
    m_kv = _last(RE_KV_GIB, lines)
    m_tok = _last(RE_KV_TOKENS, lines)
    m_graph = _last(RE_GRAPH, lines)
    m_init = _last(RE_INIT_ENGINE, lines)
    m_compile = _last(RE_TORCH_COMPILE, lines)
    compile_s = fnum(m_init, 2)
    if compile_s is None:
        compile_s = fnum(m_compile)

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
    return {
        "w4a16_kernels": w4a16,
        "moe_kernel": moe_kernel,
        "lora_kernel_configs": lora_cfg,
        "model_weights_gib": fnum(m_load),
        "kv_cache_gib": fnum(m_kv),
        "kv_cache_tokens": int(m_tok.group(1).replace(",", "")) if m_tok else None,
        "cuda_graph_gib": fnum(m_graph, 2),
        "cuda_graph_s": fnum(m_graph, 1),
        "compile_s": compile_s,
        "engine_init_s": fnum(m_init),
        "warnings": _unique(warnings),
    }


# --------------------------------------------------------------------------------------------
# timing and logprob conversion
# --------------------------------------------------------------------------------------------


def _request_metrics(out: Any) -> tuple[float, float] | None:
    """(ttft_s, tpot_s) from a vLLM 0.26 RequestOutput.metrics (RequestStateStats), or None.

    RequestStateStats (vllm/v1/metrics/stats.py) holds
      arrival_time         frontend wall clock (time.time()) when the request was added
      first_token_latency  frontend wall-clock time from arrival to the step that produced the
                           first token (IterationStats.update_from_output) == vLLM's TTFT
      first_token_ts, last_token_ts  engine-core monotonic timestamps of the steps that produced
                           the first and the last token
      num_generation_tokens
    TPOT = (last_token_ts - first_token_ts) / (num_generation_tokens - 1), exactly vLLM's own
    mean_time_per_output_token (update_from_finished_request); 0.0 when fewer than 2 tokens (as
    vLLM does). The two clocks are never mixed.
    """
    m = getattr(out, "metrics", None)
    if m is None:
        return None
    ttft = getattr(m, "first_token_latency", None)
    first_ts = getattr(m, "first_token_ts", None)
    last_ts = getattr(m, "last_token_ts", None)
    if not ttft or ttft <= 0 or not first_ts or last_ts is None:
        return None
    n = getattr(m, "num_generation_tokens", None)
    if not n:
        n = len(out.outputs[0].token_ids)
    tpot = (last_ts - first_ts) / (n - 1) if n > 1 else 0.0
    return float(ttft), float(tpot)


def has_request_metrics(outputs: Sequence[Any]) -> bool:
    return bool(outputs) and all(_request_metrics(o) is not None for o in outputs)


def timing_from_outputs(outputs: Sequence[Any], e2e_s: float, *,
                        ttft_fallback_s: float | None = None) -> BatchTiming:
    """BatchTiming from vLLM RequestOutput-like objects (duck-typed).

    Uses per-request ``.metrics`` (see _request_metrics) when every output has them; this needs
    the engine built with disable_log_stats=False (build_llm_kwargs does that).

    Fallback when metrics are absent (stats disabled, or a vLLM whose metrics differ): the
    batch's TTFT is ``ttft_fallback_s`` -- VllmEngine.generate measures it as the wall time of
    the same batch run with max_tokens=1 -- or, when not given, e2e_s / max output length (a
    crude equal-share estimate). Then TPOT = (e2e_s - ttft) / (n_out - 1) per request (0.0 when
    n_out < 2). No NaN is ever returned.
    """
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
    output_tokens = sum(len(x) for x in ids)
    ttft: list[float] = []
    tpot: list[float] = []
    if has_request_metrics(outputs):
        for o in outputs:
            a, b = _request_metrics(o)  # type: ignore[misc]
            ttft.append(a)
            tpot.append(b)
    else:
        longest = max((len(x) for x in ids), default=1) or 1
        t0 = float(ttft_fallback_s) if ttft_fallback_s is not None else e2e_s / longest
        t0 = min(max(t0, 0.0), e2e_s)
        for x in ids:
            ttft.append(t0)
            tpot.append((e2e_s - t0) / (len(x) - 1) if len(x) > 1 else 0.0)
    return BatchTiming(
        e2e_s=float(e2e_s),
        ttft_s=ttft,
        tpot_s=tpot,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_token_ids=ids,
    )


def _lp_value(x: Any) -> float:
    return float(getattr(x, "logprob", x))


def _lp_rank(x: Any) -> float:
    r = getattr(x, "rank", None)
    return math.inf if r is None else float(r)


def prompt_logprobs_to_scored(token_ids: Sequence[int], prompt_logprobs: Sequence[Any],
                              top_k: int) -> ScoredSequence:
    """Convert vLLM prompt_logprobs to the "next token" convention of ScoredSequence.

    vLLM (vllm/logprobs.py create_prompt_logprobs / append_logprobs_for_next_position): entry p
    is None for p == 0, else a dict {token_id: Logprob(logprob, rank, decoded_token)} for the
    distribution at position p given tokens[:p]; it holds the actual token tokens[p] (inserted
    first, with its true vocab rank) plus the top-k tokens with ranks 1..k (one dict, so the
    actual token appears once). FlatLogprobs indexes the same way.

    Our position t (0..len-2) = vLLM entry t+1: target = logprob of tokens[t+1]; top ids sorted
    by rank (then logprob), truncated to top_k.
    """
    n = len(token_ids)
    if len(prompt_logprobs) != n:
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} entries for {n} tokens")
    target: list[float] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for t in range(n - 1):
        entry: Mapping[int, Any] | None = prompt_logprobs[t + 1]
        if entry is None:
            raise ValueError(f"prompt_logprobs entry {t + 1} is None")
        nxt = int(token_ids[t + 1])
        if nxt not in entry:
            raise ValueError(f"prompt_logprobs entry {t + 1} lacks the actual token {nxt}")
        target.append(_lp_value(entry[nxt]))
        ranked = sorted(entry.items(), key=lambda kv: (_lp_rank(kv[1]), -_lp_value(kv[1])))[:top_k]
        top_ids.append([int(k) for k, _ in ranked])
        top_lps.append([_lp_value(v) for _, v in ranked])
    return ScoredSequence(target_logprobs=target, top_ids=top_ids, top_logprobs=top_lps)


def adapter_rank(adapter_dir: str) -> int | None:
    """Largest LoRA rank declared in a PEFT adapter_config.json (r and rank_pattern)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    ranks = [int(cfg["r"])] if cfg.get("r") is not None else []
    ranks += [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks) if ranks else None


# --------------------------------------------------------------------------------------------
# log capture
# --------------------------------------------------------------------------------------------


class _FdCapture:
    """Send file descriptors 1 and 2 to an append-only log file while a block runs.

    vLLM 0.26 logs to *stdout* by default (envs.VLLM_LOGGING_STREAM = "ext://sys.stdout"), its
    engine core is a subprocess, and tqdm/torch/triton write to stderr; redirecting both fds at
    the OS level catches all of it. The engine core inherits the redirected fds when it starts
    (inside the first capture), so everything it ever prints goes to the file. After each block
    the new part of the file is copied ("tee") to the real stderr.
    """

    def __init__(self, path: str, tee: bool = True):
        self.path = path
        self._tee_enabled = tee
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
        self.start = os.path.getsize(path)  # parse only what this engine wrote
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


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


class VllmEngine:
    """One vllm.LLM with optional LoRA adapters; see the module docstring."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        settings: dict,
        enable_lora: bool,
        adapters: dict[str, str] | None = None,
        max_lora_rank: int = 16,
        max_loras: int = 1,
        quantization: str | None = None,
        w4a16_kernel: str | None = None,
        tuned_lora_config_dir: str | None = None,
        log_path: str | None = None,
    ):
        self.settings = dict(settings or {})
        self.enable_lora = bool(enable_lora)
        adapters = dict(adapters or {})
        if adapters and not self.enable_lora:
            raise ValueError("adapters were given but enable_lora is False")
        for name, path in adapters.items():
            if not Path(path).is_dir():
                raise FileNotFoundError(f"adapter {name!r}: no directory {path}")
            r = adapter_rank(path)
            if r is not None and r > int(max_lora_rank):
                raise ValueError(
                    f"adapter {name!r} has rank {r} > max_lora_rank={max_lora_rank}"
                )
        if tuned_lora_config_dir and not Path(tuned_lora_config_dir).is_dir():
            raise FileNotFoundError(f"tuned_lora_config_dir {tuned_lora_config_dir} does not exist")

        self.llm_kwargs = build_llm_kwargs(
            model_path, self.settings, enable_lora=self.enable_lora, max_loras=max_loras,
            max_lora_rank=max_lora_rank, quantization=quantization,
        )
        self.env = kernel_env(w4a16_kernel, tuned_lora_config_dir)
        self.w4a16_kernel = w4a16_kernel
        self.quantization = quantization
        self.timing_source = "request_metrics"

        own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-engine-", suffix=".log")
            os.close(fd)
        self.log_path = str(log_path)
        # a Snakemake job already sends fds 1/2 to this log: copying it back would double it
        self._cap = _FdCapture(self.log_path, tee=own_log)

        self._saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

        self._llm = None
        self.lora_requests: dict[str, Any] = {}
        try:
            with self._cap.capture():
                import vllm  # lazy: not installed on CPU machines
                from vllm.lora.request import LoRARequest

                self.vllm_version = getattr(vllm, "__version__", "unknown")
                self._llm = vllm.LLM(**self.llm_kwargs)
                self.lora_requests = {
                    name: LoRARequest(lora_name=name, lora_int_id=i, lora_path=str(path))
                    for i, (name, path) in enumerate(adapters.items(), start=1)
                }
                # Load adapters now (CPU cache + GPU slot), so a bad adapter fails here and the
                # first timed request does not pay for loading it.
                max_cpu = int(self.llm_kwargs.get("max_cpu_loras", max_loras)) if enable_lora else 0
                if self.settings.get("preload_adapters", True) and len(self.lora_requests) <= max_cpu:
                    for req in self.lora_requests.values():
                        self._llm.llm_engine.add_lora(req)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- helpers

    def _loras(self, adapters: Sequence[str | None], n: int) -> list | None:
        if len(adapters) != n:
            raise ValueError(f"{len(adapters)} adapter entries for {n} prompts")
        if all(a is None for a in adapters):
            return None
        if not self.enable_lora:
            raise ValueError("adapter requested from an engine built with enable_lora=False")
        unknown = sorted({a for a in adapters if a is not None and a not in self.lora_requests})
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; known: {sorted(self.lora_requests)}")
        return [None if a is None else self.lora_requests[a] for a in adapters]

    def _run(self, prompts: Sequence[Sequence[int]], sp, adapters: Sequence[str | None]):
        if self._llm is None:
            raise RuntimeError("engine is closed")
        loras = self._loras(adapters, len(prompts))
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        with self._cap.capture():
            t0 = time.perf_counter()
            outs = self._llm.generate(inputs, sp, lora_request=loras, use_tqdm=False)
            e2e = time.perf_counter() - t0
        return outs, e2e

    @staticmethod
    def _sampling(**kw):
        from vllm import SamplingParams

        return SamplingParams(**kw)

    # ---------------------------------------------------------------- API

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 adapters: list[str | None]) -> BatchTiming:
        """Fixed-length greedy generation of the whole batch in one LLM.generate call."""
        n = int(max_new_tokens)
        sp = self._sampling(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                            detokenize=False)
        outs, e2e = self._run(prompts, sp, adapters)
        if has_request_metrics(outs):
            self.timing_source = "request_metrics"
            return timing_from_outputs(outs, e2e)
        # No per-request timestamps: time the same batch's prefill (max_tokens=1) separately.
        self.timing_source = "prefill_rerun"
        sp1 = self._sampling(temperature=0.0, max_tokens=1, min_tokens=1, ignore_eos=True,
                             detokenize=False)
        _, prefill_s = self._run(prompts, sp1, adapters)
        return timing_from_outputs(outs, e2e, ttft_fallback_s=prefill_s)

    def score(self, sequences: list[list[int]], adapters: list[str | None],
              top_k: int = 20) -> list[ScoredSequence]:
        """Teacher-forced log-probs of each sequence (prompt_logprobs=top_k, max_tokens=1)."""
        cap = int(self.llm_kwargs.get("max_logprobs", DEFAULT_MAX_LOGPROBS))
        if cap != -1 and top_k > cap:
            raise ValueError(f"top_k={top_k} exceeds the engine's max_logprobs={cap}; "
                             f"set settings['max_logprobs'] >= {top_k}")
        sp = self._sampling(temperature=0.0, max_tokens=1, prompt_logprobs=int(top_k),
                            detokenize=False)
        outs, _ = self._run(sequences, sp, adapters)
        return [prompt_logprobs_to_scored(seq, o.prompt_logprobs, int(top_k))
                for seq, o in zip(sequences, outs)]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int,
               adapters: list[str | None], *, ignore_eos: bool = True) -> list[list[int]]:
        """Greedy token ids; exactly max_new_tokens each unless ignore_eos=False."""
        n = int(max_new_tokens)
        kw = dict(temperature=0.0, max_tokens=n, ignore_eos=ignore_eos, detokenize=False)
        if ignore_eos:
            kw["min_tokens"] = n
        outs, _ = self._run(prompts, self._sampling(**kw), adapters)
        return [list(o.outputs[0].token_ids) for o in outs]

    def profile_decode(self, prompts: list[list[int]], max_new_tokens: int,
                       adapters: list[str | None], out_dir: str, *, top: int = 25,
                       timeout_s: float = 300.0) -> dict:
        """Torch-profile one fixed-length greedy generate call; summarise its GPU kernels.

        Needs an engine built with settings["profile_dir"] (build_llm_kwargs then passes
        ``profiler_config={"profiler": "torch", "torch_profiler_dir": <abs dir>, ...}`` to
        vllm.LLM; vLLM 0.26 has no VLLM_TORCH_PROFILER_DIR env var any more). Call it on a
        warmed-up engine, after the timed measurements: once started, vLLM's worker keeps a
        (stopped) profiler object and adds a record_function per step.

        Flow (vLLM 0.26 sources, see the comment above profiler_config_from_settings):
        LLM.start_profile() -> Worker.profile(True) (TorchProfilerWrapper, CPU+CUDA) ->
        LLM.generate(same SamplingParams as generate()) -> LLM.stop_profile() -> Worker.profile
        (False): torch writes "<profile_dir>/dp0_pp0_tp0_dcp0_ep0_rank0.<ns>.pt.trace.json.gz"
        (and profiler_out_0.txt). The call is synchronous (engine-core utility call); we still
        wait up to timeout_s for the file to appear and stop growing.

        New trace files are moved into out_dir (left in place when out_dir is the profile dir);
        the rank-0 trace is summarised with int4lora.profiling.summarize_trace(steps=decode
        steps) and the result, plus the run's timing, is written to out_dir/profile_summary.json
        and returned. decode steps = max_new_tokens - 1 (the first token comes from the prefill
        step); "by_step_kind"["decode"] holds the decode-only kernel time per step, from vLLM's
        per-step annotations.
        """
        import shutil

        from int4lora.profiling import format_summary, summarize_trace

        if self._llm is None:
            raise RuntimeError("engine is closed")
        cfg = self.llm_kwargs.get("profiler_config")
        if not isinstance(cfg, Mapping) or cfg.get("profiler") != "torch" \
                or not cfg.get("torch_profiler_dir"):
            raise RuntimeError("profile_decode needs an engine built with settings['profile_dir'] "
                               "(vLLM's profiler_config is set at construction)")
        n = int(max_new_tokens)
        if n < 2:
            raise ValueError("max_new_tokens must be >= 2 to profile decode steps")
        trace_dir = Path(cfg["torch_profiler_dir"])
        out = Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)

        def traces() -> dict[Path, int]:
            if not trace_dir.is_dir():
                return {}
            return {p: p.stat().st_size for p in trace_dir.glob("*.pt.trace.json*")}

        before = set(traces())
        sp = self._sampling(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                            detokenize=False)
        with self._cap.capture():
            self._llm.start_profile()
        try:
            outs, e2e = self._run(prompts, sp, adapters)
        finally:
            with self._cap.capture():
                self._llm.stop_profile()

        # wait until new trace files exist and their sizes are stable
        deadline = time.monotonic() + float(timeout_s)
        new: dict[Path, int] = {}
        while True:
            now = {p: s for p, s in traces().items() if p not in before}
            if now and now == new and all(s > 0 for s in now.values()):
                break
            new = now
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not new:
            raise RuntimeError(f"no new *.pt.trace.json* in {trace_dir} after stop_profile "
                               f"(see {self.log_path})")

        moved: list[Path] = []
        for p in sorted(new):
            dst = out / p.name
            if p.resolve() != dst:  # out_dir may be the profile dir itself
                shutil.move(str(p), dst)
            moved.append(dst)
        for table in trace_dir.glob("profiler_out_*.txt"):
            if table.resolve().parent != out:
                shutil.copy2(table, out / table.name)
        rank0 = [p for p in moved if re.search(r"(^|_)rank0\.", p.name)]
        trace = (rank0 or moved)[0]

        summary = summarize_trace(str(trace), top=top, steps=n - 1)
        timing = timing_from_outputs(outs, e2e) if has_request_metrics(outs) else None
        summary.update({
            "decode_steps": n - 1,
            "max_new_tokens": n,
            "batch_size": len(prompts),
            "adapters": list(adapters),
            "e2e_s": e2e,
            "tpot_s_median": (float(sorted(timing.tpot_s)[len(timing.tpot_s) // 2])
                              if timing and timing.tpot_s else None),
            "ttft_s_median": (float(sorted(timing.ttft_s)[len(timing.ttft_s) // 2])
                              if timing and timing.ttft_s else None),
            "trace_files": [str(p) for p in moved],
            "profiler_config": dict(cfg),
        })
        (out / "profile_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (out / "profile_summary.txt").write_text(format_summary(summary, top=top) + "\n")
        return summary

    def engine_log(self) -> dict:
        return parse_engine_log(self._cap.text())

    def weight_storage(self) -> dict | None:
        """Storage by module family, read from the checkpoint vLLM serves; None for in-flight
        bitsandbytes, whose 4-bit form exists only inside the engine."""
        if self.quantization == "bitsandbytes":
            return None
        from int4lora.coverage import checkpoint_storage
        return checkpoint_storage(self.llm_kwargs["model"])

    def info(self) -> dict:
        return {
            "engine": self.name,
            "vllm_version": getattr(self, "vllm_version", None),
            "llm_kwargs": {k: v for k, v in self.llm_kwargs.items()},
            "env": dict(self.env),
            "w4a16_kernel_requested": self.w4a16_kernel or "auto",
            "quantization": self.quantization or "checkpoint",
            "adapters": {k: {"id": r.lora_int_id, "path": r.lora_path}
                         for k, r in getattr(self, "lora_requests", {}).items()},
            "timing_source": self.timing_source,
            "log_path": self.log_path,
            "engine_log": self.engine_log(),
        }

    def memory(self) -> dict:
        log = self.engine_log()
        out: dict[str, Any] = {
            "engine_model_weights_gib": log["model_weights_gib"],
            "engine_kv_cache_gib": log["kv_cache_gib"],
            "engine_kv_cache_tokens": log["kv_cache_tokens"],
            "engine_cuda_graph_gib": log["cuda_graph_gib"],
        }
        out.update(nvml_memory())
        return out

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                with self._cap.capture():
                    with contextlib.suppress(Exception):
                        llm.llm_engine.engine_core.shutdown()
                    del llm
                    gc.collect()
            except Exception:
                pass
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            with contextlib.suppress(Exception):
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
        for k, v in getattr(self, "_saved_env", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
