"""Summarise a torch-profiler (Kineto) Chrome/Perfetto trace into "where the GPU time went".

Pure Python (json + gzip); no torch or vLLM needed, so it runs on any machine and is unit-tested
on synthetic traces (tests/test_profiling.py).

Trace format (torch.profiler ``export_chrome_trace`` / ``tensorboard_trace_handler``, which is
what vLLM 0.26's worker profiler writes: ``<dir>/<worker_name>.<time_ns>.pt.trace.json[.gz]``):
``{"traceEvents": [...], ...}`` (a bare list is accepted too). Kineto's activity category names
(``libkineto`` ActivityType, present verbatim in ``libtorch_cpu.so``) are used as ``"cat"``:

- ``kernel``      one CUDA kernel execution on the GPU (``ph: "X"``, ``ts``/``dur`` in µs,
                  ``args.correlation`` = id of the CPU API call that launched it; kernels replayed
                  from a CUDA graph carry the id of the ``cudaGraphLaunch`` call)
- ``gpu_memcpy``, ``gpu_memset``   GPU copies / memsets (own categories here)
- ``cuda_runtime``, ``cuda_driver`` CPU-side launch API calls (``args.correlation``)
- ``user_annotation``  ``torch.profiler.record_function`` ranges on the CPU (vLLM's per-step
                  annotation ``execute_context_C(T)_generation_G(T)``; see below)
- ``gpu_user_annotation``  the GPU-side projection of a user annotation (not counted: it
                  overlaps the kernels it spans)
- ``cpu_op``, ``python_function``, ``ac2g`` (flow arrows), ``overhead``, ... ignored.

Step attribution (optional, used when present): vLLM 0.26 ``v1/worker/gpu_worker.py``
``Worker.annotate_profile`` wraps every ``model_runner.execute_model`` call in
``record_function("execute_context_<nctx>(<ctx tokens>)_generation_<ngen>(<gen tokens>)")``
(or, with ``profiler_config.detailed_trace_annotation``,
``execute_<n>_context_<nctx>(sq<t>sk..)_generation_<ngen>(sq<t>sk..)``). A kernel is attributed
to a step when the runtime call that launched it (same ``correlation``) lies inside that
annotation on the same thread; a step with no context requests is a *decode* step. Kernels
launched outside ``execute_model`` (e.g. sampling under async scheduling) stay unattributed.
"""
from __future__ import annotations

import bisect
import gzip
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")

# Order matters: the first class whose regex matches (case-insensitive search) wins.
# Note: Marlin MoE expert GEMMs (e.g. "marlin_moe_wna16::Marlin<...>") land in w4a16_gemm (they
# are 4-bit weight GEMMs); "moe" then holds routing/align/top-k/sum kernels.
# Inductor-fused RMSNorm kernels are named like "triton_red_fused_..._mean_mul_pow_rsqrt_0",
# hence "rsqrt" in norm_act.
KERNEL_CLASSES: tuple[tuple[str, re.Pattern], ...] = (
    ("w4a16_gemm", re.compile(r"machete|marlin|gptq|awq|wna16|cutlass.*w4", re.I)),
    ("lora", re.compile(r"lora|sgmv|bgmv|punica|shrink|expand", re.I)),
    ("attention", re.compile(r"flash|fmha|attn|paged", re.I)),
    ("moe", re.compile(r"moe|fused_moe|topk", re.I)),
    ("norm_act", re.compile(r"rms|norm|silu|act|gelu|rsqrt", re.I)),
    ("gemm_other", re.compile(r"gemm|cublas|sm90_xmma|nvjet", re.I)),
)
CLASS_NAMES: tuple[str, ...] = tuple(n for n, _ in KERNEL_CLASSES) + ("other", "memcpy", "memset")

# vllm/v1/worker/gpu_worker.py Worker.annotate_profile (simple and detailed forms)
STEP_ANNOTATION = re.compile(
    r"^execute_(?:\d+_)?context_(?P<nctx>\d+)\((?:sq)?(?P<ctx_tok>\d+)[^)]*\)"
    r"_generation_(?P<ngen>\d+)\((?:sq)?(?P<gen_tok>\d+)[^)]*\)"
)


