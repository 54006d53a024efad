"""Rule tune_lora_kernels: tuned Punica (Triton LoRA) kernel configs for vLLM 0.26.

Times vLLM's own lora_shrink / lora_expand ops (vllm.lora.ops.triton_ops) at every key the
engine will look up (int4lora.lora_tuning.enumerate_workloads), for vLLM's default config and
each grid point, with one adapter (slot 0) on every token as in the bench's adapter
requests. A candidate whose output differs from the default's is rejected; the fastest
left is confirmed against the default in interleaved replays and written into vLLM's JSON
files in out_dir (point VLLM_TUNED_CONFIG_FOLDER there). Keys the time budget did not reach
get vLLM's default written explicitly, so that vLLM's nearest-key lookup never hands them a
config tuned for another shape.

Timing: the op is called once per weight copy inside one CUDA graph (decode runs in CUDA
graphs, so launch overhead is not the kernel's), and the copies together exceed twice the L2
cache, so that LoRA weights come from HBM as they do between a decode step's base GEMMs.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from int4lora import lora_tuning as lt
from int4lora.resultio import ExpectedFailure, new_result, recorded_failures, write_result

COPIES_MIN, COPIES_MAX = 8, 256
REPLAYS = 5
CONFIRM_ROUNDS = 7
ENV_VAR = "VLLM_TUNED_CONFIG_FOLDER"
DTYPES = ("bfloat16", "float16")


def cuda_missing_reason(device: str) -> str | None:
    """Why tuning cannot run here, or None."""
    if not str(device).startswith("cuda"):
        return (f"LoRA kernel tuning times vLLM's Triton kernels on a CUDA GPU; "
                f"device is {device!r}")
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return ("no CUDA GPU: torch.cuda.is_available() is False (vLLM's Triton LoRA "
                "kernels need one)")
    return None


def vllm_lora_ops() -> SimpleNamespace:
    """vLLM's LoRA ops and helpers; unsupported when vLLM cannot be imported."""
    try:
        from vllm.lora.ops.triton_ops import (LoRAKernelMeta, lora_expand, lora_expand_op,
                                              lora_shrink, lora_shrink_op, utils)
        from vllm.lora.utils import get_captured_lora_counts
    except ImportError as exc:
        raise ExpectedFailure("unsupported", f"vLLM's LoRA Triton ops cannot be imported: {exc}")
    if utils.is_batch_invariant:
        raise ExpectedFailure("unsupported", "VLLM_BATCH_INVARIANT is set: vLLM ignores tuned "
                              "LoRA configs (lora/ops/triton_ops/utils.py:168)")
    return SimpleNamespace(meta=LoRAKernelMeta, shrink=lora_shrink, expand=lora_expand,
                           modules={"shrink": lora_shrink_op, "expand": lora_expand_op},
                           utils=utils, captured_counts=get_captured_lora_counts)


def _clear_vllm_caches(ops) -> None:
    ops.utils.load_lora_op_config.cache_clear()
    ops.utils.get_lora_op_configs.cache_clear()
    # pointer tables keyed on data_ptr() only (utils.py:31-36, 84-86): freed weights of one
    # key must not be found again at a reused address with other strides
    ops.utils._LORA_A_PTR_DICT.clear()
    ops.utils._LORA_B_PTR_DICT.clear()


@contextmanager
def untuned_vllm(ops):
    """vLLM's own defaults while we work: no tuned folder, its lru caches emptied."""
    saved = os.environ.pop(ENV_VAR, None)
    _clear_vllm_caches(ops)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ENV_VAR] = saved
        _clear_vllm_caches(ops)


