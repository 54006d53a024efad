"""The vLLM backend, by concern: engine arguments (args), log parsing (logparse), request outputs
to timings and log-probs (outputs) and the engine itself (engine). Everything but the engine is pure
and importable without vLLM."""
from .args import (ALLOWED_MAX_LORA_RANKS, CUDA_MP_LINEAR_KERNELS, W4A16_KERNELS, build_llm_kwargs,
                   kernel_env, lora_engine_args, profiler_config,
                   tuned_lora_config_filenames)
from .engine import VllmEngine
from .logparse import parse_engine_log
from .outputs import has_request_metrics, prompt_logprobs_to_scored, timing_from_outputs

__all__ = ["ALLOWED_MAX_LORA_RANKS", "CUDA_MP_LINEAR_KERNELS", "W4A16_KERNELS", "VllmEngine",
           "build_llm_kwargs", "has_request_metrics", "kernel_env", "lora_engine_args",
           "parse_engine_log", "profiler_config",
           "prompt_logprobs_to_scored", "timing_from_outputs", "tuned_lora_config_filenames"]