def classify_kernel(name: str, cat: str = "kernel") -> str:
    """Class of one GPU event: a KERNEL_CLASSES name, "other", "memcpy" or "memset"."""
    if cat == "gpu_memcpy":
        return "memcpy"
    if cat == "gpu_memset":
        return "memset"
    for cls, rx in KERNEL_CLASSES:
        if rx.search(name or ""):
            return cls
    return "other"


def load_trace(path: str | Path) -> list[dict]:
    """The list of trace events of a Chrome trace JSON (``.json`` or gzip ``.json.gz``)."""
    p = Path(path)
    with p.open("rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(p, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        events = data.get("traceEvents", [])
    elif isinstance(data, list):
        events = data
    else:
        raise ValueError(f"{path}: not a Chrome trace (top level is {type(data).__name__})")
    return [e for e in events if isinstance(e, dict)]


def step_kind(annotation_name: str) -> str | None:
    """'decode' / 'prefill' / 'mixed' for a vLLM step annotation name, None for other names."""
    m = STEP_ANNOTATION.match(annotation_name or "")
    if not m:
        return None
    nctx, ngen = int(m.group("nctx")), int(m.group("ngen"))
    if nctx == 0 and ngen > 0:
        return "decode"
    if ngen == 0 and nctx > 0:
        return "prefill"
    return "mixed" if nctx and ngen else "empty"


def _gpu_events(events: Iterable[dict]) -> list[dict]:
    out = []
    for e in events:
        if e.get("cat") in KERNEL_CATS and e.get("ph", "X") == "X":
            try:
                dur = float(e.get("dur", 0.0))
                ts = float(e.get("ts", 0.0))
            except (TypeError, ValueError):
                continue
            out.append({"name": str(e.get("name", "?")), "cat": e["cat"], "ts": ts,
                        "dur": dur, "corr": (e.get("args") or {}).get("correlation")})
    return out


def _aggregate(gpu: list[dict], top: int, total: float | None = None) -> dict:
    """kernels (top by total time) and by_class for a set of GPU events."""
    total = sum(g["dur"] for g in gpu) if total is None else total
    by_name: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    by_class = {c: {"total_us": 0.0, "calls": 0, "share": 0.0} for c in CLASS_NAMES}
    for g in gpu:
        agg = by_name[(g["name"], g["cat"])]
        agg[0] += g["dur"]
        agg[1] += 1
        c = by_class[classify_kernel(g["name"], g["cat"])]
        c["total_us"] += g["dur"]
        c["calls"] += 1
    for c in by_class.values():
        c["share"] = c["total_us"] / total if total > 0 else 0.0
    ranked = sorted(by_name.items(), key=lambda kv: (-kv[1][0], kv[0][0]))
    kernels = [
        {"name": name, "category": cat, "class": classify_kernel(name, cat),
         "total_us": us, "calls": int(n), "mean_us": us / n if n else 0.0,
         "share": us / total if total > 0 else 0.0}
        for (name, cat), (us, n) in ranked[: max(int(top), 0)]
    ]
    return {"total_gpu_us": total, "distinct_kernels": len(by_name),
            "kernels": kernels, "by_class": by_class}


def _gpu_windows(events: list[dict], steps: list[dict]) -> tuple[list[tuple], list[int | None]]:
    """Fallback attribution: the GPU-side projection of the step annotations (time windows),
    the n-th GPU window of a name matched to the n-th CPU annotation of that name."""
    windows = sorted(
        (float(e.get("ts", 0.0)), float(e.get("ts", 0.0)) + float(e.get("dur", 0.0)),
         str(e.get("name")))
        for e in events
        if e.get("cat") == "gpu_user_annotation" and step_kind(str(e.get("name", "")))
    )
    cpu_by_name: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(steps):
        cpu_by_name[s["name"]].append(i)
    seen: dict[str, int] = defaultdict(int)
    window_step: list[int | None] = []
    for w in windows:
        cands = cpu_by_name.get(w[2], [])
        n = seen[w[2]]
        seen[w[2]] += 1
        window_step.append(cands[n] if n < len(cands) else None)
    return windows, window_step


def _attribute_steps(events: list[dict], gpu: list[dict]) -> tuple[list[dict], list[int | None]]:
    """Step annotations found, and for each GPU event the index of its step (or None)."""
    steps: list[dict] = []
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("ph", "X") == "X":
            kind = step_kind(str(e.get("name", "")))
            if kind is not None:
                ts = float(e.get("ts", 0.0))
                steps.append({"name": e["name"], "kind": kind, "pid": e.get("pid"),
                              "tid": e.get("tid"), "ts": ts,
                              "end": ts + float(e.get("dur", 0.0))})
    steps.sort(key=lambda s: s["ts"])
    owner: list[int | None] = [None] * len(gpu)
    if not steps:
        return steps, owner

    # correlation id -> (pid, tid, ts) of the CPU launch call
    launch: dict[Any, tuple[Any, Any, float]] = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATS:
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launch[corr] = (e.get("pid"), e.get("tid"), float(e.get("ts", 0.0)))
    per_thread: dict[tuple[Any, Any], list[int]] = defaultdict(list)
    for i, s in enumerate(steps):
        per_thread[(s["pid"], s["tid"])].append(i)
    starts = {k: [steps[i]["ts"] for i in v] for k, v in per_thread.items()}

    gpu_windows, window_step = _gpu_windows(events, steps)
    for gi, g in enumerate(gpu):
        hit = launch.get(g["corr"]) if g["corr"] is not None else None
        if hit is not None:
            key = (hit[0], hit[1])
            idxs = per_thread.get(key)
            if idxs:
                j = bisect.bisect_right(starts[key], hit[2]) - 1
                if j >= 0 and steps[idxs[j]]["ts"] <= hit[2] <= steps[idxs[j]]["end"]:
                    owner[gi] = idxs[j]
                    continue
        if gpu_windows:
            j = bisect.bisect_right(gpu_windows, (g["ts"], float("inf"), "")) - 1
            if j >= 0 and gpu_windows[j][0] <= g["ts"] <= gpu_windows[j][1]:
                owner[gi] = window_step[j]
    return steps, owner


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _mean(xs: list[float]) -> float | None:
    return float(statistics.fmean(xs)) if xs else None


def _step_kind_summary(idxs: list[int], per_step: dict, top: int) -> dict:
    """Kernel time, span and period of the steps of one kind (annotation indices `idxs`)."""
    busy = [sum(g["dur"] for g in per_step[i]) for i in idxs if per_step[i]]
    spans = [max(g["ts"] + g["dur"] for g in per_step[i]) - min(g["ts"] for g in per_step[i])
             for i in idxs if per_step[i]]
    firsts = sorted(min(g["ts"] for g in per_step[i]) for i in idxs if per_step[i])
    # consecutive steps of this kind only (adjacent annotation indices)
    periods = [min(g["ts"] for g in per_step[b]) - min(g["ts"] for g in per_step[a])
               for a, b in zip(idxs, idxs[1:]) if b == a + 1 and per_step[a] and per_step[b]]
    agg = _aggregate([g for i in idxs for g in per_step[i]], top)
    return {"count": len(idxs), "count_with_gpu_work": len(busy),
            "gpu_us_total": agg["total_gpu_us"], "gpu_us_per_step_median": _median(busy),
            "gpu_us_per_step_mean": _mean(busy), "gpu_span_us_per_step_median": _median(spans),
            "gpu_period_us_median": _median(periods), "first_gpu_ts": firsts[0] if firsts else None,
            "kernels": agg["kernels"], "by_class": agg["by_class"]}


def summarize_trace(path: str, top: int = 15, steps: int | None = None) -> dict:
    """Where the GPU time of a torch-profiler trace went.

    Returns
    - ``total_gpu_us``: sum of ``dur`` (µs) of all ``kernel`` + ``gpu_memcpy`` + ``gpu_memset``
      events (streams are summed, not merged: overlapping kernels count twice);
    - ``by_category``: the same sum per category;
    - ``kernels``: the ``top`` (name, category) groups by total time:
      ``{"name", "category", "class", "total_us", "calls", "mean_us", "share"}``;
    - ``by_class``: ``{class: {"total_us", "calls", "share"}}`` for every class in CLASS_NAMES
      (shares of ``total_gpu_us``; they sum to 1);
    - ``gpu_span_us``: first GPU event start to last GPU event end (busy + idle);
    - ``steps`` / ``decode_step_us``: ``total_gpu_us / steps`` when the caller passes the number
      of decode steps (None otherwise). This includes any prefill in the capture;
    - ``by_step_kind``: when the trace has vLLM step annotations, per kind ("decode", "prefill",
      "mixed"): ``count``, ``gpu_us_total``, ``gpu_us_per_step_median/mean`` (kernel time per
      step), ``gpu_span_us_per_step_median`` (first kernel start to last kernel end of a step),
      ``gpu_period_us_median`` (start-to-start of consecutive steps of that kind: kernel time
      per step / period = how busy the GPU is), ``kernels`` (top) and ``by_class``;
      ``unattributed_us``: GPU time outside any step annotation (e.g. sampling).
    """
    events = load_trace(path)
    gpu = _gpu_events(events)
    total = sum(g["dur"] for g in gpu)
    out = _aggregate(gpu, top, total)
    by_cat = {c: 0.0 for c in KERNEL_CATS}
    for g in gpu:
        by_cat[g["cat"]] += g["dur"]
    out["by_category"] = by_cat
    out["gpu_events"] = len(gpu)
    out["gpu_span_us"] = (max(g["ts"] + g["dur"] for g in gpu) - min(g["ts"] for g in gpu)
                          if gpu else 0.0)
    out["trace"] = str(path)
    out["steps"] = int(steps) if steps else None
    out["decode_step_us"] = total / int(steps) if steps else None

    annotations, owner = _attribute_steps(events, gpu)
    by_kind: dict[str, dict] = {}
    if annotations:
        per_step: dict[int, list[dict]] = defaultdict(list)
        for gi, si in enumerate(owner):
            if si is not None:
                per_step[si].append(gpu[gi])
        for kind in sorted({s["kind"] for s in annotations}):
            idxs = [i for i, s in enumerate(annotations) if s["kind"] == kind]
            by_kind[kind] = _step_kind_summary(idxs, per_step, top)
        out["unattributed_us"] = sum(g["dur"] for g, si in zip(gpu, owner) if si is None)
    else:
        out["unattributed_us"] = None
    out["by_step_kind"] = by_kind
    out["step_annotations"] = len(annotations)
    return out


def format_summary(summary: dict, top: int = 15) -> str:
    """A short text table of a summarize_trace() result (for logs)."""
    lines = [f"GPU time {summary['total_gpu_us'] / 1e3:.3f} ms in {summary['gpu_events']} events"
             + (f"; {summary['decode_step_us']:.1f} us/step over {summary['steps']} steps"
                if summary.get("decode_step_us") else "")]
    dec = (summary.get("by_step_kind") or {}).get("decode")
    if dec and dec.get("gpu_us_per_step_median") is not None:
        period = dec.get("gpu_period_us_median")
        lines.append(f"decode steps: {dec['count']}, kernel time/step median "
                     f"{dec['gpu_us_per_step_median']:.1f} us"
                     + (f", step period median {period:.1f} us" if period else ""))
    for cls, v in sorted(summary["by_class"].items(), key=lambda kv: -kv[1]["total_us"]):
        if v["calls"]:
            lines.append(f"  {cls:<12} {v['share'] * 100:6.2f}%  {v['total_us']:12.1f} us  "
                         f"{v['calls']:7d} calls")
    for k in summary["kernels"][:top]:
        lines.append(f"  {k['share'] * 100:6.2f}%  {k['total_us']:12.1f} us  {k['calls']:6d}x  "
                     f"[{k['class']}] {k['name'][:140]}")
    return "\n".join(lines)


# what bench.py keeps of a profile (the rest stays in profile_summary.json beside the trace)
PROFILE_KEYS = ("by_step_kind", "by_class", "kernels", "total_gpu_us", "gpu_span_us",
                "decode_step_us", "tpot_s_median", "unattributed_us")


def decode_profile_summary(trace: str | Path, *, new_tokens: int, timing, adapters: list,
                           top: int = 25, **extra) -> dict:
    """One profiled fixed-length generate call -> the summary both engines return: the trace's
    kernels (summarize_trace over new_tokens - 1 decode steps; the first token comes from the
    prefill step) and the call's own timing (which the profiler slows: never a result)."""
    from statistics import median

    summary = summarize_trace(str(trace), top=top, steps=new_tokens - 1)
    summary.update({
        "decode_steps": new_tokens - 1, "max_new_tokens": new_tokens,
        "batch_size": len(adapters), "adapters": list(adapters),
        "e2e_s": timing.e2e_s if timing else None,
        "tpot_s_median": median(timing.tpot_s) if timing and timing.tpot_s else None,
        "ttft_s_median": median(timing.ttft_s) if timing and timing.ttft_s else None,
        **extra})
    return summary