@contextmanager
def forced_config(ops, op: str, config: dict | None, seen: list):
    """Make vLLM's op use `config` (None: vLLM's default) and record every lookup it makes.
    The ops resolve get_lora_op_configs from their module at call time."""
    module = ops.modules[op]
    real = module.get_lora_op_configs

    def lookup(op_type, max_loras, batch, hidden_size, rank, num_slices, add_inputs=None,
               moe_intermediate_size=None):
        args = dict(op_type=op_type, max_loras=max_loras, batch=batch, hidden_size=hidden_size,
                    rank=rank, num_slices=num_slices, add_inputs=add_inputs,
                    moe_intermediate_size=moe_intermediate_size)
        got = dict(config) if config is not None else real(**args)
        seen.append((lt.key_from_lookup(**args), got))
        return got

    module.get_lora_op_configs = lookup
    try:
        yield
    finally:
        module.get_lora_op_configs = real


def _copies(bytes_per_call: int, l2_bytes: int) -> int:
    return max(COPIES_MIN, min(COPIES_MAX, math.ceil(2 * l2_bytes / max(1, bytes_per_call))))


class KernelBench:
    """vLLM's shrink or expand op at one key's shapes, metadata built as punica_gpu.py does
    (LoRAKernelMeta.make / prepare_tensors / meta_args), slot 0 active on every token."""

    def __init__(self, ops, wl: lt.Workload, engine_max_loras: int, dtype, specialize: bool,
                 device: str):
        import torch
        self.ops, self.wl, self.key, self.torch = ops, wl, wl.key, torch
        m, rank = wl.key.m, wl.key.n if wl.key.op == "shrink" else wl.key.k
        meta = ops.meta.make(engine_max_loras, m, device=device,
                             captured_lora_counts=ops.captured_counts(engine_max_loras, specialize))
        meta.prepare_tensors(torch.zeros(m, dtype=torch.long, device=device))
        self.meta_args = meta.meta_args(m, specialize)
        gen = torch.Generator(device=device).manual_seed(0)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        elt = torch.finfo(dtype).bits // 8

        def rnd(*shape, dt=dtype, std=1.0):
            return (torch.randn(*shape, generator=gen, device=device) * std).to(dt)

        sizes = wl.slice_sizes
        if self.key.op == "shrink":
            k = self.key.k
            self.copies = _copies(len(sizes) * rank * k * elt, l2)
            self.x = rnd(m, k)
            self.weights = [tuple(rnd(engine_max_loras, 1, rank, k, std=k ** -0.5)
                                  for _ in sizes) for _ in range(self.copies)]
            self.out = rnd(len(sizes), m, rank, dt=torch.float32)  # the op zeroes it
        else:
            self.copies = _copies(sum(sizes) * rank * elt, l2)
            self.buf = rnd(len(sizes), m, rank, dt=torch.float32)
            self.weights = [tuple(rnd(engine_max_loras, 1, s, rank, std=rank ** -0.5)
                                  for s in sizes) for _ in range(self.copies)]
            self.y0 = rnd(m, sum(sizes))
            self.out = self.y0.clone()

    def call(self, i: int) -> None:
        if self.key.op == "shrink":
            self.ops.shrink(self.x, list(self.weights[i]), self.out, *self.meta_args, 1.0)
        else:
            self.ops.expand(self.buf, list(self.weights[i]), self.out, *self.meta_args,
                            offset_start=0, add_inputs=bool(self.key.add_inputs))

    def output_once(self):
        """The op's output for copy 0 from a fresh output buffer."""
        if self.key.op == "expand":
            self.out.copy_(self.y0)
        self.call(0)
        self.torch.cuda.synchronize()
        return self.out.clone()

    def reference(self):
        """The same computation in torch (float64 sums), for checking vLLM's default."""
        if self.key.op == "shrink":
            return lt.reference_shrink(self.x, self.weights[0], 1.0)
        y0 = self.y0 if self.key.add_inputs else self.torch.zeros_like(self.y0)
        return lt.reference_expand(y0, self.buf, self.weights[0])

    def capture(self):
        """A CUDA graph calling the op once per weight copy (warmed up outside the graph)."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(self.copies):
                self.call(i)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(self.copies):
                self.call(i)
        return graph

    def replay_us(self, graph, replays: int = REPLAYS) -> list[float]:
        """Microseconds per op call, one value per graph replay."""
        torch = self.torch
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / self.copies)
        return times


def _check_lookup(seen: list, key: lt.KernelKey) -> None:
    """The op must have asked for exactly the key our enumeration predicted."""
    asked = {k for k, _ in seen}
    if asked != {key}:
        raise RuntimeError(f"vLLM looked up {sorted(k.label() for k in asked)}, "
                           f"the enumeration predicted {key.label()}")


def _measure_fn(ops, bench: KernelBench, reference, graphs: dict):
    """measure(config) for lt.tune_key: output check against the default's, then timing."""
    torch = bench.torch

    def measure(cfg: dict) -> dict:
        seen: list = []
        try:
            with forced_config(ops, bench.key.op, cfg, seen):
                out = bench.output_once()
                agrees, err = lt.outputs_agree(out, reference, bench.key.op)
                graph = bench.capture() if agrees else None
        except Exception as exc:  # Triton OutOfResources / compile errors: skip the point
            return _failed(torch, exc)
        _check_lookup(seen, bench.key)
        if not agrees:
            return {"us": None, "agrees": False, "rel_err": err, "error": None}
        graphs[json.dumps(cfg, sort_keys=True)] = graph
        return {"us": statistics.median(bench.replay_us(graph)), "agrees": True,
                "rel_err": err, "error": None}

    return measure


