"""Every rule script's main() called directly on real tiny models (CPU, no network).

One session-scoped pipeline synthesizes a tiny Llama and a tiny Mixtral through
fetch_model.main and runs the later steps on them lazily; each test asserts on the JSON
results it needs. Nothing here is a stand-in: the engine is the real HF engine
(bitsandbytes NF4 + PEFT), quantization for vLLM is real llmcompressor.
"""
import json
import re
from pathlib import Path

import pytest

from conftest import data_pixels

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import aggregate  # noqa: E402
import bench  # noqa: E402
import fetch_model  # noqa: E402
import make_adapter  # noqa: E402
import measure_bandwidth  # noqa: E402
import plots  # noqa: E402
import profile_memory  # noqa: E402
import quantize  # noqa: E402
import report  # noqa: E402
import validate  # noqa: E402

LLAMA_ARCH = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
              "max_position_embeddings": 256, "initializer_range": 0.1}
MIXTRAL_ARCH = {**LLAMA_ARCH, "num_local_experts": 4, "num_experts_per_tok": 2}
MODELS = {
    "tiny-llama": {"source": "synthetic", "architecture": "llama", "arch": LLAMA_ARCH,
                   "seed": 0, "engines": ["hf"], "adapters": ["r16-qv"]},
    "tiny-mixtral": {"source": "synthetic", "architecture": "mixtral", "arch": MIXTRAL_ARCH,
                     "seed": 0, "engines": ["hf"], "adapters": ["r16-qv"]},
}
ENGINES = {
    "hf": {"backend": "hf", "quantization": "nf4", "compute_dtype": "float32",
           "mode": "generate"},
    # a deliberately broken configuration: the fused MoE experts stay bf16
    "hf-noexp": {"backend": "hf", "quantization": "nf4", "compute_dtype": "float32",
                 "mode": "generate", "quantize_experts": False},
    "vllm": {"backend": "vllm", "quantization": "w4a16", "group_size": 64},
}
ADAPTERS = {
    "r16-qv": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"], "seed": 1,
               "b_std": 0.02},
    # a deliberately broken adapter: B is all zero, so it cannot change anything
    "r16-zero": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"], "seed": 1,
                 "b_std": 0.0},
    # two distinct copies, timed together as lora-x2 (tests below set multi_adapter [2])
    "r16-qv-x2": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"], "seed": 1,
                  "b_std": 0.02, "copies": 2},
    "r8-gate-up": {"rank": 8, "alpha": 16, "target_modules": ["gate_up_proj"], "seed": 3},
    "r8-experts": {"rank": 8, "alpha": 16, "seed": 4, "copies": 2,
                   "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
}
BENCH = {"batch_sizes": [1, 2], "prompt_tokens": 16, "output_tokens": 8, "warmup": 1,
         "min_iterations": 2, "min_seconds": 0, "max_iterations": 2, "max_warmup": 2,
         "multi_adapter": []}
# config/offline-cpu.yaml's validation section, with fewer and shorter prompts
VALIDATION = {"prompts": 2, "prompt_tokens": 16, "perplexity": {"seq_len": 32, "max_sequences": 2}}
CONFIG = {"engines": ENGINES, "adapters": ADAPTERS, "benchmark": BENCH}
LORA_MOVES = "adapter.moves_logprobs"
EXPERTS_4BIT = "base.coverage.experts"


def plan(model, engine, adapter=None, engine_cfg=None, bench_cfg=None):
    """The job plan the Snakefile would give this job (int4lora.config.job_plan)."""
    from int4lora.config import job_plan
    cfg = CONFIG if engine_cfg is None else {**CONFIG, "engines": {**ENGINES, engine: engine_cfg}}
    if bench_cfg is not None:
        cfg = {**cfg, "benchmark": bench_cfg}
    return job_plan(cfg, model, engine, adapter)


