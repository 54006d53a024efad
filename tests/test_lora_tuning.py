"""Tuned Punica kernel configs: key enumeration, vLLM's file layout and lookup, the grid,
the selection logic, and tune_lora_kernels.main() on a machine without a GPU.

vLLM's lookup (vllm/lora/ops/triton_ops/utils.py:283-312) cannot be imported here (vllm's
package import needs zmq and CUDA-side packages), so lookup_config mirrors it; the mirror's
rules are spelled out in test_lookup_mirrors_vllm_rules."""
import json
from types import SimpleNamespace

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


def test_forced_config_patches_and_restores_the_op_lookup():
    import tune_lora_kernels as tlk

    def real(op_type, max_loras, batch, hidden_size, rank, num_slices, add_inputs=None,
             moe_intermediate_size=None):
        return {"default": True}

    module = SimpleNamespace(get_lora_op_configs=real)
    ops = SimpleNamespace(modules={"shrink": module})
    seen = []
    with tlk.forced_config(ops, "shrink", {"split_k": 8}, seen):
        got = module.get_lora_op_configs("shrink", max_loras=2, batch=1, hidden_size=4096,
                                         rank=16, num_slices=3)
    assert got == {"split_k": 8} and module.get_lora_op_configs is real
    key = lt.KernelKey("shrink", None, 2, 3, 1, 4096, 16)
    assert seen == [(key, {"split_k": 8})]
    tlk._check_lookup(seen, key)
    with pytest.raises(RuntimeError, match="predicted"):
        tlk._check_lookup(seen, lt.KernelKey("shrink", None, 1, 3, 1, 4096, 16))
    with tlk.forced_config(ops, "shrink", None, seen := []):
        assert module.get_lora_op_configs("shrink", 2, 1, 4096, 16, 3) == {"default": True}


@pytest.mark.parametrize("device, words", [("cpu", "CUDA GPU"), ("cuda", "no CUDA GPU")])
def test_main_without_gpu_is_unsupported(tmp_path, result_validator, device, words):
    import tune_lora_kernels as tlk
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "tuning.json"
    res = tlk.main(MISTRAL, ["qkv_proj"], 16, 1, BATCHES, str(tmp_path / "cfg"), str(out),
                   device=device, model="mistral-7b-shape")
    assert res["status"] == "unsupported" and words in res["reason"]
    assert res["kind"] == "tuning" and res["params"]["keys"][0] == "shrink[2/3/1/4096/16]"
    saved = json.loads(out.read_text())
    result_validator.validate(saved)
    assert saved["status"] == "unsupported"
    assert not (tmp_path / "cfg").exists()


def test_main_bad_input_writes_nothing(tmp_path):
    import tune_lora_kernels as tlk
    out = tmp_path / "tuning.json"
    with pytest.raises(ValueError, match="'q_proj'"):
        tlk.main(MISTRAL, ["q_proj"], 16, 1, BATCHES, str(tmp_path / "cfg"), str(out))
    with pytest.raises(ValueError, match="time_budget_s"):
        tlk.main(MISTRAL, ["qkv_proj"], 16, 1, BATCHES, str(tmp_path / "cfg"), str(out),
                 time_budget_s=0)
    assert not out.exists()


def test_cli_reads_a_fetch_result(tmp_path, capsys):
    import tune_lora_kernels as tlk
    fetch = tmp_path / "fetch.json"
    fetch.write_text(json.dumps({"metrics": {"architecture": MISTRAL}}))
    res = tlk.cli(["--arch-json", str(fetch), "--out-dir", str(tmp_path / "cfg"),
                   "--device", "cpu", "--batch-sizes", "1", "8"])
    assert res["status"] == "unsupported"
    assert res["params"]["wrapped_modules"] == ["qkv_proj", "o_proj", "gate_up_proj",
                                                "down_proj"]
    assert (tmp_path / "cfg" / "tuning-result.json").exists()
    assert "unsupported" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        tlk.load_arch(str(bad))


# --- tune() end to end on the CPU: vLLM's real LoRAKernelMeta (loaded from the 0.26 source
# file, which needs only torch), stand-in shrink/expand ops with vLLM's semantics and config
# lookup, and a stand-in CUDA clock. Checks the harness's wiring, not any kernel's speed.
REF_META = "/work/ref/vllm-src/vllm/lora/ops/triton_ops/lora_kernel_metadata.py"
SHRINK_DEFAULT = {"block_m": 32, "block_n": 16, "block_k": 256, "split_k": 64, "num_warps": 4,
                  "num_ctas": 1, "group_size_m": 8, "num_stages": 2, "max_nreg": None}
