"""Rule measure_bandwidth: the memory bandwidth ceiling for the roofline, once per device.

CUDA: device-to-device copies timed with events. CPU: large tensor copies (what a CPU
decode step streams from DRAM). Bytes count read + write.
"""

import time

from int4lora.resultio import new_result, write_result
from int4lora.stats import summarize


def copy_bandwidth(device: str, size_bytes: int, repeats: int) -> list[float]:
    import torch
    n = size_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    rates = []
    for i in range(repeats + 2):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 2:  # the first two are warm-up
            rates.append(2 * n * 4 / seconds)
    return rates


def main(device: str, output: str, size_mib: int = 256, repeats: int = 20,
         config: dict | None = None) -> dict:
    started = time.time()
    result = new_result("bandwidth", None, params={"device": device, "size_mib": size_mib,
                                                   "repeats": repeats})
    rates = copy_bandwidth(device, size_mib * 2**20, repeats)
    stats = summarize(rates)
    result["metrics"] = {"bandwidth_bytes_s": stats["median"], "bandwidth": stats,
                         "method": "tensor copy, bytes read + written"}
    result["samples"] = [{"bandwidth_bytes_s": r} for r in rates]
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