def _failed(torch, exc: Exception) -> dict:
    torch.cuda.synchronize()  # a broken CUDA context raises here and ends the run
    return {"us": None, "agrees": False, "rel_err": None,
            "error": f"{type(exc).__name__}: {exc}"[:300]}


def _confirm(bench: KernelBench, graphs: dict, default: dict, best: dict) -> tuple:
    """Interleaved replays of the default and the best graph: (default_us, best_us)."""
    g_def = graphs[json.dumps(default["config"], sort_keys=True)]
    g_best = graphs[json.dumps(best["config"], sort_keys=True)]
    d, b = [], []
    for _ in range(CONFIRM_ROUNDS):
        d += bench.replay_us(g_def, 1)
        b += bench.replay_us(g_best, 1)
    return statistics.median(d), statistics.median(b)


def tune_workload(ops, wl: lt.Workload, engine_max_loras: int, dtype, specialize: bool,
                  device: str, deadline) -> tuple[dict, dict, list]:
    """(chosen config, summary row, samples) for one key."""
    bench = KernelBench(ops, wl, engine_max_loras, dtype, specialize, device)
    seen: list = []
    with forced_config(ops, wl.key.op, None, seen):
        default_out = bench.output_once()
    _check_lookup(seen, wl.key)
    default_cfg = seen[0][1]
    ok, err = lt.outputs_agree(default_out, bench.reference(), wl.key.op)
    if not ok:
        raise RuntimeError(f"{wl.key.label()}: vLLM's default config disagrees with the torch "
                           f"reference (relative error {err:.3g}): the harness is wrong")
    graphs: dict = {}
    outcome = lt.tune_key(lt.candidate_configs(default_cfg, wl.key),
                          _measure_fn(ops, bench, default_out, graphs), deadline)
    default, best = outcome["default"], outcome["best"]
    chosen, status = default_cfg, "default_kept"
    default_us = tuned_us = default["us"]
    if best is not default:
        default_us, tuned_us = _confirm(bench, graphs, default, best)
        if tuned_us < default_us:
            chosen, status = best["config"], "tuned"
        else:
            tuned_us = default_us
    if not outcome["complete"]:
        status += "_partial"
    row = lt.summary_row(wl, outcome, chosen, status, default_us, tuned_us)
    row["copies"] = bench.copies
    samples = [{"label": wl.key.label(), "config": t["config"], "us": t.get("us"),
                "agrees": t.get("agrees"), "rel_err": t.get("rel_err"), "error": t.get("error")}
               for t in outcome["tried"]]
    return chosen, row, samples