EXPAND_DEFAULT = {"block_m": 64, "block_n": 64, "block_k": 32, "num_warps": 4, "num_ctas": 1,
                  "num_stages": 2, "max_nreg": None}


def _shrink_cost(cfg):  # split_k 16 is fast but wrong; (128, 32) is the fastest right one
    return 0.5 if cfg["split_k"] == 16 else 2.0 if (cfg["block_k"], cfg["split_k"]) == (
        128, 32) else 4.0


def _expand_cost(cfg):  # block_n 256 is fast but wrong; (64, 2 warps) the fastest right one
    return 0.5 if cfg["block_n"] == 256 else 1.0 if (cfg["block_n"], cfg["num_warps"]) == (
        64, 2) else 3.0


def _fake_cuda(monkeypatch, clock):
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock.now

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) / 1e3  # ms

    class CUDAGraph:
        def replay(self):
            clock.now += self.cost

    @contextlib.contextmanager
    def graph(g):
        clock.recording, clock.captured = True, 0.0
        yield
        g.cost, clock.recording = clock.captured, False

    for name, value in {"Stream": Stream, "Event": Event, "CUDAGraph": CUDAGraph,
                        "graph": graph, "stream": lambda s: contextlib.nullcontext(),
                        "current_stream": Stream, "synchronize": lambda *a: None,
                        "get_device_properties": lambda d: SimpleNamespace(L2_cache_size=1),
                        "get_device_name": lambda *a: "FAKE GPU-1",
                        "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)


def _fake_ops(clock, evil_default=False):
    import functools
    import importlib.util
    spec = importlib.util.spec_from_file_location("vllm_lora_kernel_metadata", REF_META)
    meta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta)

    @functools.lru_cache
    def get_lora_op_configs(op_type, max_loras, batch, hidden_size, rank, num_slices,
                            add_inputs=None, moe_intermediate_size=None):
        return dict(SHRINK_DEFAULT if op_type == "shrink" else EXPAND_DEFAULT)

    mods = {op: SimpleNamespace(get_lora_op_configs=get_lora_op_configs) for op in lt.OPS}

    def run(cfg, cost, out):
        if clock.recording:
            clock.captured += cost(cfg)
        if cost(cfg) == 0.5 or (evil_default and cfg["num_warps"] == 4):
            out.view(-1)[3] += 10.0

    def shrink(x, ws, out, mapping, _s, _n, _l, lora_ids, _f, _a, scale):
        cfg = mods["shrink"].get_lora_op_configs("shrink", max_loras=lora_ids.size(0),
                                                 batch=x.size(0), hidden_size=x.size(1),
                                                 rank=ws[0].shape[-2], num_slices=len(ws))
        out.zero_()
        for s, w in enumerate(ws):
            out[s] = scale * torch.einsum("mk,mrk->mr", x.float(), w[mapping.long(), 0].float())
        run(cfg, _shrink_cost, out)

    def expand(buf, ws, y, mapping, _s, _n, _l, lora_ids, _f, _a, offset_start, add_inputs):
        cfg = mods["expand"].get_lora_op_configs(
            op_type="expand", max_loras=lora_ids.size(0), batch=buf.size(1),
            hidden_size=max(w.shape[2] for w in ws), rank=ws[0].shape[-1],
            num_slices=len(ws), add_inputs=add_inputs)
        off = offset_start
        for s, w in enumerate(ws):
            part = torch.einsum("mr,msr->ms", buf[s].to(w.dtype).float(),
                                w[mapping.long(), 0].float()).to(y.dtype)
            sl = y[:, off:off + w.shape[2]]
            sl.copy_(sl + part if add_inputs else part)
            off += w.shape[2]
        run(cfg, _expand_cost, y)

    utils = SimpleNamespace(is_batch_invariant=False, get_lora_op_configs=get_lora_op_configs,
                            load_lora_op_config=functools.lru_cache(lambda *a: None),
                            _LORA_A_PTR_DICT={}, _LORA_B_PTR_DICT={})
    return SimpleNamespace(meta=meta.LoRAKernelMeta, shrink=shrink, expand=expand,
                           modules=mods, utils=utils,
                           captured_counts=lambda n, spec: [n + 1])


