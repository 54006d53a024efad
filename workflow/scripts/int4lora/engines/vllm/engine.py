"""vLLM backend: compressed-tensors W4A16 (or in-flight bitsandbytes NF4) + vLLM LoRA (Punica).

Written against the vLLM 0.26.0 source (docs/notes/vllm-engine.md gives the file paths behind each
fact). vLLM is imported lazily, so this module imports on a machine without vLLM. Scripts that
create a VllmEngine must guard their entry point with ``if __name__ == "__main__":`` (vLLM starts
its engine core in a subprocess).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from int4lora.compilewatch import CompileWatch
from int4lora.config import VllmEngineConfig
from int4lora.logcapture import FdCapture
from int4lora.memory import nvml_memory

from .args import DEFAULT_MAX_LOGPROBS, build_llm_kwargs, kernel_env
from .logparse import parse_engine_log
from .outputs import has_request_metrics, prompt_logprobs_to_scored, timing_from_outputs


def checkpoint_model_type(model_path: str) -> str:
    return json.loads((Path(model_path) / "config.json").read_text())["model_type"]


def check_engine_args(kwargs: dict) -> None:
    """Every keyword is a field of the installed vLLM's EngineArgs (config validation checked a
    recorded list; this is the real one)."""
    from vllm.engine.arg_utils import EngineArgs
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(k for k in kwargs if k not in fields)
    if unknown:
        raise ValueError(f"not EngineArgs fields of the installed vLLM: {', '.join(unknown)}")


class VllmEngine:
    """One vllm.LLM with optional LoRA adapters; see the module docstring.

    lora: the job's LoRA plan (args.lora_engine_args; None: an engine without LoRA support);
    adapters: name -> PEFT adapter directory, each loaded at construction; in_process: run
    vLLM's engine core in this process (timed jobs keep vLLM's default, a separate process)."""

    name = "vllm"

    def __init__(self, model_path: str, cfg: VllmEngineConfig, *, adapters: dict | None = None,
                 lora: dict | None = None, tuned_config_dir: str | None = None,
                 log_path: str | None = None, profile_dir: str | None = None,
                 capture_sizes: list[int] | None = None, in_process: bool = False):
        self.cfg = cfg
        adapters = dict(adapters or {})
        if adapters and not lora:
            raise ValueError("adapters were given to an engine without a LoRA plan")
        for name, path in adapters.items():
            if not Path(path).is_dir():
                raise FileNotFoundError(f"adapter {name!r}: no directory {path}")
        self.quantization = "bitsandbytes" if cfg.quantization == "bitsandbytes" else None
        self.llm_kwargs = build_llm_kwargs(model_path, cfg.settings, lora=lora,
                                           quantization=self.quantization,
                                           profile_dir=profile_dir,
                                           restrict_lora=cfg.lora_modules == "adapter",
                                           capture_sizes=capture_sizes,
                                           model_type=checkpoint_model_type(model_path))
        from int4lora.applied import REPORT_ENGINE_ENV
        # adapter_report ships a function to the engine core (see int4lora.applied)
        self.env = {**kernel_env(cfg.w4a16_kernel, tuned_config_dir), **REPORT_ENGINE_ENV}
        if in_process:
            # the engine core in this process: no second interpreter to start (tens of seconds
            # on a GPU node); used where nothing is timed (validation)
            self.env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.timing_source = "request_metrics"
        own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-engine-", suffix=".log")
            os.close(fd)
        self.log_path = str(log_path)
        # a Snakemake job already sends fds 1/2 to this log: copying it back would double it
        self._cap = FdCapture(self.log_path, tee=own_log)
        self._watch = CompileWatch()
        self._saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self._llm = None
        self.lora_requests: dict[str, Any] = {}
        try:
            self._start(adapters)
        except BaseException:
            self.close()
            raise

    def _start(self, adapters: dict) -> None:
        with self._cap.capture():
            import vllm  # lazy: not installed on CPU machines
            from vllm.lora.request import LoRARequest

            if not getattr(vllm, "_is_fake", False):
                check_engine_args(self.llm_kwargs)
            self.vllm_version = getattr(vllm, "__version__", "unknown")
            self._llm = vllm.LLM(**self.llm_kwargs)
            self.lora_requests = {
                name: LoRARequest(lora_name=name, lora_int_id=i, lora_path=str(path))
                for i, (name, path) in enumerate(adapters.items(), start=1)}
            # Load adapters now (CPU cache + GPU slot), so a bad adapter fails here and the
            # first timed request does not pay for loading it.
            if self.cfg.settings.get("preload_adapters", True):
                for req in self.lora_requests.values():
                    self._llm.llm_engine.add_lora(req)

    # ---------------------------------------------------------------- helpers

    def _loras(self, adapters: Sequence[str | None], n: int) -> list | None:
        if len(adapters) != n:
            raise ValueError(f"{len(adapters)} adapter entries for {n} prompts")
        if all(a is None for a in adapters):
            return None
        if not self.llm_kwargs.get("enable_lora"):
            raise ValueError("adapter requested from an engine built without LoRA support")
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

    def _fixed_length(self, n: int):
        return self._sampling(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                              detokenize=False)

    # ---------------------------------------------------------------- API

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 adapters: list[str | None]):
        """Fixed-length greedy generation of the whole batch in one LLM.generate call."""
        outs, e2e = self._run(prompts, self._fixed_length(int(max_new_tokens)), adapters)
        if has_request_metrics(outs):
            self.timing_source = "request_metrics"
            return timing_from_outputs(outs, e2e)
        # No per-request timestamps: time the same batch's prefill (max_tokens=1) separately.
        self.timing_source = "prefill_rerun"
        _, prefill_s = self._run(prompts, self._fixed_length(1), adapters)
        return timing_from_outputs(outs, e2e, ttft_fallback_s=prefill_s)

    def score(self, sequences: list[list[int]], adapters: list[str | None],
              top_k: int = 20):
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
               adapters: list[str | None]) -> list[list[int]]:
        outs, _ = self._run(prompts, self._fixed_length(int(max_new_tokens)), adapters)
        return [list(o.outputs[0].token_ids) for o in outs]

    def compile_events(self) -> int:
        return self._watch.count()

    def adapter_report(self) -> dict:
        """Which tensors of each loaded adapter reached a LoRA-wrapped module of the engine."""
        if self._llm is None or not self.lora_requests:
            return {}
        from int4lora.applied import vllm_adapter_report
        ids = {r.lora_int_id: name for name, r in self.lora_requests.items()}
        with self._cap.capture():
            return vllm_adapter_report(self._llm, ids)

    def profile_decode(self, prompts: list[list[int]], max_new_tokens: int,
                       adapters: list[str | None], out_dir: str, *, top: int = 25,
                       timeout_s: float = 300.0) -> dict:
        """Torch-profile one fixed-length greedy generate call through vLLM's own profiler
        (LLM.start_profile / stop_profile; needs an engine built with a profile_dir) and
        summarise its GPU kernels (int4lora.profiling.decode_profile_summary). vLLM's worker
        writes <profile_dir>/<rank name>.<ns>.pt.trace.json.gz when it stops; the trace is
        moved into out_dir. Call it after the timed measurements."""
        from int4lora.profiling import decode_profile_summary

        cfg = self.llm_kwargs.get("profiler_config")
        if self._llm is None or not isinstance(cfg, Mapping):
            raise RuntimeError("profile_decode needs a live engine built with a profile_dir")
        n = int(max_new_tokens)
        if n < 2:
            raise ValueError("max_new_tokens must be >= 2 to profile decode steps")
        trace_dir, out = Path(cfg["torch_profiler_dir"]), Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        before = set(_traces(trace_dir))
        with self._cap.capture():
            self._llm.start_profile()
        try:
            outs, e2e = self._run(prompts, self._fixed_length(n), adapters)
        finally:
            with self._cap.capture():
                self._llm.stop_profile()
        trace = _collect_trace(trace_dir, before, out, timeout_s, self.log_path)
        timing = timing_from_outputs(outs, e2e) if has_request_metrics(outs) else None
        summary = decode_profile_summary(trace, new_tokens=n, timing=timing,
                                         adapters=list(adapters), top=top, e2e_s=e2e,
                                         trace_files=[str(trace)], profiler_config=dict(cfg))
        (out / "profile_summary.json").write_text(json.dumps(summary, indent=1, default=str))
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

    def lora_wrapped_modules(self) -> list[str]:
        """The module suffixes this engine wraps with LoRA slots ([] without LoRA)."""
        if not self.llm_kwargs.get("enable_lora"):
            return []
        if self.llm_kwargs.get("lora_target_modules"):
            return list(self.llm_kwargs["lora_target_modules"])
        from int4lora.lora_tuning import vllm_default_wrapped_modules
        config = json.loads((Path(self.llm_kwargs["model"]) / "config.json").read_text())
        return vllm_default_wrapped_modules(config["model_type"], config)

    def info(self) -> dict:
        return {
            "engine": self.name, "vllm_version": getattr(self, "vllm_version", None),
            "setting": self.cfg.label(), "llm_kwargs": dict(self.llm_kwargs),
            "env": dict(self.env), "w4a16_kernel_requested": self.cfg.w4a16_kernel,
            "quantization": self.quantization or "checkpoint",
            "adapters": {k: {"id": r.lora_int_id, "path": r.lora_path}
                         for k, r in self.lora_requests.items()},
            "timing_source": self.timing_source, "log_path": self.log_path,
            "lora_wrapped_modules": self.lora_wrapped_modules(),
            "engine_log": self.engine_log(),
        }

    def memory(self) -> dict:
        log = self.engine_log()
        out: dict[str, Any] = {
            "engine_model_weights_gib": log["model_weights_gib"],
            "engine_model_load_s": log["model_load_s"],
            "engine_kv_cache_gib": log["kv_cache_gib"],
            "engine_kv_cache_tokens": log["kv_cache_tokens"],
            "engine_cuda_graph_gib": log["cuda_graph_gib"],
        }
        out.update(nvml_memory())
        return out

    @staticmethod
    def reference(model_path: str, quant_path: str, adapters: dict, device: str,
                  quantization: str = "w4a16"):
        """fp32 HF model holding the dequantized W4A16 weights this engine serves, PEFT on top;
        in-flight bitsandbytes: the HF engine's NF4 reference, since vLLM quantizes the bf16
        weights at load as NF4 with double quant, blocksize 64, as the HF engine does."""
        from int4lora.engines.hf_engine import HfEngine
        from int4lora.reference import dequantized_compressed_model
        if quantization == "bitsandbytes":
            return HfEngine.reference(model_path, quant_path, adapters, device)
        base = dequantized_compressed_model(quant_path, model_path, device)
        return HfEngine(model_path, quantization="none", compute_dtype="float32", device=device,
                        adapters=adapters, model=base)

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            with contextlib.suppress(Exception), self._cap.capture():
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None:
            with contextlib.suppress(Exception):
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
        for k, v in self._saved_env.items():
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


def _traces(trace_dir: Path) -> dict[Path, int]:
    if not trace_dir.is_dir():
        return {}
    return {p: p.stat().st_size for p in trace_dir.glob("*.pt.trace.json*")}


def _collect_trace(trace_dir: Path, before: set, out: Path, timeout_s: float,
                   log_path: str) -> Path:
    """Wait until the new trace files exist and stop growing, move them into out, return the
    rank-0 trace."""
    deadline = time.monotonic() + float(timeout_s)
    new: dict[Path, int] = {}
    while True:
        now = {p: s for p, s in _traces(trace_dir).items() if p not in before}
        if now and now == new and all(s > 0 for s in now.values()):
            break
        new = now
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not new:
        raise RuntimeError(f"no new *.pt.trace.json* in {trace_dir} after stop_profile "
                           f"(see {log_path})")
    moved = []
    for p in sorted(new):
        dst = out / p.name
        if p.resolve() != dst:
            shutil.move(str(p), dst)
        moved.append(dst)
    rank0 = [p for p in moved if re.search(r"(^|_)rank0\.", p.name)]
    return (rank0 or moved)[0]