def _default_only(ops, wl: lt.Workload) -> tuple[dict, dict]:
    """vLLM's default for a key the budget did not reach (its own function, no kernel run)."""
    cfg = ops.utils.get_lora_op_configs(**lt.lookup_args(wl.key))
    return dict(cfg), lt.summary_row(wl, None, dict(cfg), "skipped_budget", None, None)


def tune(workloads: list, out_dir: str, engine_max_loras: int, dtype_name: str,
         specialize: bool, device: str, time_budget_s: float) -> tuple[dict, list]:
    """Tune every workload within the budget; write vLLM's files. (metrics, samples)"""
    import torch
    ops = vllm_lora_ops()
    if torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    gpu = torch.cuda.get_device_name()
    dtype = getattr(torch, dtype_name)
    t0 = time.monotonic()
    deadline = lambda: time.monotonic() - t0 > time_budget_s  # noqa: E731
    entries, rows, samples = [], [], []
    with untuned_vllm(ops):
        for wl in workloads:
            if deadline():
                cfg, row = _default_only(ops, wl)
            else:
                cfg, row, got = tune_workload(ops, wl, engine_max_loras, dtype, specialize,
                                              device, deadline)
                samples += got
                _clear_vllm_caches(ops)
                torch.cuda.empty_cache()
            entries.append((wl.key, cfg))
            rows.append(row)
            print(lt.format_summary([row]).splitlines()[-1], flush=True)
    files = lt.write_config_files(out_dir, gpu, entries)
    metrics = {"gpu": gpu, "files": files, "config_folder": str(Path(out_dir).resolve()),
               "env_var": ENV_VAR, "keys": rows, "elapsed_s": time.monotonic() - t0,
               "time_budget_s": time_budget_s,
               "status_counts": {s: sum(r["status"] == s for r in rows)
                                 for s in sorted({r["status"] for r in rows})},
               "timing": "CUDA-graph replay of one op call per weight copy (copies exceed 2x "
                         "L2), median of replays; default vs tuned from interleaved replays"}
    return metrics, samples


def main(arch: dict, wrapped_modules: list[str], max_rank: int, max_loras: int,
         batch_sizes: list[int], out_dir: str, output: str, time_budget_s: float = 90,
         device: str = "cuda", config: dict | None = None, *,
         prefill_tokens: list[int] | None = None, add_inputs: tuple = (True,),
         dtype: str = "bfloat16", specialize_active_lora: bool = False,
         max_capture: int = lt.DEFAULT_MAX_CAPTURE, model: str | None = None,
         engine: str = "vllm", adapter: str | None = None) -> dict:
    """Tune vLLM's LoRA shrink/expand configs for one model shape; write vLLM's JSON files
    into out_dir and a result JSON (kind "tuning") to output, named for the job's model,
    engine and adapter (the report sets the gain beside that engine's LoRA cost)."""
    started = time.time()
    workloads = lt.enumerate_workloads(arch, wrapped_modules, max_rank, max_loras, batch_sizes,
                                       prefill_tokens, add_inputs, max_capture)
    if not (isinstance(time_budget_s, (int, float)) and time_budget_s > 0):
        raise ValueError(f"time_budget_s must be > 0, got {time_budget_s!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    params = {"wrapped_modules": list(wrapped_modules), "max_rank": max_rank,
              "max_loras": max_loras, "batch_sizes": list(batch_sizes),
              "prefill_tokens": list(prefill_tokens or []),
              "add_inputs": [bool(a) for a in add_inputs], "dtype": dtype,
              "specialize_active_lora": bool(specialize_active_lora), "max_capture": max_capture,
              "time_budget_s": time_budget_s, "device": device, "out_dir": str(out_dir),
              "architecture": arch, "keys": [w.key.label() for w in workloads],
              "not_tuned_modules": [m for m in wrapped_modules if m in lt.FUSED_MOE_MODULES]}
    result = new_result("tuning", model, engine=engine, adapter=adapter, params=params)
    with recorded_failures(result):
        reason = cuda_missing_reason(device)
        if reason:
            raise ExpectedFailure("unsupported", reason)
        if not workloads:
            raise ExpectedFailure("unsupported", f"nothing to tune: {list(wrapped_modules)} run "
                                  "through vLLM's fused MoE LoRA ops, not shrink/expand")
        result["metrics"], result["samples"] = tune(workloads, out_dir, max_loras, dtype,
                                                    specialize_active_lora, device,
                                                    time_budget_s)
    return write_result(output, result, config, started)


