"""Engine backends behind one interface (engines.base.Engine): make_engine builds the one a typed
engine config names, with the job's LoRA plan; each engine class also builds its own fp32
reference for validation (`reference`)."""
from __future__ import annotations

from ..config import EngineConfig, engine_config


def engine_class(cfg: EngineConfig):
    if cfg.backend == "hf":
        from .hf_engine import HfEngine
        return HfEngine
    if cfg.backend == "vllm":
        from .vllm import VllmEngine
        return VllmEngine
    raise ValueError(f"unknown engine backend {cfg.backend!r} (hf, vllm)")


def make_engine(cfg: EngineConfig | dict, model_path: str, *, device: str,
                adapters: dict[str, str] | None = None, lora: dict | None = None,
                log_path: str | None = None, profile_dir: str | None = None,
                tuned_config_dir: str | None = None, capture_sizes: list[int] | None = None,
                in_process: bool = False):
    """lora: the job's LoRA plan (int4lora.config.lora_plan; None: an engine without LoRA
    support); adapters: name -> adapter directory."""
    cfg = engine_config(cfg)
    if cfg.backend == "vllm":
        if not device.startswith("cuda"):
            from ..resultio import ExpectedFailure
            raise ExpectedFailure("unsupported", "the vllm engine needs a CUDA GPU "
                                  f"(this run's device is {device!r})")
        from .vllm import VllmEngine
        return VllmEngine(model_path, cfg, adapters=adapters, lora=lora,
                          tuned_config_dir=tuned_config_dir, log_path=log_path,
                          profile_dir=profile_dir, capture_sizes=capture_sizes,
                          in_process=in_process)
    from .hf_engine import HfEngine
    return HfEngine.from_config(cfg, model_path, device=device, adapters=adapters)