class Pipeline:
    """The results/ tree of one session, built step by step and memoized (the `pipe` fixture
    of conftest.py, shared with test_scripts_checks.py)."""

    def __init__(self, root: Path):
        self.root = root
        self.results = root / "results"
        self.cache = str(root / "cache")
        self.done = {}

    def path(self, *parts) -> str:
        return str(self.results.joinpath(*parts))

    def _once(self, key, fn):
        if key not in self.done:
            self.done[key] = fn()
        return self.done[key]

    def model(self, model):
        return self._once(("fetch", model), lambda: fetch_model.main(
            model, MODELS[model], self.cache, self.path("models", f"{model}.json")))

    def quant(self, model, engine):
        self.model(model)
        return self._once(("quantize", model, engine), lambda: quantize.main(
            model, engine, ENGINES[engine], self.path("models", f"{model}.json"), self.cache,
            self.path("quantize", model, f"{engine}.json")))

    def adapter(self, model, adapter):
        self.model(model)
        return self._once(("adapter", model, adapter), lambda: make_adapter.main(
            model, adapter, ADAPTERS[adapter], self.path("models", f"{model}.json"),
            self.cache, self.path("adapters", model, f"{adapter}.json")))

    def bandwidth(self):
        return self._once(("bandwidth",), lambda: measure_bandwidth.main(
            "cpu", self.path("hardware", "bandwidth.json"), size_mib=8, repeats=3))

    def bench(self, model, engine, adapter=None):
        self.quant(model, engine)
        self.bandwidth()
        if adapter:
            self.adapter(model, adapter)
        name = adapter or "baseline"
        return self._once(("bench", model, engine, name), lambda: bench.main(
            model, engine, plan(model, engine, adapter), self.path("models", f"{model}.json"),
            self.path("quantize", model, f"{engine}.json"), BENCH, "cpu",
            self.path("bench", model, engine, f"{name}.json"),
            adapter_json=self.path("adapters", model, f"{adapter}.json") if adapter else None,
            bandwidth_json=self.path("hardware", "bandwidth.json")))

    def memory(self, model, engine, adapter=None):
        self.quant(model, engine)
        if adapter:
            self.adapter(model, adapter)
        name = adapter or "none"
        return self._once(("memory", model, engine, name), lambda: profile_memory.main(
            model, engine, plan(model, engine, adapter), self.path("models", f"{model}.json"),
            self.path("quantize", model, f"{engine}.json"), BENCH, "cpu",
            self.path("memory", model, engine, f"{name}.json"),
            adapter_json=self.path("adapters", model, f"{adapter}.json") if adapter else None))

    def validate(self, model, engine, adapter):
        self.quant(model, engine)
        self.adapter(model, adapter)
        return self._once(("validate", model, engine, adapter), lambda: validate.main(
            model, engine, plan(model, engine, adapter), self.path("models", f"{model}.json"),
            self.path("quantize", model, f"{engine}.json"),
            self.path("adapters", model, f"{adapter}.json"), VALIDATION, "cpu",
            self.path("validate", model, engine, f"{adapter}.json")))


def _read(path):
    return json.loads(Path(path).read_text())


def _check(result, check_id):
    return next(c for c in result["metrics"]["checks"] if c["check_id"] == check_id)


# --------------------------------------------------------------------------- fetch_model

def test_fetch_model_synthesizes_into_cache(pipe, result_validator):
    for name, moe in (("tiny-llama", False), ("tiny-mixtral", True)):
        res = _read(pipe.path("models", f"{name}.json"))
        result_validator.validate(res)
        m = res["metrics"]
        assert res["status"] == "ok" and res["kind"] == "fetch"
        assert m["synthetic"] is True and m["moe"] is moe
        assert Path(m["path"]).is_relative_to(Path(pipe.cache).resolve())
        assert (Path(m["path"]) / ".complete").exists()
        assert list(Path(m["path"]).glob("*.safetensors"))
        assert m["weight_bytes_on_disk"] > 0
        assert m["architecture"]["hidden_size"] == 128
        assert m["architecture"].get("num_local_experts") == (4 if moe else None)


def test_fetch_model_is_cached_by_spec(pipe):
    out = pipe.path("models", "again.json")
    res = fetch_model.main("tiny-llama", MODELS["tiny-llama"], pipe.cache, out)
    first = _read(pipe.path("models", "tiny-llama.json"))
    assert res["metrics"]["cached"] is True
    assert res["metrics"]["path"] == first["metrics"]["path"]
    Path(out).unlink()


# --------------------------------------------------------------------------- quantize

def test_quantize_hf_records_nf4_recipe(pipe, result_validator):
    res = pipe.quant("tiny-llama", "hf")
    result_validator.validate(_read(pipe.path("quantize", "tiny-llama", "hf.json")))
    assert res["status"] == "ok"
    recipe = res["metrics"]["recipe"]
    assert recipe["quant_type"] == "nf4" and recipe["double_quant"] is True
    assert recipe["when"] == "at load" and recipe["quantize_fused_experts"] is True
    assert res["metrics"]["path"] == pipe.model("tiny-llama")["metrics"]["path"]
    assert pipe.quant("tiny-mixtral", "hf-noexp")["metrics"]["recipe"][
        "quantize_fused_experts"] is False