def load_arch(path: str) -> dict:
    """An architecture dict from a fetch result JSON, a HF config.json or a plain dict."""
    obj = json.loads(Path(path).read_text())
    if isinstance(obj.get("metrics"), dict) and "architecture" in obj["metrics"]:
        return obj["metrics"]["architecture"]
    if "hidden_size" in obj:
        return obj
    raise ValueError(f"{path}: neither a fetch result (metrics.architecture) nor a config "
                     f"with hidden_size")


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def cli(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch-json", required=True, help="fetch result, HF config.json or dict")
    p.add_argument("--out-dir", required=True, help="folder for vLLM's JSON files")
    p.add_argument("--output", help="result JSON (default: OUT_DIR/tuning-result.json)")
    p.add_argument("--architecture", default="mistral", help="for the default module list")
    p.add_argument("--modules", nargs="+", help="wrapped modules (default: vLLM's default)")
    p.add_argument("--max-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prefill-tokens", type=int, nargs="*", default=[])
    p.add_argument("--add-inputs", type=_bool, nargs="+", default=[True])
    p.add_argument("--time-budget-s", type=float, default=90)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--specialize-active-lora", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model")
    a = p.parse_args(argv)
    arch = load_arch(a.arch_json)
    modules = a.modules or lt.vllm_default_wrapped_modules(a.architecture, arch)
    res = main(arch, modules, a.max_rank, a.max_loras, a.batch_sizes, a.out_dir,
               a.output or str(Path(a.out_dir) / "tuning-result.json"), a.time_budget_s,
               a.device, prefill_tokens=a.prefill_tokens, add_inputs=tuple(a.add_inputs),
               dtype=a.dtype, specialize_active_lora=a.specialize_active_lora, model=a.model)
    print(f"status: {res['status']}" + (f" ({res['reason']})" if res["reason"] else ""))
    if res["status"] == "ok":
        print(lt.format_summary(res["metrics"]["keys"]))
        print(f"export {ENV_VAR}={res['metrics']['config_folder']}")
    return res


def tune_for_job(model: str, plan: dict, model_json: str, cache_dir: str, output: str,
                 bench_cfg: dict, device: str, time_budget_s: float = 90,
                 config: dict | None = None) -> dict:
    """The rule's entry: tune for what the job plan's engine serves (the modules it wraps, its
    rank, slots, batch and prefill sizes) into <cache_dir>/lora-configs/<model>-<key>."""
    from int4lora.cache import cache_key
    from int4lora.lora_layout import smallest_vllm_rank, vllm_target_modules
    from int4lora.resultio import read_result
    arch = read_result(model_json)["metrics"]["architecture"]
    adapter = plan["adapter"]
    if plan["engine_cfg"].get("lora_modules", "adapter") == "adapter":
        modules = sorted(vllm_target_modules(adapter, arch["model_type"]))
    else:
        modules = lt.vllm_default_wrapped_modules(arch["model_type"], arch)
    batches = plan["batch_sizes"]
    prefill = [b * bench_cfg["prompt_tokens"] for b in batches]
    rank, slots = smallest_vllm_rank(adapter["rank"]), max(1, plan["slots"])
    out_dir = Path(cache_dir) / "lora-configs" / \
        f"{model}-{cache_key(arch, modules, rank, slots, batches, prefill)}"
    return main(arch, modules, rank, slots, batches, str(out_dir), output, time_budget_s,
                device, config, prefill_tokens=prefill, model=model, engine=plan["engine"],
                adapter=adapter["name"])


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, tune_for_job)  # noqa: F821 (injected by Snakemake)
elif __name__ == "__main__":
    sys.exit(0 if cli()["status"] == "ok" else 1)
