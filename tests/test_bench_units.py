"""Exact values of what the bench derives from its timings: roofline bytes and fraction, and the
bytes a LoRA adapter adds to a decode step (tiny hand-computable shapes, no model loaded)."""
import pytest

import bench
from int4lora.coverage import decode_weight_bytes

ARCH = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100}


def _storage(**family_bytes):
    fams = {f: {"bytes": 0, "elements": 0, "elements_4bit": 0, "bytes_4bit": 0}
            for f in ("attention", "dense_mlp", "experts", "router", "embeddings", "lm_head",
                      "norm", "lora", "other")}
    for name, b in family_bytes.items():
        fams[name]["bytes"] = b
    return {"families": fams, "total_bytes": sum(family_bytes.values())}


def _run(variant, batch, tpot, prompt=16, out=8):
    return {"variant": variant, "batch": batch, "tpot_s": {"median": tpot},
            "prompt_tokens": prompt * batch, "output_tokens": out * batch}


def test_roofline_counts_weights_kv_and_adapter_exactly():
    storage = _storage(attention=1000, dense_mlp=3000, embeddings=500, lm_head=400, norm=100)
    hf = {"adapter_bytes": 256, "wrapped_modules": []}
    base = bench.roofline(_run("lora-base", 1, 0.01), storage, ARCH, hf, 1e6, 2)
    # weights a step reads: everything but the embedding table (its row gather is negligible)
    weights = 1000 + 3000 + 400 + 100
    assert decode_weight_bytes(storage, ARCH, 1) == weights
    # K and V: 2 x layers 2 x kv heads 2 x head_dim 16 x context (16 + 8 // 2) x 2 bytes
    kv = 2 * 2 * 2 * 16 * (16 + 4) * 2
    assert base["bytes_per_step"] == weights + kv and base["adapter_bytes_per_step"] == 0
    assert base["tpot_floor_s"] == pytest.approx((weights + kv) / 1e6)
    # the fraction of the roofline reached: the floor over the measured TPOT (not inverted)
    assert base["roofline_fraction"] == pytest.approx((weights + kv) / 1e6 / 0.01)
    adapter = bench.roofline(_run("lora-adapter", 1, 0.01), storage, ARCH, hf, 1e6, 2)
    assert adapter["bytes_per_step"] == weights + kv + 256
    # fp32 KV (CPU presets) doubles the KV term
    assert bench.roofline(_run("base", 1, 0.01), storage, ARCH, hf, 1e6, 4)[
        "bytes_per_step"] == weights + 2 * kv


