"""HF engine: transformers + bitsandbytes NF4 (quantized at load) + PEFT LoRA.

Runs on the CPU (tests, demo) and on CUDA. Two decode modes: plain `generate` and
`static-compile` (static KV cache; transformers compiles the decode step on CUDA).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from ..synth4bit import pack_quantized_config
from .base import BatchTiming, ScoredSequence

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class _TokenClock:
    """A generate() streamer that timestamps every decode step (first put() is the prompt)."""

    def __init__(self):
        self.prompt_seen = False
        self.stamps: list[float] = []

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def resolve_dtype(name: str):
    import torch
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(model_path: str, *, quantization: str, compute_dtype: str, device: str,
               quantize_experts: bool = True, adapters: dict[str, str] | None = None):
    """quantization: 'nf4' (bitsandbytes at load, experts too where the model has them) or
    'none' (plain weights in compute_dtype, the reference). With adapters, returns a PeftModel
    (NF4 needs them attached before the fused experts are quantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(compute_dtype)
    if quantization in ("nf4", "none") and pack_quantized_config(model_path) is not None:
        model = _load_compressed(model_path, quantization, dtype, device, quantize_experts,
                                 adapters)
    elif quantization == "nf4":
        from ..nf4_experts import load_nf4_model
        model = load_nf4_model(model_path, compute_dtype=dtype, device_map=device,
                               quantize_experts=quantize_experts, adapters=adapters)
    elif quantization == "none":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device)
        if adapters:
            model = attach_adapters(model, adapters)
    else:
        raise ValueError(f"hf engine: unknown quantization {quantization!r} (nf4, none)")
    model.eval()
    torch.set_grad_enabled(False)
    return model


def _load_compressed(model_path, quantization: str, dtype, device: str, quantize_experts: bool,
                     adapters: dict[str, str] | None):
    """A compressed-tensors W4A16 checkpoint (synthetic-w4a16): NF4 made layer by layer from its
    int4 weights, or ('none') its dequantized weights, which are this model's original."""
    if quantization == "nf4":
        from ..nf4_experts import load_nf4_from_compressed
        return load_nf4_from_compressed(model_path, dtype, device,
                                        quantize_experts=quantize_experts, adapters=adapters)
    from ..reference import dequantized_compressed_model
    model = dequantized_compressed_model(model_path, None, device, dtype=dtype)
    return attach_adapters(model, adapters) if adapters else model


def attach_adapters(model, adapters: dict[str, str]):
    from peft import PeftModel
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model


