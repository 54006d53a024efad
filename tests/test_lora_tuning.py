"""Tuned Punica kernel configs (int4lora.lora_tuning): key enumeration, vLLM's file layout
and lookup, the grid, the output check and the selection logic. The GPU script's own tests
are in tests/test_tune_lora_kernels.py.

vLLM's lookup (vllm/lora/ops/triton_ops/utils.py:283-312) cannot be imported here (vllm's
package import needs zmq and CUDA-side packages), so lookup_config mirrors it; the mirror's
rules are spelled out in test_lookup_mirrors_vllm_rules."""
import json

import pytest
import torch

from int4lora import lora_tuning as lt

MISTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000}
BATCHES = [1, 8, 32, 64]
GPU = "NVIDIA H100 80GB HBM3"


def test_keys_mistral_qkv_only():
    keys = lt.lora_keys(MISTRAL, ["qkv_proj"], 16, 1, BATCHES)
    expected = []
    for m in BATCHES:
        expected += [("shrink", None, 2, 3, m, 4096, 16), ("expand", True, 2, 3, m, 16, 4096)]
    assert keys == expected


def test_keys_mistral_all_modules():
    modules = lt.vllm_default_wrapped_modules("mistral", MISTRAL)
    assert modules == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    wls = lt.enumerate_workloads(MISTRAL, modules, 16, 1, BATCHES)
    got = {(w.key.op, w.key.add_inputs, w.key.max_loras, w.key.num_slices, w.key.m, w.key.k,
            w.key.n): w.modules for w in wls}
    expected = {}
    for m in BATCHES:
        expected.update({
            ("shrink", None, 2, 3, m, 4096, 16): ["qkv_proj"],
            ("expand", True, 2, 3, m, 16, 4096): ["qkv_proj"],
            ("shrink", None, 2, 1, m, 4096, 16): ["o_proj"],
            ("expand", True, 2, 1, m, 16, 4096): ["o_proj", "down_proj"],
            ("shrink", None, 2, 2, m, 4096, 16): ["gate_up_proj"],
            ("expand", True, 2, 2, m, 16, 14336): ["gate_up_proj"],
            ("shrink", None, 2, 1, m, 14336, 16): ["down_proj"],
        })
    assert got == expected
    assert len(wls) == 28
    gate_up = next(w for w in wls if w.key.n == 14336)
    assert gate_up.slice_sizes == (14336, 14336)
    qkv_expand = next(w for w in wls if w.key.op == "expand" and w.key.num_slices == 3)
    assert qkv_expand.slice_sizes == (4096, 1024, 1024)


def test_keys_llama_default_adds_embedding_and_lm_head():
    modules = lt.vllm_default_wrapped_modules("llama", MISTRAL)
    assert modules[-2:] == ["embed_tokens", "lm_head"]
    wls = lt.enumerate_workloads(MISTRAL, modules, 16, 1, [8])
    by_key = {(w.key.op, w.key.num_slices, w.key.k, w.key.n): w.modules for w in wls}
    assert by_key[("expand", 1, 16, 32000)] == ["lm_head"]
    assert by_key[("expand", 1, 16, 4096)] == ["o_proj", "down_proj", "embed_tokens"]
    assert by_key[("shrink", 1, 4096, 16)] == ["o_proj", "lm_head"]
    mixtral = {**MISTRAL, "num_local_experts": 8}
    assert lt.vllm_default_wrapped_modules("mixtral", mixtral) == [
        "qkv_proj", "o_proj", "gate", "experts", "embed_tokens", "lm_head"]
    with pytest.raises(ValueError, match="'falcon'"):
        lt.vllm_default_wrapped_modules("falcon", MISTRAL)


