"""Engine backends behind one interface (generate / greedy / score / info / memory / close)."""
from __future__ import annotations


def make_engine(backend: str, model_path: str, engine_cfg: dict, *, device: str,
                adapters: dict[str, str] | None, enable_lora: bool, max_lora_rank: int = 16,
                max_loras: int = 1, log_path: str | None = None, quantization: str | None = None,
                profile_dir: str | None = None):
    """quantization overrides the engine's (validation builds fp32/unquantized references);
    profile_dir enables vLLM's torch profiler (used only by profile_decode)."""
    quant = quantization or engine_cfg.get("quantization")
    if backend == "hf":
        from .hf_engine import HfEngine
        return HfEngine(model_path, quantization=quant, device=device,
                        compute_dtype=engine_cfg.get("compute_dtype", "bfloat16"),
                        adapters=adapters if enable_lora else None,
                        mode=engine_cfg.get("mode", "generate"),
                        quantize_experts=engine_cfg.get("quantize_experts", True))
    if backend == "vllm":
        if not device.startswith("cuda"):
            from ..resultio import ExpectedFailure
            raise ExpectedFailure("unsupported", "the vllm engine needs a CUDA GPU "
                                  f"(this run's device is {device!r})")
        from .vllm_engine import ALLOWED_MAX_LORA_RANKS, VllmEngine
        fitting = [r for r in ALLOWED_MAX_LORA_RANKS if r >= max_lora_rank]
        if not fitting:
            from ..resultio import ExpectedFailure
            raise ExpectedFailure("unsupported", f"LoRA rank {max_lora_rank} is above vLLM's "
                                  f"limit {max(ALLOWED_MAX_LORA_RANKS)}")
        max_lora_rank = fitting[0]
        settings = dict(engine_cfg.get("settings", {}))
        if profile_dir:
            settings["profile_dir"] = profile_dir
        return VllmEngine(model_path, settings=settings,
                          enable_lora=enable_lora, adapters=adapters,
                          max_lora_rank=max_lora_rank, max_loras=max_loras,
                          quantization="bitsandbytes" if quant == "bitsandbytes" else None,
                          w4a16_kernel=engine_cfg.get("w4a16_kernel"),
                          tuned_lora_config_dir=engine_cfg.get("tuned_lora_configs"),
                          log_path=log_path)
    raise ValueError(f"unknown engine backend {backend!r} (hf, vllm)")