class HfEngine:
    name = "hf"

    @classmethod
    def from_config(cls, cfg, model_path: str, *, device: str, adapters: dict | None = None):
        """The engine a typed HfEngineConfig describes (static-compile: see check_compilable)."""
        engine = cls(model_path, quantization=cfg.quantization, compute_dtype=cfg.compute_dtype,
                     device=device, adapters=adapters, mode=cfg.mode,
                     quantize_experts=cfg.quantize_experts)
        engine.setting = cfg.label()
        return engine

    def __init__(self, model_path: str, *, quantization: str = "nf4",
                 compute_dtype: str = "bfloat16", device: str = "cpu",
                 adapters: dict[str, str] | None = None, mode: str = "generate",
                 quantize_experts: bool = True, model=None):
        if mode not in ("generate", "static-compile"):
            raise ValueError(f"hf engine: unknown mode {mode!r} (generate, static-compile)")
        if mode == "static-compile" and quantization == "nf4":
            check_compilable(nf4_quantizer())  # before loading weights: minutes on a big model
        self.settings = {"model_path": str(model_path), "quantization": quantization,
                         "compute_dtype": compute_dtype, "device": device, "mode": mode,
                         "quantize_experts": quantize_experts}
        self.device = device
        self.mode = mode
        load_start = time.perf_counter()
        self.adapter_names = list(adapters or {})
        if model is not None:
            self.model = attach_adapters(model, adapters) if adapters else model
        else:
            self.model = load_model(model_path, quantization=quantization,
                                    compute_dtype=compute_dtype, device=device,
                                    quantize_experts=quantize_experts, adapters=adapters)
        self.model.eval()
        self.load_s = time.perf_counter() - load_start
        self.pad_id = self._pad_id()
        self.setting = None
        self.adapter_dirs = dict(adapters or {})
        # PEFT 0.21 serves mixed-adapter batches except through ParamWrapper (fused experts)
        self.mixed_batches = not any(type(m).__name__ == "ParamWrapper"
                                     for m in self.model.modules())
        from ..compilewatch import CompileWatch
        self._watch = CompileWatch(extra=_dynamo_graphs)

    def lm(self):
        """The transformers model under any PEFT wrapper."""
        return self.model.get_base_model() if self.adapter_names else self.model

    def _pad_id(self) -> int:
        cfg = self.model.config
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            val = getattr(cfg, attr, None)
            if isinstance(val, list):
                val = val[0] if val else None
            if val is not None:
                return int(val)
        return 0

    def _sync(self):
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()

    def _adapter_context(self, adapters: list[str | None]):
        """Uniform batches switch the active adapter; mixed batches use PEFT adapter_names."""
        from contextlib import nullcontext
        kinds = set(adapters)
        if not self.adapter_names:
            if kinds != {None}:
                raise ValueError("this engine was built without LoRA support but a request "
                                 f"asked for adapters {sorted(k for k in kinds if k)}")
            return nullcontext(), {}
        if kinds == {None}:
            return self.model.disable_adapter(), {}
        if len(kinds) == 1:
            self.model.set_adapter(adapters[0])
            return nullcontext(), {}
        return nullcontext(), {"adapter_names": [a or BASE for a in adapters]}

    def _inputs(self, prompts: list[list[int]]):
        import torch
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("prompts of one batch must have equal length (fixed workload)")
        ids = torch.tensor(prompts, device=self.device)
        return ids, torch.ones_like(ids)

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 adapters: list[str | None]) -> BatchTiming:
        if len(set(adapters)) > 1 and not self.mixed_batches:
            from ..resultio import ExpectedFailure
            raise ExpectedFailure("unsupported", "PEFT 0.21 serves no batch that mixes "
                                  "adapters on fused expert parameters (ParamWrapper)")
        ids, mask = self._inputs(prompts)
        clock = _TokenClock()
        context, extra = self._adapter_context(adapters)
        gen_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=self.pad_id, streamer=clock)
        if self.mode == "static-compile":
            gen_kwargs["cache_implementation"] = "static"
        with context:
            self._sync()
            start = time.perf_counter()
            out = self.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs, **extra)
            self._sync()
            end = time.perf_counter()
        new = out[:, ids.shape[1]:]
        stamps = clock.stamps
        ttft = stamps[0] - start if stamps else end - start
        tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
        n = len(prompts)
        return BatchTiming(e2e_s=end - start, ttft_s=[ttft] * n, tpot_s=[tpot] * n,
                           prompt_tokens=int(ids.numel()), output_tokens=int(new.numel()),
                           output_token_ids=new.tolist(), ttft_engine_s=[ttft] * n)

    def profile_decode(self, prompts: list[list[int]], max_new_tokens: int,
                       adapters: list[str | None], out_dir: str, *, top: int = 25) -> dict:
        """Torch-profile one fixed-length generate call; summarise its GPU kernels with
        int4lora.profiling.decode_profile_summary (the trace is summarised, then deleted).

        Every forward call of the causal LM runs under a record_function named like vLLM's
        per-step annotation (``execute_context_<n>(<tokens>)_generation_0(0)`` for the prompt,
        ``execute_context_0(0)_generation_<n>(<n>)`` for a decode step), so kernels are
        attributed to decode steps the same way for both engines.
        """
        import torch
        from torch.profiler import ProfilerActivity, profile

        from ..profiling import decode_profile_summary

        n = int(max_new_tokens)
        if n < 2:
            raise ValueError("max_new_tokens must be >= 2 to profile decode steps")
        activities = [ProfilerActivity.CPU]
        if self.device.startswith("cuda"):
            activities.append(ProfilerActivity.CUDA)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        trace = out / "hf_decode.pt.trace.json"
        with _step_annotations(self.lm(), len(prompts)):
            with profile(activities=activities) as prof:
                timing = self.generate(prompts, n, adapters)
            prof.export_chrome_trace(str(trace))
        summary = decode_profile_summary(trace, new_tokens=n, timing=timing,
                                         adapters=list(adapters), top=top,
                                         torch=torch.__version__)
        trace.unlink()
        return summary

    def greedy(self, prompts, max_new_tokens, adapters) -> list[list[int]]:
        return self.generate(prompts, max_new_tokens, adapters).output_token_ids

    def logits(self, sequences: list[list[int]], adapters: list[str | None]):
        """Full next-token log-probabilities in fp32, shape [batch, len-1, vocab]. PEFT serves no
        mixed batch through adapters on fused expert parameters (ParamWrapper): such a batch is
        scored one adapter group at a time, rows back in their places."""
        import torch
        if len(set(adapters)) > 1 and not self.mixed_batches:
            return self._grouped_logits(sequences, adapters)
        ids, mask = self._inputs(sequences)
        context, extra = self._adapter_context(adapters)
        with context:
            logits = self.model(input_ids=ids, attention_mask=mask, **extra).logits
        return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()

    def _grouped_logits(self, sequences, adapters):
        import torch
        rows = {}
        for name in dict.fromkeys(adapters):
            idx = [i for i, a in enumerate(adapters) if a == name]
            got = self.logits([sequences[i] for i in idx], [name] * len(idx))
            rows.update(zip(idx, got))
        return torch.stack([rows[i] for i in range(len(sequences))])

    def score(self, sequences, adapters, top_k: int = 20) -> list[ScoredSequence]:
        import torch
        logprobs = self.logits(sequences, adapters)
        targets = torch.tensor(sequences)[:, 1:]
        target_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        top = logprobs.topk(top_k, dim=-1)
        return [ScoredSequence(target_lp[i].tolist(), top.indices[i].tolist(),
                               top.values[i].tolist()) for i in range(len(sequences))]

    def weight_storage(self) -> dict:
        from ..coverage import from_loaded_model
        from ..nf4_experts import weight_storage_report
        return from_loaded_model(weight_storage_report(self.lm()))

    def compile_events(self) -> int:
        return self._watch.count()

    def adapter_report(self) -> dict:
        """Which tensors of each adapter file reached the PEFT model (the rest matched nothing)."""
        from safetensors import safe_open

        from ..applied import peft_unapplied_tensors
        report = {}
        for name, path in self.adapter_dirs.items():
            unmatched = peft_unapplied_tensors(self.model, name, path)
            with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as fh:
                names = sorted(fh.keys())
            report[name] = {"applied": [n for n in names if n not in unmatched],
                            "unmatched": unmatched}
        return report

    def info(self) -> dict:
        import transformers
        return {"backend": "hf", **self.settings, "setting": self.setting, "load_s": self.load_s,
                "transformers": transformers.__version__, "adapters": self.adapter_names}

    @staticmethod
    def reference(model_path: str, quant_path: str, adapters: dict, device: str,
                  quantize_experts: bool = True):
        """fp32 model holding this engine's own NF4 weights, dequantized, with PEFT on top."""
        from ..reference import dequantize_bnb_model
        quantized = load_model(model_path, quantization="nf4", compute_dtype="float32",
                               device=device, quantize_experts=quantize_experts)
        return HfEngine(model_path, quantization="none", compute_dtype="float32", device=device,
                        adapters=adapters, model=dequantize_bnb_model(quantized))

    def memory(self) -> dict:
        from ..memory import process_memory
        return process_memory(self.device)

    def close(self):
        import gc
        del self.model
        gc.collect()
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.empty_cache()


