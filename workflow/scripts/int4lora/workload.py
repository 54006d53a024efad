"""The fixed workload: shipped prompts cut to an exact token length, and the eval text."""
from __future__ import annotations

import json
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[3] / "resources"


def load_prompts(path: Path | None = None) -> list[str]:
    lines = (path or RESOURCES / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def fixed_length_prompts(tokenizer, texts: list[str], count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids, cycling through the prompt set."""
    prompts = []
    for i in range(count):
        ids = tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to nothing")
        body = (ids * (length // len(ids) + 1))[: length - 1]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else ids[0]
        prompts.append([bos] + body)
    return prompts


def eval_sequences(tokenizer, seq_len: int, max_sequences: int,
                   path: Path | None = None) -> list[list[int]]:
    """Non-overlapping windows of the shipped eval text for perplexity."""
    text = (path or RESOURCES / "eval_text.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not windows:
        windows = [ids]
    return windows[:max_sequences]
