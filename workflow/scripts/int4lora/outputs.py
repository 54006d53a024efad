"""One registry of the pipeline's report outputs: table names, figure names and captions.

Read by workflow/rules/report.smk, aggregate.py, plots.py and report.py, so that a table or figure
is named (and described) in one place only.
"""

# tidy CSV tables written by aggregate.py (results/tables/<name>.csv)
TABLES = ("bench", "overhead", "memory", "validation", "coverage", "quality", "decode_profile",
          "status", "noise_floor", "peer_check", "sources", "tuning", "job_times")

TABLE_CAPTIONS = {
    "bench": "One row per model, engine, adapter, request variant and batch: TTFT, TPOT, "
             "end-to-end latency, output and prefill tokens/s (median, percentiles, n), bytes "
             "one decode step reads and the roofline fraction.",
    "overhead": "Paired ratios (adapter requests over base requests on the same LoRA-enabled "
                "engine, interleaved in one process) per batch.",
    "memory": "Memory per configuration: weights, adapter and LoRA buffers, KV cache needed, "
              "the engine's reserved KV pool and the process baseline.",
    "validation": "Every correctness check: value, limit, the engine's own noise floor, "
                  "verdict and reason.",
    "coverage": "Weight bytes and elements per module family, and the share stored in 4 bit.",
    "quality": "Top-1 agreement with the fp32 reference, adapter-effect error, perplexity.",
    "decode_profile": "Batch-1 decode step: kernel time per class and the host gap.",
    "status": "Every result file with its status (ok / oom / unsupported / error / missing), "
              "reason and environment.",
    "noise_floor": "The spread an engine shows on identical inputs (the floor checks are "
                   "judged against), per scope: base requests, adapter requests, and `multi`: "
                   "one adapter in every LoRA slot of one batch (the floor of the mixed-batch "
                   "check).",
    "peer_check": "Our end-to-end latency against `vllm bench latency` on the same checkpoint.",
    "sources": "The source reports' published figures beside ours.",
    "job_times": "One row per job that ran (Snakemake's benchmark files): wall seconds and peak "
                 "RSS; engine jobs add engine start, vLLM's engine init and compile seconds, "
                 "and the job's start and end from its result.",
    "tuning": "Tuned Punica (Triton) LoRA kernel configs: per kernel key, vLLM's default config "
              "against the fastest correct one found on this GPU (µs per call).",
}

# figures written by plots.py (results/figures/<name>.png), in the order the report shows them
FIGURES = ("decode_throughput", "lora_overhead", "memory_breakdown", "ttft", "weight_coverage",
           "decode_time")
STORY_FIGURES = ("decode_throughput", "lora_overhead", "memory_breakdown")  # under the summary

FIGURE_CAPTIONS = {
    "decode_throughput": "Decode speed (output tokens/s of the batch = batch / TPOT median) vs "
                         "batch size, one panel per model and engine: solid lines serve base "
                         "requests on the engine without LoRA, the other line styles serve an "
                         "adapter (one style per adapter); hollow markers did not pass their "
                         "checks. Bars: 95% CI of the median where the run recorded it.",
    "lora_overhead": "LoRA overhead: decode time per token (TPOT) of adapter requests over base "
                     "requests on the same LoRA-enabled engine, interleaved in one process, in "
                     "% per batch size. Bands: 95% bootstrap CI of the median ratio where the "
                     "run recorded it; dotted lines with hollow markers failed their checks.",
    "memory_breakdown": "Memory the workload needs: 4-bit weights (with scales), adapter + "
                        "LoRA slot buffers and the KV cache the largest batch needs; the process "
                        "baseline (interpreter, libraries, CUDA context) is drawn apart. The "
                        "KV pool an engine reserves up front is shown in its own panel, not as "
                        "workload memory.",
    "ttft": "Time to first token (prefill) vs batch size, median; bars to the p90 where n >= 10.",
    "weight_coverage": "Share of weight elements stored in 4 bit, by module family.",
    "decode_time": "Batch-1 decode step: GPU kernel time per class (profiled call), then the "
                   "host gap up to the unprofiled TPOT.",
}

# memory-table columns the report reads (bytes); aggregate's older columns stand in where absent
MEMORY_COLUMNS = {
    "weights": "mem_weights_bytes",
    "adapter_lora": "mem_adapter_lora_bytes",
    "kv_needed": "mem_kv_needed_bytes",
    "kv_pool_reserved": "mem_kv_pool_reserved_bytes",
    "process_baseline": "mem_process_baseline_bytes",
}