def test_adapter_step_bytes_per_variant():
    hf = {"adapter_bytes": 256, "wrapped_modules": []}
    assert bench.adapter_step_bytes(hf, ARCH, "lora-base", 8) == 0
    assert bench.adapter_step_bytes(hf, ARCH, "lora-adapter", 8) == 256
    assert bench.adapter_step_bytes(hf, ARCH, "lora-x4", 8) == 4 * 256
    assert bench.adapter_step_bytes(hf, ARCH, "lora-x4", 2) == 2 * 256  # 2 requests, 2 adapters
    # vLLM, q,v restricted to qkv_proj: one slot of qkv_proj per layer at max_lora_rank 16:
    # one A per slice (q, k, v: 3 x r x hidden) and B (q + k + v = 64 + 32 + 32) x r, bf16
    # (vllm/lora/layers/column_parallel_linear.py: lora_a_stacked has n_slices entries)
    vllm = {"adapter_bytes": 256, "wrapped_modules": ["qkv_proj"], "max_rank": 16}
    per_layer = (3 * 64 + 128) * 16 * 2
    assert bench.adapter_step_bytes(vllm, ARCH, "lora-adapter", 1) == 2 * per_layer
    # vLLM's defaults wrap every linear: the same adapter reads the zero slots of o, gate_up, down
    every = {**vllm, "wrapped_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
    assert bench.adapter_step_bytes(every, ARCH, "lora-adapter", 1) > \
        3 * bench.adapter_step_bytes(vllm, ARCH, "lora-adapter", 1)


def test_adapter_step_bytes_of_expert_lora_follow_the_experts_a_batch_touches():
    """vLLM fused-MoE LoRA reads only the experts the batch's tokens are routed to: of 8 experts
    with top-2 routing, one token touches 2, four tokens 8 x (1 - (6/8)^4) = 5.5 -> 5."""
    moe = {**ARCH, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
    vllm = {"adapter_bytes": 256, "wrapped_modules": ["experts"], "max_rank": 16}
    # per expert, layer and rank unit: A of w1, w3 (H each) and w2 (I); B of w1, w3 (I each)
    # and w2 (H): 3 x 64 + 3 x 128 elements; 2 layers, rank 16, bf16
    per_expert = (3 * 64 + 3 * 128) * 2 * 16 * 2
    assert bench.adapter_step_bytes(vllm, moe, "lora-adapter", 1) == 2 * per_expert
    assert bench.adapter_step_bytes(vllm, moe, "lora-adapter", 4) == 5 * per_expert
    assert bench.adapter_step_bytes(vllm, moe, "lora-adapter", 64) == 8 * per_expert
    assert bench.adapter_step_bytes(vllm, moe, "lora-x2", 4) == 2 * 5 * per_expert


def test_lora_memory_counts_the_slot_buffers_vllm_preallocates():
    info = {"llm_kwargs": {"max_lora_rank": 16, "max_loras": 4},
            "lora_wrapped_modules": ["qkv_proj"]}
    mem = bench.lora_memory(info, ARCH, 256)
    # per layer and slot: 3 A slices 16 x 64 + B 128 x 16 elements (bf16), 2 layers, 4 slots
    assert mem["buffer_bytes"] == (3 * 16 * 64 + 128 * 16) * 2 * 2 * 4
    assert bench.lora_memory({"llm_kwargs": {}}, ARCH, 256)["buffer_bytes"] is None


class OutOfMemoryError(RuntimeError):
    """Named like torch's: bench.sweep recognises OOM by the exception's class name."""


class OomAtBatch:
    """Answers generate() like a steady engine, except that a batch of `oom_batch` requests runs
    out of memory (it stands in for an engine only to test the sweep's bookkeeping)."""

    def __init__(self, oom_batch):
        self.oom_batch, self.batches = oom_batch, []

    def generate(self, prompts, new_tokens, adapters):
        from int4lora.engines.base import BatchTiming
        n = len(prompts)
        self.batches.append(n)
        if n == self.oom_batch:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return BatchTiming(e2e_s=0.5, ttft_s=[0.1] * n, tpot_s=[0.05] * n,
                           prompt_tokens=4 * n, output_tokens=new_tokens * n,
                           output_token_ids=[[1, 2]] * n)


def test_oom_at_one_batch_is_a_row_and_larger_batches_still_run():
    eng = OomAtBatch(oom_batch=2)
    cfg = {"warmup": 1, "min_iterations": 2, "min_seconds": 0, "max_iterations": 2,
           "max_warmup": 2, "output_tokens": 2}
    variants = {"lora-base": [None] * 4, "lora-adapter": ["a"] * 4}
    swept = bench.sweep(eng, [[0, 1, 2, 3]] * 4, {"batch_sizes": [1, 2, 4]}, cfg, variants)
    assert swept["skipped"] == [
        {"variant": v, "batch": 2, "status": "oom",
         "reason": "CUDA out of memory. Tried to allocate 2.00 GiB"}
        for v in ("lora-base", "lora-adapter")]
    assert sorted({(s["variant"], s["batch"]) for s in swept["samples"]}) == [
        ("lora-adapter", 1), ("lora-adapter", 4), ("lora-base", 1), ("lora-base", 4)]
    assert set(swept["outputs"]) == {"1", "4"} and 4 in eng.batches


def test_an_error_that_is_not_oom_stops_the_sweep():
    class Broken(OomAtBatch):
        def generate(self, prompts, new_tokens, adapters):
            raise ValueError("a real bug")
    cfg = {"warmup": 1, "min_iterations": 1, "min_seconds": 0, "max_iterations": 1,
           "max_warmup": 1, "output_tokens": 2}
    with pytest.raises(ValueError, match="a real bug"):
        bench.sweep(Broken(0), [[0, 1]], {"batch_sizes": [1]}, cfg, {"base": [None]})
