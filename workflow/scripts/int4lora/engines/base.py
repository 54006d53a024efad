"""What every engine backend provides, so the bench and validate scripts stay engine-agnostic."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class BatchTiming:
    e2e_s: float              # wall time of the whole batched generate call (client side)
    ttft_s: list[float]       # per request, client-side time to first token
    tpot_s: list[float]       # per request, mean inter-token time after the first token
    prompt_tokens: int        # sum over the batch
    output_tokens: int        # sum over the batch
    output_token_ids: list[list[int]] = field(default_factory=list)
    # per request, engine-side time to first token (queued -> first token in the engine core);
    # None where the engine has no separate clock (HF: the client is the engine)
    ttft_engine_s: list[float] | None = None


@dataclass
class ScoredSequence:
    target_logprobs: list[float]     # logprob of token t+1 given tokens[:t+1], t = 0..len-2
    top_ids: list[list[int]]         # top-k next-token ids at each of those positions (descending)
    top_logprobs: list[list[float]]  # their logprobs


class Engine(Protocol):
    """One loaded model with optional LoRA adapters (names given at construction)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 adapters: list[str | None]) -> BatchTiming: ...

    def score(self, sequences: list[list[int]], adapters: list[str | None],
              top_k: int = 20) -> list[ScoredSequence]: ...

    def greedy(self, prompts: list[list[int]], max_new_tokens: int,
               adapters: list[str | None]) -> list[list[int]]: ...

    def weight_storage(self) -> dict | None: ...

    def adapter_report(self) -> dict: ...

    def compile_events(self) -> int: ...

    def info(self) -> dict: ...

    def memory(self) -> dict: ...

    def close(self) -> None: ...