def test_max_loras_key_prefill_padding_and_expand_false():
    keys = lt.lora_keys(MISTRAL, ["qkv_proj", "lm_head"], 16, 4, [3], prefill_tokens=[384, 1024],
                        add_inputs=(True, False))
    assert {k[2] for k in keys} == {5}  # lora_ids.size(0) = max_loras + 1
    decode = [k for k in keys if k[4] == 4]  # batch 3 runs in the size-4 CUDA graph ...
    lm_head = [k for k in keys if k[6] == 32000]
    assert [k[4] for k in lm_head] == [3]  # ... but logits are computed on 3 rows
    assert ("expand", False, 5, 3, 4, 16, 4096) in decode
    assert ("expand", False, 5, 1, 3, 16, 32000) not in keys  # logits: add_inputs=True only
    assert {k[4] for k in keys if k[3] == 3} == {4, 384, 1024}
    assert lt.padded_tokens(3) == 4 and lt.padded_tokens(201) == 208
    assert lt.padded_tokens(300) == 304 and lt.padded_tokens(600) == 600
    assert lt.padded_tokens(100, max_capture=64) == 100


@pytest.mark.parametrize("args, match", [
    ((MISTRAL, ["q_proj"], 16, 1, [1]), "'q_proj'"),
    ((MISTRAL, ["qkv_proj"], 0, 1, [1]), "max_rank"),
    ((MISTRAL, ["qkv_proj"], 16, 1, []), "batch_sizes"),
    ((MISTRAL, ["qkv_proj"], 16, 1, [0]), "batch_sizes"),
    ((MISTRAL, [], 16, 1, [1]), "wrapped_modules"),
    ({k: v for k, v in MISTRAL.items() if k != "intermediate_size"}, "'intermediate_size'"),
])
def test_bad_input_names_the_value(args, match):
    if isinstance(args, dict):
        args = (args, ["gate_up_proj"], 16, 1, [1])
    with pytest.raises(ValueError, match=match):
        lt.enumerate_workloads(*args)


def test_lookup_args_round_trip():
    for key in lt.enumerate_workloads(MISTRAL, ["qkv_proj", "down_proj"], 16, 2, [8],
                                      add_inputs=(True, False)):
        key = key.key
        args = lt.lookup_args(key)
        assert lt.key_from_lookup(**args) == key
    shrink = lt.KernelKey("shrink", None, 2, 1, 8, 14336, 16)
    assert lt.lookup_args(shrink)["hidden_size"] == 14336 and lt.lookup_args(shrink)["rank"] == 16
    expand = lt.KernelKey("expand", True, 2, 2, 8, 16, 14336)
    assert lt.lookup_args(expand)["hidden_size"] == 14336 and lt.lookup_args(expand)["rank"] == 16


def test_file_names():
    assert lt.config_filename(GPU, "shrink") == "NVIDIA_H100_80GB_HBM3_SHRINK.json"
    assert lt.config_filename("NVIDIA H100-SXM", "expand", True) == \
        "NVIDIA_H100_SXM_EXPAND_TRUE.json"
    assert lt.config_filename(GPU, "expand", False).endswith("_EXPAND_FALSE.json")
    assert lt.config_filename(GPU, "fused_moe_lora_w13_shrink").endswith(
        "_FUSED_MOE_LORA_W13_SHRINK.json")
    with pytest.raises(ValueError, match="add_inputs"):
        lt.config_filename(GPU, "expand")
    with pytest.raises(ValueError, match="'bgmv'"):
        lt.config_filename(GPU, "bgmv")


def _cfg(tag):
    return {"block_m": 16, "block_n": 16, "block_k": 256, "split_k": tag, "num_warps": 4,
            "num_ctas": 1, "num_stages": 2}


