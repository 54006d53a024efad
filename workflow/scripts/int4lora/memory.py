"""Memory figures: process peak (CPU), torch CUDA peaks, NVML, and KV-cache arithmetic."""
from __future__ import annotations

import os
import resource


def process_memory(device: str = "cpu") -> dict:
    import psutil
    info = {"rss_bytes": psutil.Process().memory_info().rss,
            # ru_maxrss is in KiB on Linux: the peak of this process over its life
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        import torch
        info.update(torch_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                    torch_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                    torch_allocated_bytes=torch.cuda.memory_allocated())
        info.update(nvml_memory())
    return info


def _nvml_handle(pynvml):
    """NVML counts physical GPUs; CUDA_VISIBLE_DEVICES (set by SLURM) says which one is ours."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(visible)
    return pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)


def nvml_memory() -> dict:
    """Device-wide used memory and that of this process and its children (vLLM's engine core
    runs in a child) from NVML; {} where NVML is absent."""
    try:
        import psutil
        import pynvml
        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        pids = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
        return {"nvml_device_used_bytes": mem.used, "nvml_device_total_bytes": mem.total,
                "nvml_process_used_bytes": sum((p.usedGpuMemory or 0) for p in procs
                                               if p.pid in pids),
                "nvml_all_processes_used_bytes": sum((p.usedGpuMemory or 0) for p in procs)}
    except Exception:  # no NVML, no GPU: the torch and engine figures still stand
        return {}


def kv_element_bytes(cfg) -> int:
    """Bytes per KV-cache element an engine stores: HF keeps K/V in its compute dtype; vLLM in the
    model dtype (bf16) unless settings.kv_cache_dtype asks for fp8."""
    if cfg.backend == "hf":
        return {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.compute_dtype]
    kv_dtype = str(cfg.settings.get("kv_cache_dtype") or "auto")
    return 1 if kv_dtype.startswith("fp8") else 2


def kv_cache_bytes(arch: dict, batch: int, tokens: int, bytes_per_element: int = 2) -> int:
    """K and V for every layer, KV head and token of a batch."""
    heads = arch.get("num_key_value_heads") or arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    return 2 * arch["num_hidden_layers"] * heads * head_dim * tokens * batch * bytes_per_element


def attribute(peak: int | None, runtime: int, weights: int, adapter: int, kv: int) -> dict:
    """Split a measured peak into named components; the rest is activations/workspace."""
    parts = {"runtime_before_load": runtime, "weights": weights, "adapter": adapter,
             "kv_cache": kv}
    if peak is not None:
        parts["activations_and_other"] = max(peak - sum(parts.values()), 0)
    return parts