def _dynamo_graphs() -> int:
    """Graphs torch.compile has built in this process (0 when dynamo was never imported)."""
    import sys
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    return int(counters["stats"]["unique_graphs"]) if counters is not None else 0


def nf4_quantizer():
    """The quantizer transformers builds for our NF4 config (no model needed)."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer
    return AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True,
                                                          bnb_4bit_quant_type="nf4"))


def check_compilable(quantizer) -> None:
    """static-compile relies on transformers compiling the decode step inside generate; it does
    that only where the model's quantizer says it can be compiled. Refuse instead of timing an
    eager run under a compiled label."""
    from ..resultio import ExpectedFailure
    if quantizer is not None and not quantizer.is_compileable:
        raise ExpectedFailure(
            "unsupported", f"static-compile: transformers does not compile models quantized by "
            f"{type(quantizer).__name__} (is_compileable is False), so generate would run "
            "eager with a static cache; not timed under a compiled label")


@contextmanager
def _step_annotations(lm, batch: int):
    """record_function ranges around every forward call, named like vLLM's step annotations."""
    from torch.profiler import record_function

    open_ranges = []

    def before(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows, cols = (tuple(ids.shape) if ids is not None else (batch, 1))
        name = (f"execute_context_{rows}({rows * cols})_generation_0(0)" if cols > 1
                else f"execute_context_0(0)_generation_{rows}({rows})")
        rf = record_function(name)
        rf.__enter__()
        open_ranges.append(rf)

    def after(_module, _args, _kwargs, _output):
        open_ranges.pop().__exit__(None, None, None)

    hooks = [lm.register_forward_pre_hook(before, with_kwargs=True),
             lm.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