def _tensor_names(ckpt_dir):
    from safetensors import safe_open
    names = set()
    for f in Path(ckpt_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names |= set(fh.keys())
    return names


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_quantize_w4a16_writes_packed_checkpoint(pipe, model, result_validator):
    res = pipe.quant(model, "vllm")
    result_validator.validate(_read(pipe.path("quantize", model, "vllm.json")))
    assert res["status"] == "ok", res["reason"]
    m = res["metrics"]
    assert m["recipe"]["scheme"] == "W4A16" and m["recipe"]["group_size"] == 64
    ckpt = Path(m["path"])
    assert ckpt.is_relative_to(Path(pipe.cache).resolve()) and (ckpt / ".complete").exists()
    assert m["checkpoint_bytes"] > 0
    names = _tensor_names(ckpt)
    packed = {n for n in names if n.endswith(".weight_packed")}
    assert any("self_attn.q_proj" in n for n in packed)
    assert not any(n.startswith("lm_head") and n.endswith("weight_packed") for n in names)
    cfg = json.loads((ckpt / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    assert qcfg["format"] == "pack-quantized"
    if model == "tiny-mixtral":
        expert = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight_packed$")
        found = {(m_.group(1), m_.group(2)) for n in packed if (m_ := expert.search(n))}
        # 2 layers share the keys below; every expert of every layer has w1, w2 and w3
        assert found == {(str(e), w) for e in range(4) for w in ("w1", "w2", "w3")}
        assert sum(bool(expert.search(n)) for n in packed) == 2 * 4 * 3
        assert not any(re.search(r"experts\.\d+\.(gate|up|down)_proj", n) for n in names)
        assert m["expert_tensors_renamed_for_vllm"] > 0
        # the router stays in 16 bit
        assert any(n.endswith("block_sparse_moe.gate.weight") for n in names)
    else:
        assert any("mlp.down_proj" in n for n in packed)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_dequantized_w4a16_reference_is_the_original_up_to_int4_error(pipe, model):
    """The vLLM engine's fp32 reference: every weight maps back (Mixtral w1/w2/w3 fused into
    gate_up_proj/down_proj), with the relative error of 4-bit RTN, not of a wrong mapping."""
    import torch
    from transformers import AutoModelForCausalLM

    from int4lora.reference import dequantized_compressed_model

    quant = pipe.quant(model, "vllm")["metrics"]["path"]
    original_dir = _read(pipe.path("models", f"{model}.json"))["metrics"]["path"]
    deq = dequantized_compressed_model(quant, original_dir, "cpu").state_dict()
    orig = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).state_dict()
    assert set(deq) == set(orig)
    quantized = [k for k in orig if k.endswith(("proj.weight", "gate_up_proj", "down_proj"))
                 and "embed" not in k and not k.endswith("mlp.gate.weight")]
    assert quantized
    for key in quantized:
        rel = ((deq[key] - orig[key]).norm() / orig[key].norm()).item()
        assert 0.01 < rel < 0.2, (key, rel)  # int4 group-64 RTN on Gaussian weights: ~0.1
    for key in set(orig) - set(quantized):
        assert torch.equal(deq[key], orig[key]), key


def test_quantize_w4a16_cached_second_time(pipe):
    pipe.quant("tiny-llama", "vllm")
    out = pipe.path("quantize", "tiny-llama", "vllm-again.json")
    res = quantize.main("tiny-llama", "vllm", ENGINES["vllm"],
                        pipe.path("models", "tiny-llama.json"), pipe.cache, out)
    assert res["metrics"]["cached"] is True
    Path(out).unlink()


@pytest.fixture(scope="session")
def wide_llama(pipe):
    """A Llama whose MLP is 320 wide: group_size 128 does not divide down_proj's columns."""
    spec = {**MODELS["tiny-llama"], "arch": {**LLAMA_ARCH, "intermediate_size": 320}}
    out = pipe.path("models", "wide-llama.json")
    fetch_model.main("wide-llama", spec, pipe.cache, out)
    return out


def test_quantize_w4a16_indivisible_group_is_unsupported(pipe, wide_llama, result_validator):
    out = pipe.path("quantize", "wide-llama", "vllm128.json")
    res = quantize.main("wide-llama", "vllm128", {"backend": "vllm", "quantization": "w4a16",
                                                  "group_size": 128},
                        wide_llama, pipe.cache, out)
    result_validator.validate(_read(out))
    assert res["status"] == "unsupported"
    assert "group_size=128" in res["reason"]
    assert "model.layers.0.mlp.down_proj" in res["reason"]
    assert "in_features=320" in res["reason"]
    assert not list((Path(pipe.cache) / "quantized").glob("wide-llama-*"))


def test_quantize_w4a16_indivisible_moe_experts_is_unsupported(pipe):
    spec = {**MODELS["tiny-mixtral"], "arch": {**MIXTRAL_ARCH, "intermediate_size": 320}}
    fetch_model.main("wide-mixtral", spec, pipe.cache, pipe.path("models", "wide-mixtral.json"))
    res = quantize.main("wide-mixtral", "vllm128", {"backend": "vllm", "quantization": "w4a16",
                                                    "group_size": 128},
                        pipe.path("models", "wide-mixtral.json"), pipe.cache,
                        pipe.path("quantize", "wide-mixtral", "vllm128.json"))
    assert res["status"] == "unsupported"
    assert "experts" in res["reason"]


# --------------------------------------------------------------------------- make_adapter

def _adapter_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_make_adapter_nonzero_b_and_zero_b_control(pipe, result_validator):
    res = pipe.adapter("tiny-llama", "r16-qv")
    result_validator.validate(_read(pipe.path("adapters", "tiny-llama", "r16-qv.json")))
    assert res["status"] == "ok"
    m = res["metrics"]
    assert m["targets"] == ["q_proj", "v_proj"] and m["rank"] == 16
    # 2 layers x (q, v) x (A, B)
    assert m["lora_tensors"] == 8
    # A: r x 128 for q and v; B: 128 x r (q) and 64 x r (v, 2 kv heads of 32)
    assert m["parameters"] == 2 * (16 * 128 + 128 * 16 + 16 * 128 + 64 * 16)
    assert m["bytes"] == m["parameters"] * 2  # bfloat16
    adapter = _adapter_tensors(m["paths"][0])
    control = _adapter_tensors(m["control_path"])
    assert set(adapter) == set(control) and len(adapter) == 8
    for name, t in adapter.items():
        assert t.abs().sum() > 0, name
    for name, t in control.items():
        if "lora_B" in name:
            assert t.abs().sum() == 0, name
        else:
            assert t.abs().sum() > 0, name
    cfg = json.loads((Path(m["paths"][0]) / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_make_adapter_is_deterministic(pipe):
    first = _adapter_tensors(pipe.adapter("tiny-llama", "r16-qv")["metrics"]["paths"][0])
    out = pipe.path("adapters", "tiny-llama", "again.json")
    again = make_adapter.main("tiny-llama", "again", ADAPTERS["r16-qv"],
                              pipe.path("models", "tiny-llama.json"), pipe.cache, out)
    second = _adapter_tensors(again["metrics"]["paths"][0])
    assert all((first[k] == second[k]).all() for k in first)
    Path(out).unlink()


def test_make_adapter_writes_expert_adapters_in_the_layout_vllm_loads(pipe):
    """vLLM 0.26 silently ignores PEFT's 3D expert layout: make_adapter writes every copy and
    the control again, per expert, under vLLM's Mixtral names (w1 gate, w3 up, w2 down)."""
    m = pipe.adapter("tiny-mixtral", "r8-experts")["metrics"]
    assert len(m["paths"]) == len(m["vllm_paths"]) == 2
    for peft_dir, vllm_dir in zip(m["paths"] + [m["control_path"]],
                                  m["vllm_paths"] + [m["vllm_control_path"]]):
        assert vllm_dir == peft_dir + "-vllm"
        names = set(_adapter_tensors(vllm_dir))
        # 2 layers x 4 experts x 3 projections x (A, B)
        assert len(names) == 2 * 4 * 3 * 2
        assert "base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight" \
            in names
    assert m["vllm_conversion"]["num_experts"] == 4
    dense = pipe.adapter("tiny-llama", "r16-qv")["metrics"]
    assert dense["vllm_paths"] == dense["paths"] and dense["vllm_conversion"] is None


def test_make_adapter_fused_expert_module_target_is_unsupported(pipe, result_validator):
    res = pipe.adapter("tiny-mixtral", "r8-gate-up")
    result_validator.validate(_read(pipe.path("adapters", "tiny-mixtral", "r8-gate-up.json")))
    assert res["status"] == "unsupported"
    assert "gate_up_proj" in res["reason"]


# --------------------------------------------------------------------------- bandwidth

def test_measure_bandwidth_cpu(pipe, result_validator):
    res = pipe.bandwidth()
    result_validator.validate(_read(pipe.path("hardware", "bandwidth.json")))
    assert res["status"] == "ok"
    assert res["metrics"]["bandwidth_bytes_s"] > 1e8  # any real machine copies > 100 MB/s
    assert res["metrics"]["bandwidth"]["n"] == 3 and len(res["samples"]) == 3


# --------------------------------------------------------------------------- bench

def test_bench_baseline(pipe, result_validator):
    res = pipe.bench("tiny-llama", "hf")
    result_validator.validate(_read(pipe.path("bench", "tiny-llama", "hf", "baseline.json")))
    assert res["status"] == "ok", res["reason"]
    assert res["adapter"] == "none" and res["params"]["mode"] == "baseline"
    m = res["metrics"]
    assert {(r["variant"], r["batch"]) for r in m["runs"]} == {("base", 1), ("base", 2)}
    for run in m["runs"]:
        assert run["status"] == "ok"
        for key in ("ttft_s", "tpot_s", "e2e_s", "e2e_tok_s", "decode_tok_s", "prefill_tok_s"):
            assert run[key]["n"] == 2
            assert run[key]["median"] > 0
            # two samples support neither a p90 nor a confidence interval
            assert run[key]["p90"] is None and run[key]["p99"] is None
            assert run[key]["ci_low"] is None
    for sample in res["samples"]:  # the definitions, exactly
        assert sample["decode_tok_s"] == pytest.approx(sample["batch"] / sample["tpot_s"])
        assert sample["e2e_tok_s"] == pytest.approx(sample["output_tokens"] / sample["e2e_s"])
        assert run["output_tokens"] == 8 * run["batch"]
        assert run["prompt_tokens"] == 16 * run["batch"]
        assert 0 < run["roofline_fraction"] and run["bytes_per_step"] > 0
    assert m["overhead"] == []
    assert len(res["samples"]) == 2 * 2
    assert all(len(ids) == 8 for o in m["outputs"].values() for ids in o.values())
    assert m["weight_storage"]["families"]["attention"]["share_4bit"] == 1.0


def test_bench_lora(pipe, result_validator):
    res = pipe.bench("tiny-llama", "hf", "r16-qv")
    result_validator.validate(_read(pipe.path("bench", "tiny-llama", "hf", "r16-qv.json")))
    assert res["status"] == "ok", res["reason"]
    m = res["metrics"]
    assert {(r["variant"], r["batch"]) for r in m["runs"]} == {
        (v, b) for v in ("lora-base", "lora-adapter") for b in (1, 2)}
    for run in m["runs"]:
        assert all(run[k]["n"] == 2 and run[k]["median"] > 0
                   for k in ("ttft_s", "tpot_s", "e2e_s", "e2e_tok_s"))
    assert {(o["batch"], o["numerator"], o["denominator"]) for o in m["overhead"]} == {
        (1, "lora-adapter", "lora-base"), (2, "lora-adapter", "lora-base")}
    for o in m["overhead"]:
        assert o["tpot_ratio"]["n"] == 2 and o["tpot_ratio"]["median"] > 0
    assert len(res["samples"]) == 2 * 2 * 2
    for batch, outs in m["outputs"].items():
        assert len(outs["lora-adapter"]) == len(outs["lora-base"]) == 8
        # the check that fails if the adapter were not applied
        assert outs["lora-adapter"] != outs["lora-base"], batch
    assert m["adapter_bytes"] == pipe.adapter("tiny-llama", "r16-qv")["metrics"]["bytes"]
    # the adapter's requests read more bytes per step than base requests
    rows = {(r["variant"], r["batch"]): r for r in m["runs"]}
    assert rows[("lora-adapter", 1)]["bytes_per_step"] > rows[("lora-base", 1)]["bytes_per_step"]


def test_bench_base_outputs_match_between_baseline_and_lora_engines(pipe):
    base = pipe.bench("tiny-llama", "hf")["metrics"]["outputs"]
    lora = pipe.bench("tiny-llama", "hf", "r16-qv")["metrics"]["outputs"]
    assert base["1"]["base"] == lora["1"]["lora-base"]


def test_bench_vllm_on_cpu_is_unsupported(pipe, result_validator):
    res = pipe.bench("tiny-llama", "vllm", "r16-qv")
    result_validator.validate(_read(pipe.path("bench", "tiny-llama", "vllm", "r16-qv.json")))
    assert res["status"] == "unsupported"
    assert "CUDA" in res["reason"]
    assert res["samples"] == []


def test_bench_propagates_upstream_failure(pipe, result_validator):
    out = str(pipe.root / "scratch" / "bench-r8-gate-up.json")  # outside results/
    pipe.quant("tiny-mixtral", "hf")
    pipe.adapter("tiny-mixtral", "r8-gate-up")
    res = bench.main("tiny-mixtral", "hf", plan("tiny-mixtral", "hf", "r8-gate-up"),
                     pipe.path("models", "tiny-mixtral.json"),
                     pipe.path("quantize", "tiny-mixtral", "hf.json"), BENCH, "cpu", out,
                     adapter_json=pipe.path("adapters", "tiny-mixtral", "r8-gate-up.json"))
    result_validator.validate(_read(out))
    assert res["status"] == "unsupported" and res["reason"].startswith("adapter step:")


# --------------------------------------------------------------------------- profile_memory

@pytest.mark.parametrize("adapter", [None, "r16-qv"])
def test_profile_memory(pipe, adapter, result_validator):
    res = pipe.memory("tiny-llama", "hf", adapter)
    result_validator.validate(_read(pipe.path("memory", "tiny-llama", "hf",
                                              f"{adapter or 'none'}.json")))
    assert res["status"] == "ok", res["reason"]
    m = res["metrics"]
    assert m["batch"] == 2 and m["context_tokens"] == 16 + 8
    # 2 x layers x kv heads x head_dim x tokens x batch x 4 bytes (fp32 compute: fp32 K/V)
    assert m["kv_cache_bytes"] == 2 * 2 * 2 * 32 * 24 * 2 * 4
    # the baseline is taken after the engine's libraries are imported
    assert m["before_load"]["rss_bytes"] > 200e6
    assert m["weight_bytes"] == m["weight_storage"]["total_bytes"] > 0
    assert m["adapter_bytes"] == (0 if adapter is None else
                                  pipe.adapter("tiny-llama", "r16-qv")["metrics"]["bytes"])
    assert m["peak_bytes"] >= m["after_load"]["rss_bytes"] > 0
    assert set(m["attribution"]) == {"runtime_before_load", "weights", "adapter", "kv_cache",
                                     "activations_and_other"}
    assert m["engine_info"]["adapters"] == ([] if adapter is None else [adapter])


# --------------------------------------------------------------------------- validate

def test_validate_pass(pipe, result_validator):
    res = pipe.validate("tiny-llama", "hf", "r16-qv")
    result_validator.validate(_read(pipe.path("validate", "tiny-llama", "hf", "r16-qv.json")))
    assert res["status"] == "ok", res["reason"]
    m = res["metrics"]
    assert m["verdict"] == "PASS", m["failed"]
    assert m["failed"] == []
    verdicts = {c["check_id"]: c["verdict"] for c in m["checks"]}
    assert verdicts["base.coverage.linear"] == "PASS"
    assert _check(res, LORA_MOVES)["verdict"] == "PASS"
    for control in ("control.same_call", "control.cross_call"):
        assert _check(res, control)["verdict"] == "PASS"
        assert _check(res, control)["value"] <= _check(res, control)["limit"]
    assert _check(res, "control.top1")["value"] == 0.0
    assert _check(res, "adapter.agreement.effect")["verdict"] == "PASS"
    assert _check(res, "adapter.effect_over_noise")["verdict"] == "PASS"
    assert _check(res, "adapter.applied")["value"] == 1.0
    # synthetic weights: quality checks are reported, not judged
    assert _check(res, "base.quality.ppl_ratio")["verdict"] == "N/A"
    assert EXPERTS_4BIT not in verdicts  # dense model
    floor = m["noise_floor"]["base"]
    assert floor["pairs"] == 15 and floor["max"] < 1e-3  # fp32 HF on the CPU: tight
    assert m["lora"]["adapter"]["max_abs_delta"] > 1e-3


def test_validate_fails_an_adapter_without_effect(pipe, result_validator):
    res = pipe.validate("tiny-llama", "hf", "r16-zero")
    result_validator.validate(_read(pipe.path("validate", "tiny-llama", "hf", "r16-zero.json")))
    assert res["status"] == "ok"
    m = res["metrics"]
    assert m["verdict"] == "FAIL"
    moved = _check(res, LORA_MOVES)
    assert moved["verdict"] == "FAIL"
    assert moved["value"] < moved["limit"]
    assert "no effect" in moved["reason"]
    assert LORA_MOVES in m["failed"]
    assert _check(res, "adapter.effect_over_noise")["verdict"] == "FAIL"
    # the base model is fine: only adapter checks fail
    assert m["verdict_base"] == "PASS"


def test_validate_fails_moe_with_bf16_experts(pipe, result_validator):
    res = pipe.validate("tiny-mixtral", "hf-noexp", "r16-qv")
    result_validator.validate(_read(pipe.path("validate", "tiny-mixtral", "hf-noexp",
                                              "r16-qv.json")))
    assert res["status"] == "ok", res["reason"]
    m = res["metrics"]
    assert m["verdict"] == "FAIL" and m["moe"] is True
    experts = _check(res, EXPERTS_4BIT)
    assert experts["verdict"] == "FAIL"
    assert experts["value"] == 0.0
    assert "experts" in experts["reason"]
    assert EXPERTS_4BIT in m["failed"] and m["verdict_base"] == "FAIL"
    # the attention weights are still 4-bit: only the experts check fails for coverage
    assert _check(res, "base.coverage.linear")["verdict"] == "PASS"


# --------------------------------------------------------------------------- aggregate/plots/report

@pytest.fixture(scope="session")
def reported(pipe):
    """The rest of the DAG over this session's results: aggregate -> plots -> report."""
    pipe.bench("tiny-llama", "hf")
    pipe.bench("tiny-llama", "hf", "r16-qv")
    pipe.bench("tiny-llama", "hf", "r16-zero")      # validation FAILs: rows must be marked
    pipe.bench("tiny-mixtral", "hf-noexp")           # coverage FAILs: baseline marked too
    pipe.bench("tiny-llama", "vllm", "r16-qv")       # unsupported on the CPU
    pipe.memory("tiny-llama", "hf")
    pipe.memory("tiny-llama", "hf", "r16-qv")
    pipe.validate("tiny-llama", "hf", "r16-qv")
    pipe.validate("tiny-llama", "hf", "r16-zero")
    pipe.validate("tiny-mixtral", "hf-noexp", "r16-qv")
    inputs = sorted(str(p) for stage in ("bench", "memory", "validate")
                    for p in (pipe.results / stage).rglob("*.json"))
    tables = pipe.path("tables")
    frames = aggregate.main(inputs, tables)
    figures = plots.main(tables, pipe.path("figures"))
    md, html = pipe.path("report", "report.md"), pipe.path("report", "index.html")
    text = report.main(tables, pipe.path("figures"), md, html, "pytest",
                       "tiny models for the test suite", [], MODELS, ENGINES)
    return {"inputs": inputs, "frames": frames, "tables": Path(tables), "figures": figures,
            "md": Path(md), "html": Path(html), "text": text}


def test_aggregate_tables(reported):
    for name in aggregate.TABLES:
        assert (reported["tables"] / f"{name}.csv").exists(), name
    f = reported["frames"]
    bench = f["bench"]
    assert set(bench["variant"]) == {"base", "lora-base", "lora-adapter"}
    # baseline (2 batches) x 2 models + 2 lora benches x 2 variants x 2 batches
    assert len(bench) == 2 * 2 + 2 * 2 * 2
    assert {"tpot_s_median", "tpot_s_ci_low", "tpot_s_ci_high", "tpot_s_p90", "tpot_s_p99",
            "tpot_s_std", "tpot_s_n", "decode_tok_s_median", "validated", "setting"} <= set(
        bench.columns)
    assert (bench["tpot_s_n"] == 2).all()
    assert len(f["overhead"]) == 2 * 2
    status = f["status"]
    assert len(status) == len(reported["inputs"])
    bad = status[status["status"] != "ok"]
    assert list(bad["engine"]) == ["vllm"] and list(bad["status"]) == ["unsupported"]
    assert (f["validation"]["verdict"].isin(["PASS", "FAIL", "N/A"])).all()
    assert set(f["coverage"]["family"]) >= {"attention", "dense_mlp", "experts"}
    memory = f["memory"]
    assert set(memory["source"]) == {"profile_memory", "bench sweep"}


def test_plots_written(reported):
    pngs = {Path(p).stem: Path(p) for p in reported["figures"]}
    assert set(pngs) == set(plots.FIGURES)
    for name, p in pngs.items():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        # drawn from rows: a "no ... rows" placeholder has no pixel in the data colour, the
        # sparsest figure here (tiny weights beside the process baseline) about 100;
        # no configuration here profiles its decode
        if name == "decode_time":
            assert data_pixels(p) == 0
        else:
            assert data_pixels(p) > 50, name


def test_report_markdown(reported):
    text = reported["md"].read_text()
    assert text == reported["text"]
    text = re.sub(r'<a id="[^"]*"></a>', "", text)  # the rows' anchors
    assert "## Verdicts" in text
    # the summary comes first; a number whose checks failed says so where it appears
    assert text.index("## Summary") < text.index("## Verdicts") < text.index("## Latency")
    summary = text.split("## Summary")[1].split("\n## ")[0]
    zero = next(line for line in summary.splitlines() if line.startswith(
        "| tiny-llama | hf · NF4 | r16-zero |"))
    assert "[FAIL](#verdict-tiny-llama-hf-r16-zero)" in zero and "(FAIL: do not trust)" in zero
    good = next(line for line in summary.splitlines() if line.startswith(
        "| tiny-llama | hf · NF4 | r16-qv |"))
    assert "[PASS]" in good and "do not trust" not in good and "unvalidated" not in good
    verdict_section = text.split("## Verdicts")[1].split("<details>")[0]
    assert re.search(r"\| tiny-llama \| hf \| r16-qv \| PASS \| PASS \|", verdict_section)
    # a zero-B adapter fails the adapter, not the base model
    assert re.search(r"\| tiny-llama \| hf \| r16-zero \| FAIL \| PASS \| adapter: moves",
                     verdict_section)
    assert re.search(r"\| tiny-mixtral \| hf-noexp \| r16-qv \| FAIL \| FAIL \| "
                     r"coverage: MoE expert", verdict_section)
    latency = text.split("## Latency and throughput")[1].split("\n## ")[0]
    rows = [line for line in latency.splitlines() if line.startswith("| tiny-")]
    assert len(rows) == 12
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert {c[2] for c in cells} == {"NF4"}  # the engine setting each row ran with
    by_key = {(c[0], c[1], c[3], c[4], c[5]): r for c, r in zip(cells, rows)}
    for batch in ("1", "2"):
        assert by_key[("tiny-llama", "hf", "r16-zero", "lora-adapter", batch)].rstrip(
            " |").endswith("FAIL: do not trust")
        assert by_key[("tiny-mixtral", "hf-noexp", "none", "base", batch)].rstrip(
            " |").endswith("FAIL: do not trust")
        assert by_key[("tiny-llama", "hf", "r16-qv", "lora-adapter", batch)].rstrip(
            " |").endswith("| PASS")
        assert by_key[("tiny-llama", "hf", "none", "base", batch)].rstrip(" |").endswith("| PASS")
    # the unsupported configuration is shown, not dropped
    missing = text.split("## Configurations that did not run")[1].split("\n## ")[0]
    assert "vllm" in missing and "unsupported" in missing
    for name in plots.FIGURES:
        if name != "decode_time":  # shown only with decode-profile rows
            assert f"](../figures/{name}.png)" in text
    # no configuration here profiles its decode: no decode section, no decode figure
    assert "Where batch-1 decode time goes" not in text and "decode_time.png" not in text


def test_latency_table_shows_end_to_end_throughput(reported):
    latency = reported["md"].read_text().split("## Latency and throughput")[1].split("\n## ")[0]
    lines = [line for line in latency.splitlines() if line.startswith("| ")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    e2e = cols.index("end-to-end tok/s")
    values = [line.strip("|").split("|")[e2e].strip() for line in lines[2:]]
    assert values and "–" not in values, values


def test_report_html_is_self_contained(reported):
    html = reported["html"].read_text()
    assert html.count('src="data:image/png;base64,') >= 3
    assert 'src="../figures/' not in html
    assert not re.search(r'(src|href)="(https?:|//)', html)  # nothing fetched from outside
    assert '<table class="data' in html
    assert '<td class="fail">FAIL: do not trust</td>' in html  # marked and coloured


def test_hf_static_cache_mode_decodes_the_same_tokens(pipe):
    """`static-compile` (static KV cache; compiled where transformers compiles) must not change
    what is decoded (shown on unquantized weights, which transformers may compile)."""
    from int4lora.engines.hf_engine import HfEngine

    path = _read(pipe.path("models", "tiny-llama.json"))["metrics"]["path"]
    prompts = [[1] + [40 + i] * 15 for i in range(2)]
    tokens = {}
    for mode in ("generate", "static-compile"):
        eng = HfEngine(path, quantization="none", compute_dtype="float32", mode=mode)
        timing = eng.generate(prompts, 8, [None, None])
        assert timing.output_tokens == 16 and len(timing.ttft_s) == 2
        tokens[mode] = timing.output_token_ids
        eng.close()
    assert tokens["static-compile"] == tokens["generate"]


def test_hf_static_compile_of_nf4_is_unsupported_not_mislabelled(pipe, result_validator):
    """transformers never compiles a bitsandbytes 4-bit model in generate: the bench records
    `unsupported` with the reason instead of timing an eager run as 'compiled'."""
    out = str(pipe.root / "scratch" / "bench-static-nf4.json")
    pipe.quant("tiny-llama", "hf")
    compiled = {**ENGINES["hf"], "mode": "static-compile"}
    res = bench.main("tiny-llama", "hf", plan("tiny-llama", "hf", None, compiled),
                     pipe.path("models", "tiny-llama.json"),
                     pipe.path("quantize", "tiny-llama", "hf.json"), BENCH, "cpu", out)
    result_validator.validate(_read(out))
    assert res["status"] == "unsupported"
    assert "is_compileable" in res["reason"] and "Bnb4BitHfQuantizer" in res["reason"]


def test_bench_hf_decode_profile_attributes_steps(pipe, result_validator):
    """profile_decode on the HF engine: every forward call becomes a vLLM-style step annotation,
    so the trace summary knows 1 prefill and tokens-1 decode steps (CPU: no kernels)."""
    out = str(pipe.root / "scratch" / "bench-profiled.json")
    pipe.quant("tiny-llama", "hf")
    pipe.adapter("tiny-llama", "r16-qv")
    profiled = {**ENGINES["hf"], "profile_decode": {"tokens": 6}, "batch_sizes": [1]}
    res = bench.main("tiny-llama", "hf", plan("tiny-llama", "hf", "r16-qv", profiled),
                     pipe.path("models", "tiny-llama.json"),
                     pipe.path("quantize", "tiny-llama", "hf.json"), BENCH, "cpu", out,
                     adapter_json=pipe.path("adapters", "tiny-llama", "r16-qv.json"))
    result_validator.validate(_read(out))
    assert res["status"] == "ok", res["reason"]
    prof = res["metrics"]["decode_profile"]
    assert prof["adapter"] == "r16-qv-0"
    assert prof["by_step_kind"]["prefill"]["count"] == 1
    assert prof["by_step_kind"]["decode"]["count"] == 5
    assert prof["tpot_s_median"] > 0
    assert not list(Path(out).parent.glob("*.pt.trace.json"))
    # the decode_profile table's row: decode steps but no kernels on the CPU
    (row,) = aggregate.decode_profile_rows(res)
    assert row["profiled_request"] == "r16-qv-0" and row["attribution"] == "per-step"
    assert row["decode_steps"] == 5 and row["sweep_tpot_ms_batch1"] > 0
    assert row["kernel_us_per_step"] is None and row["host_gap_fraction"] is None


def test_validate_on_a_layer_subset(pipe, result_validator):
    """`validation.layers`: engine, reference and adapters cut to the first layers alike; the
    adapter still reaches every module it has there, and the result says what was validated."""
    pipe.quant("tiny-llama", "hf")
    pipe.adapter("tiny-llama", "r16-qv")
    out = str(pipe.root / "scratch" / "validate-first-layer.json")
    res = validate.main("tiny-llama", "hf", plan("tiny-llama", "hf", "r16-qv"),
                        pipe.path("models", "tiny-llama.json"),
                        pipe.path("quantize", "tiny-llama", "hf.json"),
                        pipe.path("adapters", "tiny-llama", "r16-qv.json"),
                        {**VALIDATION, "layers": 1}, "cpu", out, cache_dir=pipe.cache)
    result_validator.validate(_read(out))
    assert res["status"] == "ok", res["reason"]
    m = res["metrics"]
    assert m["layers"] == {"validated": 1, "of": 2}
    assert m["verdict"] == "PASS", m["failed"]
    # 1 layer x (q, v) x (A, B): only the first layer's adapter tensors were loaded
    report = m["adapter_report"]["r16-qv-0"]
    assert len(report["applied"]) == 4 and report["unmatched"] == []
    info = m["engine_info"]
    assert "first1" in info["model_path"]
