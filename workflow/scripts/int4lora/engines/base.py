"""What every engine backend returns, so the bench and validate scripts stay engine-agnostic."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchTiming:
    e2e_s: float              # wall time of the whole batched generate call
    ttft_s: list[float]       # per request, time to first token
    tpot_s: list[float]       # per request, mean inter-token time after the first token
    prompt_tokens: int        # sum over the batch
    output_tokens: int        # sum over the batch
    output_token_ids: list[list[int]] = field(default_factory=list)


@dataclass
class ScoredSequence:
    target_logprobs: list[float]     # logprob of token t+1 given tokens[:t+1], t = 0..len-2
    top_ids: list[list[int]]         # top-k next-token ids at each of those positions (descending)
    top_logprobs: list[list[float]]  # their logprobs
