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


def test_lora_memory_counts_the_slot_buffers_vllm_preallocates():
    info = {"llm_kwargs": {"max_lora_rank": 16, "max_loras": 4},
            "lora_wrapped_modules": ["qkv_proj"]}
    mem = bench.lora_memory(info, ARCH, 256)
    # per layer and slot: 3 A slices 16 x 64 + B 128 x 16 elements (bf16), 2 layers, 4 slots
    assert mem["buffer_bytes"] == (3 * 16 * 64 + 128 * 16) * 2 * 2 * 4
    assert bench.lora_memory({"llm_kwargs": {}}, ARCH, 256)["buffer_bytes"] is None
