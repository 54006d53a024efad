"""Rule peer_check: our harness against the tool vLLM users already trust.

Runs `vllm bench latency` (vLLM's own CLI, from the same environment) on the checkpoint the
baseline bench served, with the same engine arguments (CUDA-graph sizes, kernel, memory share),
the same prompt and output lengths, at the peer batch sizes, and sets its median end-to-end
latency beside the harness's median e2e of the same configuration (the bench_baseline result).
`within` says whether they agree within `tolerance`; a miss is data, not a crash.

vLLM's tool times LLM.generate from the client, like our harness; it samples (temperature 1.0,
top-p 1) where we decode greedily, and detokenizes unless --disable-detokenize (passed, as we
never detokenize).
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from statistics import median

from int4lora.config import engine_config
from int4lora.engines.vllm.args import build_llm_kwargs, kernel_env
from int4lora.resultio import ExpectedFailure, new_result, recorded_failures, write_result
from int4lora.upstream import require_ok

TOLERANCE = 0.05
# vllm/benchmarks/latency.py draws its dummy prompts with np.random.randint(10000)
BENCH_TOKEN_IDS = 10000
# build_llm_kwargs keys that are ours (LLM() only) or need no CLI flag
NOT_CLI = {"model", "disable_log_stats", "max_logprobs"}


def cli_flags(kwargs: dict) -> list[str]:
    """EngineArgs keyword arguments as `vllm bench latency` flags (dicts as JSON)."""
    flags = []
    for key, value in kwargs.items():
        if key in NOT_CLI or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def vllm_bench_latency(kwargs: dict, env: dict, batch: int, input_len: int, output_len: int,
                       iters: int, warmup: int, log_path: str | None) -> dict:
    """One `vllm bench latency` run; its JSON (latencies in seconds) and the command line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "latency.json")
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "latency",
               "--model", kwargs["model"], "--input-len", str(input_len),
               "--output-len", str(output_len), "--batch-size", str(batch),
               "--num-iters", str(iters), "--num-iters-warmup", str(warmup),
               "--disable-detokenize", "--output-json", out, *cli_flags(kwargs)]
        log = open(log_path, "a") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=900)
        finally:
            if log_path:
                log.close()
        if proc.returncode != 0:
            raise RuntimeError(f"vllm bench latency exited {proc.returncode} (batch {batch}); "
                               f"see {log_path}: {shlex.join(cmd)}")
        with open(out) as fh:
            return {"result": json.load(fh), "command": shlex.join(cmd)}


def harness_e2e(bench_result: dict, batch: int) -> dict | None:
    """The harness's e2e statistics of the base requests at this batch size."""
    for run in bench_result["metrics"]["runs"]:
        if run["variant"] == "base" and run["batch"] == batch and run.get("status") == "ok":
            return run["e2e_s"]
    return None


def compare(ours: dict, theirs: list[float], tolerance: float) -> dict:
    vllm_ms = median(theirs) * 1e3
    ours_ms = ours["median"] * 1e3
    ratio = ours_ms / vllm_ms
    return {"harness_e2e_ms": ours_ms, "harness_n": ours["n"], "vllm_bench_e2e_ms": vllm_ms,
            "vllm_bench_n": len(theirs), "ratio": ratio,
            "within": abs(ratio - 1) <= tolerance, "tolerance": tolerance}


def main(model: str, engine: str, plan: dict, quant_json: str, bench_json: str,
         bench_cfg: dict, device: str, output: str, batches: list[int] | None = None,
         iters: int = 20, warmup: int = 5, log_path: str | None = None,
         config: dict | None = None) -> dict:
    started = time.time()
    cfg = engine_config(plan["engine_cfg"])
    batches = [b for b in (batches or [1, 8]) if b in plan["batch_sizes"]]
    result = new_result("peer_check", model, engine, "none",
                        params={"plan": plan, "batches": batches, "iters": iters,
                                "warmup": warmup, "tolerance": TOLERANCE})
    with recorded_failures(result):
        if cfg.backend != "vllm" or not device.startswith("cuda"):
            raise ExpectedFailure("unsupported", "the peer check runs vLLM's own benchmark "
                                  f"tool: a vllm engine on a CUDA GPU ({engine}, {device})")
        up = require_ok(quantize=quant_json, bench=bench_json)
        vocab = up["bench"]["metrics"]["architecture"].get("vocab_size", 0)
        if vocab < BENCH_TOKEN_IDS:
            raise ExpectedFailure("unsupported", f"vllm bench latency prompts use token ids below "
                                  f"{BENCH_TOKEN_IDS}; {model} has vocab_size={vocab}")
        kwargs = build_llm_kwargs(up["quantize"]["metrics"]["path"], cfg.settings, lora=None,
                                  quantization="bitsandbytes"
                                  if cfg.quantization == "bitsandbytes" else None,
                                  capture_sizes=plan["capture_sizes"])
        env = kernel_env(cfg.w4a16_kernel, None)
        rows = []
        for batch in batches:
            ours = harness_e2e(up["bench"], batch)
            run = vllm_bench_latency(kwargs, env, batch, bench_cfg["prompt_tokens"],
                                     bench_cfg["output_tokens"], iters, warmup, log_path)
            rows.append({"batch": batch, "input_len": bench_cfg["prompt_tokens"],
                         "output_len": bench_cfg["output_tokens"], "command": run["command"],
                         **(compare(ours, run["result"]["latencies"], TOLERANCE) if ours else
                            {"reason": "no harness e2e at this batch"})})
        result["metrics"] = {"rows": rows, "engine_args": kwargs, "env": env}
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
