"""vLLM RequestOutputs -> our BatchTiming and ScoredSequence (pure, duck-typed)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from int4lora.engines.base import BatchTiming, ScoredSequence


def _request_metrics(out: Any) -> tuple[float, float, float | None] | None:
    """(ttft_s, tpot_s, engine_ttft_s) from a vLLM 0.26 RequestOutput.metrics (RequestStateStats), or None.

    RequestStateStats (vllm/v1/metrics/stats.py) holds
      arrival_time         frontend wall clock (time.time()) when the request was added
      first_token_latency  frontend wall-clock time from arrival to the step that produced the
                           first token (IterationStats.update_from_output) == vLLM's TTFT
      first_token_ts, last_token_ts  engine-core monotonic timestamps of the steps that produced
                           the first and the last token
      num_generation_tokens
    TPOT = (last_token_ts - first_token_ts) / (num_generation_tokens - 1), exactly vLLM's own
    mean_time_per_output_token (update_from_finished_request); 0.0 when fewer than 2 tokens (as
    vLLM does). The two clocks are never mixed.
    Engine-side TTFT = first_token_ts - queued_ts (engine-core clock: queueing, scheduling and the
    prefill step, without the front end's request submission); None when queued_ts is unset.
    """
    m = getattr(out, "metrics", None)
    if m is None:
        return None
    ttft = getattr(m, "first_token_latency", None)
    first_ts = getattr(m, "first_token_ts", None)
    last_ts = getattr(m, "last_token_ts", None)
    if not ttft or ttft <= 0 or not first_ts or last_ts is None:
        return None
    n = getattr(m, "num_generation_tokens", None)
    if not n:
        n = len(out.outputs[0].token_ids)
    tpot = (last_ts - first_ts) / (n - 1) if n > 1 else 0.0
    queued = getattr(m, "queued_ts", None)
    engine_ttft = float(first_ts - queued) if queued and first_ts > queued else None
    return float(ttft), float(tpot), engine_ttft


def has_request_metrics(outputs: Sequence[Any]) -> bool:
    return bool(outputs) and all(_request_metrics(o) is not None for o in outputs)


def timing_from_outputs(outputs: Sequence[Any], e2e_s: float, *,
                        ttft_fallback_s: float | None = None) -> BatchTiming:
    """BatchTiming from vLLM RequestOutput-like objects (duck-typed).

    Uses per-request ``.metrics`` (see _request_metrics) when every output has them; this needs
    the engine built with disable_log_stats=False (build_llm_kwargs does that).

    Fallback when metrics are absent (stats disabled, or a vLLM whose metrics differ): the
    batch's TTFT is ``ttft_fallback_s`` -- VllmEngine.generate measures it as the wall time of
    the same batch run with max_tokens=1 -- or, when not given, e2e_s / max output length (a
    crude equal-share estimate). Then TPOT = (e2e_s - ttft) / (n_out - 1) per request (0.0 when
    n_out < 2). No NaN is ever returned.
    """
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
    output_tokens = sum(len(x) for x in ids)
    ttft: list[float] = []
    tpot: list[float] = []
    engine_ttft: list[float] | None = None
    if has_request_metrics(outputs):
        metrics = [_request_metrics(o) for o in outputs]
        ttft, tpot = [m[0] for m in metrics], [m[1] for m in metrics]
        if all(m[2] is not None for m in metrics):
            engine_ttft = [m[2] for m in metrics]
    else:
        longest = max((len(x) for x in ids), default=1) or 1
        t0 = float(ttft_fallback_s) if ttft_fallback_s is not None else e2e_s / longest
        t0 = min(max(t0, 0.0), e2e_s)
        for x in ids:
            ttft.append(t0)
            tpot.append((e2e_s - t0) / (len(x) - 1) if len(x) > 1 else 0.0)
    return BatchTiming(
        e2e_s=float(e2e_s),
        ttft_s=ttft,
        tpot_s=tpot,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_token_ids=ids,
        ttft_engine_s=engine_ttft,
    )


def _lp_value(x: Any) -> float:
    return float(getattr(x, "logprob", x))


def _lp_rank(x: Any) -> float:
    r = getattr(x, "rank", None)
    return math.inf if r is None else float(r)


def prompt_logprobs_to_scored(token_ids: Sequence[int], prompt_logprobs: Sequence[Any],
                              top_k: int) -> ScoredSequence:
    """Convert vLLM prompt_logprobs to the "next token" convention of ScoredSequence.

    vLLM (vllm/logprobs.py create_prompt_logprobs / append_logprobs_for_next_position): entry p
    is None for p == 0, else a dict {token_id: Logprob(logprob, rank, decoded_token)} for the
    distribution at position p given tokens[:p]; it holds the actual token tokens[p] (inserted
    first, with its true vocab rank) plus the top-k tokens with ranks 1..k (one dict, so the
    actual token appears once). FlatLogprobs indexes the same way.

    Our position t (0..len-2) = vLLM entry t+1: target = logprob of tokens[t+1]; top ids sorted
    by rank (then logprob), truncated to top_k.
    """
    n = len(token_ids)
    if len(prompt_logprobs) != n:
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} entries for {n} tokens")
    target: list[float] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for t in range(n - 1):
        entry: Mapping[int, Any] | None = prompt_logprobs[t + 1]
        if entry is None:
            raise ValueError(f"prompt_logprobs entry {t + 1} is None")
        nxt = int(token_ids[t + 1])
        if nxt not in entry:
            raise ValueError(f"prompt_logprobs entry {t + 1} lacks the actual token {nxt}")
        target.append(_lp_value(entry[nxt]))
        ranked = sorted(entry.items(), key=lambda kv: (_lp_rank(kv[1]), -_lp_value(kv[1])))[:top_k]
        top_ids.append([int(k) for k, _ in ranked])
        top_lps.append([_lp_value(v) for _, v in ranked])
    return ScoredSequence(target_logprobs=target, top_ids=top_ids, top_logprobs=top_lps)