def test_json_round_trip_through_lookup(tmp_path):
    wls = lt.enumerate_workloads(MISTRAL, ["qkv_proj", "o_proj"], 16, 1, BATCHES)
    entries = [(w.key, _cfg(i)) for i, w in enumerate(wls)]
    (tmp_path / "NVIDIA_H100_80GB_HBM3_EXPAND_FALSE.json").write_text("{}")  # stale: goes
    (tmp_path / "NVIDIA_A100_SHRINK.json").write_text("{}")  # another GPU: stays
    written = lt.write_config_files(tmp_path, GPU, entries)
    assert sorted(p.rsplit("/", 1)[1] for p in written) == [
        "NVIDIA_H100_80GB_HBM3_EXPAND_TRUE.json", "NVIDIA_H100_80GB_HBM3_SHRINK.json"]
    assert not (tmp_path / "NVIDIA_H100_80GB_HBM3_EXPAND_FALSE.json").exists()
    assert (tmp_path / "NVIDIA_A100_SHRINK.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    for key, cfg in entries:
        data = json.loads((tmp_path / lt.config_filename(GPU, key.op, key.add_inputs)).read_text())
        assert lt.lookup_config(data, key.max_loras, key.num_slices, key.m, key.k, key.n) == cfg
    shrink = json.loads((tmp_path / "NVIDIA_H100_80GB_HBM3_SHRINK.json").read_text())
    assert list(shrink) == ["2"] and sorted(shrink["2"]) == ["1", "3"]
    assert sorted(shrink["2"]["3"], key=int) == ["1", "8", "32", "64"]


def test_lookup_mirrors_vllm_rules():
    """utils.py:283-312: exact string key, else nearest |int(key) - value| (first of equals in
    file order) for max_loras, m, k, n and the MoE intermediate size; num_slices exact."""
    data = {"2": {"1": {"8": {"4096": {"16": "m8"}}, "32": {"4096": {"16": "m32"}}}}}
    assert lt.lookup_config(data, 2, 1, 8, 4096, 16) == "m8"
    assert lt.lookup_config(data, 2, 1, 16, 4096, 16) == "m8"    # |16-8| < |16-32|
    assert lt.lookup_config(data, 2, 1, 20, 4096, 16) == "m8"    # a tie: first in file order
    assert lt.lookup_config(data, 2, 1, 1000, 4096, 16) == "m32"
    assert lt.lookup_config(data, 5, 1, 32, 14336, 64) == "m32"  # nearest max_loras, k, n too
    with pytest.raises(KeyError):
        lt.lookup_config(data, 2, 3, 8, 4096, 16)                # num_slices must match
    moe = {"1": {"2": {"4": {"16": {"4096": {"14336": "i"}}}}}}
    assert lt.lookup_config(moe, 1, 2, 4, 16, 4096, moe_intermediate_size=1) == "i"


def test_nest_rejects_two_configs_for_one_key():
    key = lt.KernelKey("shrink", None, 2, 1, 8, 4096, 16)
    with pytest.raises(ValueError, match="two configs"):
        lt.nest_configs([(key, _cfg(1)), (key, _cfg(2))])
    assert lt.nest_configs([(key, _cfg(1)), (key, _cfg(1))])["SHRINK"]["2"]["1"]["8"]


def test_grid_size_bound():
    modules = lt.vllm_default_wrapped_modules("llama", MISTRAL)
    wls = lt.enumerate_workloads(MISTRAL, modules, 16, 1, BATCHES,
                                 prefill_tokens=[128, 1024, 4096, 8192], add_inputs=(True, False))
    for w in wls:
        grid = lt.parameter_grid(w.key)
        assert 1 <= len(grid) <= lt.MAX_GRID_PER_KEY, w.key.label()
        for point in grid:
            assert all(point[f] >= 16 for f in ("block_m", "block_n", "block_k"))
            if w.key.op == "shrink":
                assert point["block_n"] <= 16  # never wider than the rank
                assert point["block_k"] * point["split_k"] <= w.key.k
    # the brief's budget: a 7B shape, qkv_proj, 4 batch sizes in ~60-90 s on an H100
    qkv = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, BATCHES)
    assert sum(len(lt.parameter_grid(w.key)) for w in qkv) <= 140


def test_candidate_configs_start_with_vllm_default():
    default = {"block_m": 32, "block_n": 16, "block_k": 256, "split_k": 64, "num_warps": 4,
               "num_ctas": 1, "group_size_m": 8, "num_stages": 2, "max_nreg": None}
    key = lt.KernelKey("shrink", None, 2, 3, 1, 4096, 16)
    cands = lt.candidate_configs(default, key)
    assert cands[0] == default
    tags = [json.dumps(c, sort_keys=True) for c in cands]
    assert len(tags) == len(set(tags))
    assert all(set(default) <= set(c) and c["max_nreg"] is None for c in cands)
    with pytest.raises(ValueError, match="split_k"):
        lt.candidate_configs({k: v for k, v in default.items() if k != "split_k"}, key)


