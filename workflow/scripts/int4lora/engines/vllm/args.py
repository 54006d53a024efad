"""vLLM engine arguments and environment (pure; vLLM 0.26 facts cited where they come from)."""
from __future__ import annotations

import os
from typing import Any

from int4lora.lora_layout import VLLM_MAX_LORA_RANKS as ALLOWED_MAX_LORA_RANKS
from int4lora.lora_layout import vllm_lora_engine_args
from int4lora.config import VLLM_OWN_SETTINGS as OWN_SETTINGS

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

def lora_engine_args(lora: dict | None, model_type: str, restrict: bool = True) -> dict:
    """enable_lora / max_loras / max_lora_rank / max_cpu_loras / lora_target_modules from the
    job's LoRA plan (int4lora.config.lora_plan: rank, targets, slots = distinct adapters one
    batch carries, adapters = how many the engine loads); int4lora.lora_layout holds the facts.
    restrict=False leaves vLLM's default of wrapping every LoRA-capable linear."""
    if not lora:
        return {}
    spec = {k: lora.get(k) for k in ("rank", "target_modules", "target_parameters")}
    args = vllm_lora_engine_args([spec] * max(1, int(lora.get("adapters") or 1)), model_type,
                                 slots=int(lora.get("slots") or 1))
    if not restrict:
        args.pop("lora_target_modules")
    return args


def build_llm_kwargs(model_path: str, settings: dict, *, lora: dict | None,
                     quantization: str | None, profile_dir: str | None = None,
                     restrict_lora: bool = True, capture_sizes: list[int] | None = None,
                     model_type: str = "llama") -> dict:
    """Keyword arguments for ``vllm.LLM(**kwargs)``: settings are EngineArgs fields (validated
    against vLLM's EngineArgs at config time and again at engine start), then the pipeline's own.

    - ``enforce_eager`` defaults to False (CUDA graphs + torch.compile: the engine's real speed).
    - ``disable_log_stats=False``: LLM() defaults it to True, and then RequestOutput.metrics is
      None (vllm/v1/engine/output_processor.py builds RequestStateStats only when log_stats).
      We need those per-request timestamps for TTFT/TPOT.
    - ``enable_prefix_caching`` defaults to False so that repeated benchmark prompts are really
      prefilled each time (settings may turn it on); vllm bench latency does the same.
    - ``max_logprobs`` = max(20, settings["max_logprobs"]) so score(top_k) is not capped.
    - quantization None -> not passed (vLLM reads the checkpoint's quantization_config, i.e.
      compressed-tensors); "bitsandbytes" -> in-flight NF4 of a bf16 checkpoint (vLLM sets
      load_format="bitsandbytes" itself, vllm/engine/arg_utils.py).
    - ``profiler_config`` only with a profile_dir (opt-in torch profiler).
    - ``compilation_config``: settings' own, else CUDA graphs captured for ``capture_sizes``
      (the job's batch and prefill sizes, int4lora.config.capture_sizes), else vLLM's default.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization={quantization!r} is not supported by the vllm engine "
            f"(allowed: None, 'compressed-tensors', 'bitsandbytes')"
        )
    kwargs: dict[str, Any] = {k: v for k, v in (settings or {}).items()
                              if k not in OWN_SETTINGS and v is not None}
    kwargs["model"] = str(model_path)
    kwargs.setdefault("enforce_eager", False)
    kwargs.setdefault("enable_prefix_caching", False)
    if capture_sizes and "compilation_config" not in kwargs:
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": list(capture_sizes)}
    kwargs["disable_log_stats"] = False
    kwargs["max_logprobs"] = max(DEFAULT_MAX_LOGPROBS, int(kwargs.get("max_logprobs") or 0))
    if quantization is not None:
        kwargs["quantization"] = quantization
    kwargs.update(lora_engine_args(lora, model_type, restrict_lora))
    prof = profiler_config(profile_dir)
    if prof is not None:
        kwargs["profiler_config"] = prof
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


def profiler_config(profile_dir: str | None) -> dict | None:
    """``profiler_config`` for ``vllm.LLM`` (torch traces into profile_dir), or None: profiling
    off, the default. The worker creates its profiler lazily, on the first start_profile, so the
    engine behaves as before until VllmEngine.profile_decode is called."""
    if not profile_dir:
        return None
    cfg: dict[str, Any] = dict(PROFILE_SETTINGS_DEFAULTS)
    cfg["profiler"] = "torch"
    cfg["torch_profiler_dir"] = os.path.abspath(os.path.expanduser(str(profile_dir)))
    return cfg


def tuned_lora_config_filenames(gpu_name: str) -> list[str]:
    """File names vLLM looks for in VLLM_TUNED_CONFIG_FOLDER for a GPU (torch.cuda.get_device_name())."""
    g = gpu_name.replace(" ", "_").replace("-", "_")
    ops = ["SHRINK", "EXPAND_TRUE", "EXPAND_FALSE", "FUSED_MOE_LORA_W13_SHRINK",
           "FUSED_MOE_LORA_W13_EXPAND", "FUSED_MOE_LORA_W2_SHRINK", "FUSED_MOE_LORA_W2_EXPAND"]
    return [f"{g}_{op}.json" for op in ops]