def test_tune_end_to_end_with_stand_in_cuda(monkeypatch, tmp_path):
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/elsewhere")
    wls = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, [1])
    metrics, samples = tlk.tune(wls, str(tmp_path), 1, "bfloat16", False, "cpu", 60)
    import os
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == "/elsewhere"  # restored
    shrink, expand = metrics["keys"]
    assert shrink["status"] == expand["status"] == "tuned"
    assert (shrink["config"]["block_k"], shrink["config"]["split_k"]) == (128, 32)
    assert (shrink["default_us"], shrink["tuned_us"]) == (4.0, 2.0)
    assert (expand["config"]["block_n"], expand["config"]["num_warps"]) == (64, 2)
    assert (expand["default_us"], expand["tuned_us"]) == (3.0, 1.0)
    assert shrink["rejected_wrong_output"] >= 1 and expand["rejected_wrong_output"] >= 1
    assert shrink["candidates"] == 1 + len(lt.parameter_grid(wls[0].key))
    assert all(s["us"] is None for s in samples if s["config"].get("block_n") == 256)
    assert metrics["gpu"] == "FAKE GPU-1" and metrics["config_folder"] == str(tmp_path)
    for wl, row in zip(wls, metrics["keys"]):
        data = json.loads((tmp_path / lt.config_filename("FAKE GPU-1", wl.key.op,
                                                         wl.key.add_inputs)).read_text())
        k = wl.key
        assert lt.lookup_config(data, k.max_loras, k.num_slices, k.m, k.k, k.n) == row["config"]

    late = tlk.tune(wls, str(tmp_path / "late"), 1, "bfloat16", False, "cpu", 1e-9)[0]
    assert [r["status"] for r in late["keys"]] == ["skipped_budget"] * 2
    assert [r["config"] for r in late["keys"]] == [SHRINK_DEFAULT, EXPAND_DEFAULT]


def test_tune_stops_when_the_default_disagrees_with_torch(monkeypatch, tmp_path):
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock, evil_default=True))
    wls = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, [1])
    with pytest.raises(RuntimeError, match="torch reference"):
        tlk.tune(wls, str(tmp_path), 1, "bfloat16", False, "cpu", 60)
    assert not list(tmp_path.iterdir())


def test_tune_keeps_the_default_when_confirmation_reverses(monkeypatch, tmp_path):
    """A candidate that looked faster in the search but not in the interleaved confirmation
    replays (noise, winner's curse) loses to vLLM's default."""
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock))
    monkeypatch.setattr(tlk, "_confirm", lambda bench, graphs, default, best: (2.0, 2.1))
    wls = lt.enumerate_workloads(MISTRAL, ["qkv_proj"], 16, 1, [1])
    rows = tlk.tune(wls, str(tmp_path), 1, "bfloat16", False, "cpu", 60)[0]["keys"]
    assert [r["status"] for r in rows] == ["default_kept"] * 2
    assert [r["config"] for r in rows] == [SHRINK_DEFAULT, EXPAND_DEFAULT]
    assert all(r["default_us"] == r["tuned_us"] == 2.0 for r in rows)


def test_main_ok_result_follows_the_schema(monkeypatch, tmp_path, result_validator):
    import tune_lora_kernels as tlk
    clock = SimpleNamespace(now=0.0, recording=False, captured=0.0)
    _fake_cuda(monkeypatch, clock)
    monkeypatch.setattr(tlk, "vllm_lora_ops", lambda: _fake_ops(clock))
    monkeypatch.setattr(tlk, "cuda_missing_reason", lambda device: None)
    out = tmp_path / "tuning.json"
    res = tlk.main(MISTRAL, ["qkv_proj", "experts"], 16, 1, [1], str(tmp_path / "cfg"),
                   str(out), device="cpu", model="m")
    saved = json.loads(out.read_text())
    result_validator.validate(saved)
    assert res["status"] == saved["status"] == "ok"
    assert saved["params"]["not_tuned_modules"] == ["experts"]
    assert saved["metrics"]["status_counts"] == {"tuned": 2}
    assert len(saved["metrics"]["files"]) == 2 and len(saved["samples"]) > 20
    del saved["metrics"]["files"]
    with pytest.raises(Exception, match="files"):
        result_validator.validate(saved)


def test_main_with_only_fused_moe_modules_is_unsupported(monkeypatch, tmp_path):
    import tune_lora_kernels as tlk
    monkeypatch.setattr(tlk, "cuda_missing_reason", lambda device: None)
    res = tlk.main({**MISTRAL, "num_local_experts": 8}, ["experts"], 16, 1, [1],
                   str(tmp_path / "cfg"), str(tmp_path / "t.json"))
    assert res["status"] == "unsupported" and "fused MoE" in res["reason"]