def test_outputs_agree_tolerances():
    ref = torch.randn(3, 8, 16)
    assert lt.outputs_agree(ref.clone(), ref, "shrink")[0]
    assert lt.outputs_agree(ref * (1 + 1e-6), ref, "shrink")[0]
    bad = ref.clone()
    bad[1, 2, 3] += 0.01 * ref.abs().max()
    assert not lt.outputs_agree(bad, ref, "shrink")[0]
    assert not lt.outputs_agree(ref[:2], ref, "shrink")[0]
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    assert not lt.outputs_agree(nan, ref, "shrink")[0]
    y = torch.randn(8, 64).to(torch.bfloat16)
    one_ulp = (y.float() * (1 + 2 ** -8)).to(torch.bfloat16)
    assert lt.outputs_agree(one_ulp, y, "expand")[0]
    wrong = y.clone()
    wrong[:, 40:] = 0  # a slice left unwritten
    assert not lt.outputs_agree(wrong, y, "expand")[0]


def test_references_match_explicit_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    a = [torch.randn(2, 1, 4, 32, generator=g).to(torch.bfloat16) for _ in range(3)]
    out = lt.reference_shrink(x, a, 0.5)
    assert out.shape == (3, 5, 4) and out.dtype == torch.float32
    for s in range(3):
        for t in range(5):
            want = 0.5 * sum(float(x[t, j]) * float(a[s][0, 0, 1, j]) for j in range(32))
            assert abs(float(out[s, t, 1]) - want) < 1e-4
    buf = torch.randn(2, 5, 4, generator=g)
    b = [torch.randn(2, 1, 6, 4, generator=g).to(torch.bfloat16),
         torch.randn(2, 1, 3, 4, generator=g).to(torch.bfloat16)]
    y0 = torch.randn(5, 9, generator=g).to(torch.bfloat16)
    y = lt.reference_expand(y0, buf, b)
    second = buf[1].to(torch.bfloat16).float() @ b[1][0, 0].float().T
    assert torch.allclose(y[:, 6:].float(), y0[:, 6:].float() + second, atol=0.05)
    assert not torch.equal(y[:, :6], y0[:, :6])


def test_tune_key_never_picks_a_wrong_config():
    cands = [{"id": 0}, {"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}]
    results = {0: {"us": 10.0, "agrees": True}, 1: {"us": 2.0, "agrees": False},
               2: {"us": 7.0, "agrees": True}, 3: {"us": None, "agrees": False, "error": "OOR"},
               4: {"us": 8.0, "agrees": True}}
    out = lt.tune_key(cands, lambda c: dict(results[c["id"]]), lambda: False)
    assert out["best"]["config"] == {"id": 2} and out["complete"]
    assert out["default"]["config"] == {"id": 0}
    calls = []

    def measure(c):
        calls.append(c["id"])
        return dict(results[c["id"]])

    out = lt.tune_key(cands, measure, lambda: len(calls) >= 2)
    assert calls == [0, 1] and not out["complete"] and out["best"]["config"] == {"id": 0}
    with pytest.raises(RuntimeError, match="default"):
        lt.tune_key(cands, lambda c: {"us": None, "agrees": False}, lambda: False)


def test_summary_row_and_table():
    wl = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, [1])[0]
    tried = [{"config": {}, "us": 4.0, "agrees": True}, {"config": {}, "agrees": False},
             {"config": {}, "agrees": False, "error": "x"}]
    row = lt.summary_row(wl, {"tried": tried}, {"split_k": 16}, "tuned", 4.0, 3.0)
    assert row["speedup"] == pytest.approx(4 / 3) and row["candidates"] == 3
    assert row["rejected_wrong_output"] == 1 and row["failed"] == 1
    assert row["label"] == "shrink[2/3/1/4096/16]" and row["modules"] == ["qkv_proj"]
    assert "shrink[2/3/1/4096/16]" in lt.format_summary([row])
