"""Architectures by model_type: the registry, names per family, and tiny Qwen2 / Qwen3-MoE
(synthetic bf16 weights) through the rule scripts with the real HF engine on the CPU."""
import json
import re
from pathlib import Path

import pytest

from conftest import VLLM_SRC, needs_vllm_src
from int4lora import architectures as arch
from int4lora import coverage

QWEN2 = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
         "max_position_embeddings": 256, "initializer_range": 0.1}
QWEN3_MOE = {**QWEN2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128}


# --------------------------------------------------------------------------- registry

def test_check_model_type_names_the_bad_value():
    assert arch.check_model_type("qwen2") == "qwen2"
    with pytest.raises(ValueError, match=r"'qwen9'.*close: .*qwen"):
        arch.check_model_type("qwen9")
    with pytest.raises(ValueError, match="'vit'"):  # known to transformers, not a causal LM
        arch.check_model_type("vit")


def test_build_config_any_known_model_type_and_rejects_unknown_fields():
    cfg = arch.build_config("qwen3", {"hidden_size": 64, "num_attention_heads": 4})
    assert type(cfg).__name__ == "Qwen3Config" and cfg.hidden_size == 64
    with pytest.raises(ValueError, match="num_hiden_layers"):
        arch.build_config("mixtral", {"num_hiden_layers": 2})
    legacy = arch.build_config("qwen2", {"rope_theta": 1e6})  # consumed into rope_parameters
    assert legacy.rope_parameters["rope_theta"] == 1e6


def test_model_type_of_accepts_the_architecture_alias():
    assert arch.model_type_of({"architecture": "mixtral"}) == "mixtral"
    assert arch.model_type_of({"model_type": "qwen2", "architecture": "qwen2"}) == "qwen2"
    with pytest.raises(ValueError, match="qwen2.*llama"):
        arch.model_type_of({"model_type": "qwen2", "architecture": "llama"})


def test_spec_is_moe_and_config_errors():
    assert arch.spec_is_moe({"model_type": "qwen3_moe", "arch": QWEN3_MOE})
    assert arch.spec_is_moe({"architecture": "mixtral", "arch": {}})  # Mixtral default: 8
    assert not arch.spec_is_moe({"model_type": "qwen2", "arch": QWEN2})
    assert not arch.spec_is_moe({"model_type": "qwen3_moe", "arch": {"num_experts": 0}})
    errors = arch.config_errors({
        "ok": {"source": "synthetic", "model_type": "qwen2"},
        "bad": {"source": "synthetic-w4a16", "architecture": "mixtrall"},
        "hub": {"source": "hub", "repo": "x/y"}})
    assert len(errors) == 1 and errors[0].startswith("models.bad:") and "'mixtrall'" in errors[0]


def test_moe_layout_and_routers():
    cfg = arch.build_config("qwen2_moe", {**QWEN3_MOE, "num_hidden_layers": 4,
                                          "decoder_sparse_step": 2, "mlp_only_layers": [3],
                                          "shared_expert_intermediate_size": 64})
    layout = arch.moe_layout(cfg)
    assert layout == {"num_experts": 4, "top_k": 2, "expert_intermediate": 128,
                      "shared_intermediate": 64, "moe_layers": [1]}
    assert arch.router_modules(cfg) == ["model.layers.1.mlp.gate",
                                        "model.layers.1.mlp.shared_expert_gate"]
    mixtral = arch.build_config("mixtral", {"num_hidden_layers": 2})
    assert arch.router_modules(mixtral) == ["model.layers.0.block_sparse_moe.gate",
                                            "model.layers.1.block_sparse_moe.gate"]
    assert arch.moe_layout(arch.build_config("qwen2", QWEN2)) is None


def test_w4a16_ignore_keeps_old_recipes_and_adds_the_shared_expert_gate():
    default = ["lm_head", "re:.*mlp.gate$", "re:.*router$"]
    for model_type in (None, "llama", "mixtral", "qwen3_moe"):  # cache keys of old models hold
        assert arch.w4a16_ignore(model_type) == default
    assert arch.w4a16_ignore("qwen2_moe") == default + ["re:.*shared_expert_gate$"]


@pytest.mark.parametrize("name,family", [
    ("model.layers.0.mlp.experts.3.gate_proj.weight_packed", "experts"),
    ("model.layers.0.mlp.experts.gate_up_proj", "experts"),
    ("model.layers.0.mlp.gate.weight", "router"),
    ("model.layers.0.mlp.shared_expert.down_proj.weight_packed", "dense_mlp"),
    ("model.layers.0.mlp.shared_expert_gate.weight", "router"),
    ("model.layers.0.self_attn.q_proj.bias", "attention"),
    ("model.layers.0.self_attn.q_norm.weight", "norm"),
    ("model.layers.0.block_sparse_moe.experts.1.w3.weight_scale", "experts"),
])
def test_module_family_of_qwen_names(name, family):
    assert coverage.family_of(name) == family


# --------------------------------------------------------------------------- expert names

def test_vllm_expert_names_per_family():
    mix = "model.layers.1.block_sparse_moe.experts.5.gate_proj.weight_packed"
    assert arch.to_vllm_name(mix, "mixtral") == \
        "model.layers.1.block_sparse_moe.experts.5.w1.weight_packed"
    assert arch.to_vllm_name(mix.replace("gate_proj", "up_proj"), "mixtral").endswith(
        ".experts.5.w3.weight_packed")
    assert arch.to_vllm_name(mix.replace("gate_proj", "down_proj"), "mixtral").endswith(
        ".experts.5.w2.weight_packed")
    qwen = "model.layers.0.mlp.experts.7.down_proj.weight_scale"
    assert arch.to_vllm_name(qwen, "qwen3_moe") == qwen
    assert arch.parse_expert_name(qwen, "qwen3_moe") == ("model.layers.0", 7, "down",
                                                          "weight_scale")


def test_misnamed_experts_catches_what_vllm_would_skip():
    assert arch.misnamed_experts(["model.layers.0.block_sparse_moe.experts.0.gate_proj.weight"],
                                 "mixtral")
    assert not arch.misnamed_experts(["model.layers.0.block_sparse_moe.experts.0.w1.weight",
                                      "model.layers.0.block_sparse_moe.gate.weight"], "mixtral")
    assert arch.misnamed_experts(["model.layers.0.mlp.experts.0.w1.weight"], "qwen3_moe")
    assert not arch.misnamed_experts(["model.layers.0.mlp.experts.0.up_proj.weight"], "qwen3_moe")


def test_rename_experts_for_vllm_refuses_foreign_expert_names(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    import quantize
    foreign = {"model.layers.0.mlp.experts.0.w1.weight_packed": torch.zeros(2, 2).int()}
    save_file(foreign, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match=r"vLLM would skip.*experts\.0\.w1"):
        quantize.rename_experts_for_vllm(tmp_path)


@needs_vllm_src("model_executor/models/mixtral.py")
def test_registry_matches_vllm_source():
    """The names the registry promises are the ones vLLM 0.26 builds its expert mapping from."""
    mixtral = (VLLM_SRC / "model_executor/models/mixtral.py").read_text()
    assert 'ckpt_names=("w1", "w2", "w3")' in mixtral
    assert 'prefix=f"{prefix}.block_sparse_moe"' in mixtral
    routed = (VLLM_SRC / "model_executor/layers/fused_moe/routed_experts.py").read_text()
    assert 'ckpt_gate_proj_name: str = "gate_proj"' in routed
    assert 'f"experts.{physical_to_logical_map[expert_id]}.{weight_name}.' in routed
    for model in ("qwen2_moe", "qwen3_moe"):
        src = (VLLM_SRC / f"model_executor/models/{model}.py").read_text()
        assert "ckpt_names" not in src and "FusedMoE(" in src  # FusedMoE's default names
    qwen2_moe = (VLLM_SRC / "model_executor/models/qwen2_moe.py").read_text()
    gate = qwen2_moe.split("self.shared_expert_gate = ReplicatedLinear(")[1].split(")")[0]
    assert "quant_config=None" in gate


def test_fuse_experts_for_qwen_moe_names():
    torch = pytest.importorskip("torch")
    from int4lora.reference import fuse_experts
    state = {f"model.layers.0.mlp.experts.{e}.{role}_proj.weight": torch.full((2, 3), 10. * e + i)
             for e in range(2) for i, role in enumerate(("gate", "up"))}
    state.update({f"model.layers.0.mlp.experts.{e}.down_proj.weight": torch.full((3, 2), -1. - e)
                  for e in range(2)})
    state["model.layers.0.mlp.gate.weight"] = torch.ones(2, 3)
    fused = fuse_experts(state, {"model.layers.0.mlp.experts.gate_up_proj": (2, 4, 3),
                                 "model.layers.0.mlp.experts.down_proj": (2, 3, 2),
                                 "model.layers.0.mlp.gate.weight": (2, 3)}, "qwen3_moe")
    gate_up = fused["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up[1, :2].eq(10).all() and gate_up[1, 2:].eq(11).all()  # gate rows first
    assert fused["model.layers.0.mlp.experts.down_proj"][1].eq(-2).all()


# --------------------------------------------------------------------------- pipeline (CPU)

ADAPTERS = {
    "r16-qv": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"], "seed": 1,
               "b_std": 0.02},
    "r16-experts": {"rank": 16, "alpha": 32, "seed": 2, "b_std": 0.02,
                    "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
}
HF = {"backend": "hf", "quantization": "nf4", "compute_dtype": "float32", "mode": "generate"}
VLLM = {"backend": "vllm", "quantization": "w4a16", "group_size": 64}
BENCH = {"batch_sizes": [1], "prompt_tokens": 16, "output_tokens": 4, "warmup": 1,
         "min_iterations": 1, "min_seconds": 0, "max_iterations": 1, "max_warmup": 2,
         "multi_adapter": []}
VALIDATION = {"prompts": 2, "prompt_tokens": 16, "perplexity": {"seq_len": 32, "max_sequences": 2}}
CONFIG = {"engines": {"hf": HF}, "adapters": ADAPTERS, "benchmark": BENCH}


def run_pipeline(root: Path, model: str, spec: dict, adapters: list[str], engines=("hf",)):
    """fetch -> quantize -> make_adapter -> bench -> validate through the scripts' main()."""
    import bench
    import fetch_model
    import make_adapter
    import quantize
    import validate
    from int4lora.config import job_plan

    res, cache = root / "results", str(root / "cache")
    out = {"fetch": fetch_model.main(model, spec, cache, str(res / "models" / f"{model}.json"))}
    mj = str(res / "models" / f"{model}.json")
    for engine, cfg in (("hf", HF), ("vllm", VLLM)):
        if engine in engines:
            out[f"quantize/{engine}"] = quantize.main(model, engine, cfg, mj, cache,
                                                      str(res / "quantize" / f"{engine}.json"))
    for adapter in adapters:
        aj = str(res / "adapters" / f"{adapter}.json")
        out[f"adapter/{adapter}"] = make_adapter.main(model, adapter, ADAPTERS[adapter], mj,
                                                      cache, aj)
        qj = str(res / "quantize" / "hf.json")
        plan = job_plan(CONFIG, model, "hf", adapter)
        out[f"bench/{adapter}"] = bench.main(model, "hf", plan, mj, qj, BENCH, "cpu",
                                             str(res / "bench" / f"{adapter}.json"),
                                             adapter_json=aj)
        out[f"validate/{adapter}"] = validate.main(model, "hf", plan, mj, qj, aj, VALIDATION,
                                                   "cpu", str(res / "validate" / f"{adapter}.json"))
    return out


def assert_pipeline_passes(out: dict, adapters: list[str], moe: bool):
    for key, result in out.items():
        assert result["status"] == "ok", (key, result.get("reason"))
    for adapter in adapters:
        m = out[f"validate/{adapter}"]["metrics"]
        assert m["verdict"] == "PASS", (adapter, m["failed"])
        assert m["moe"] is moe
        fams = m["coverage"]["families"]
        assert fams["attention"]["share_4bit"] == 1.0
        if moe:
            assert fams["experts"]["share_4bit"] == 1.0
            assert any(c["check_id"] == "base.coverage.experts" and c["verdict"] == "PASS"
                       for c in m["checks"])
        runs = out[f"bench/{adapter}"]["metrics"]["runs"]
        assert {r["variant"] for r in runs} == {"lora-base", "lora-adapter"}


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    spec = {"source": "synthetic", "model_type": "qwen2", "arch": QWEN2, "seed": 0}
    return run_pipeline(tmp_path_factory.mktemp("qwen2"), "tiny-qwen2", spec, ["r16-qv"])


@pytest.fixture(scope="module")
def qwen3_moe_run(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    spec = {"source": "synthetic", "model_type": "qwen3_moe", "arch": QWEN3_MOE, "seed": 0}
    return run_pipeline(tmp_path_factory.mktemp("qwen3moe"), "tiny-qwen3-moe", spec,
                        ["r16-qv", "r16-experts"], engines=("hf", "vllm"))


def test_tiny_qwen2_with_qkv_bias_passes_the_pipeline(qwen2_run):
    fetched = qwen2_run["fetch"]["metrics"]
    assert fetched["architecture"]["model_type"] == "qwen2" and fetched["moe"] is False
    from safetensors import safe_open
    with safe_open(str(Path(fetched["path"]) / "model.safetensors"), "pt") as fh:
        bias = fh.get_tensor("model.layers.0.self_attn.k_proj.bias")
    assert bias.abs().sum() > 0  # seeded, not transformers' zeros
    assert_pipeline_passes(qwen2_run, ["r16-qv"], moe=False)


def test_tiny_qwen3_moe_passes_the_pipeline_with_nf4_experts(qwen3_moe_run):
    fetched = qwen3_moe_run["fetch"]["metrics"]
    # transformers 5.17 saves Qwen3-MoE's num_experts as num_local_experts (attribute_map)
    assert fetched["moe"] is True and fetched["architecture"]["num_local_experts"] == 4
    assert_pipeline_passes(qwen3_moe_run, ["r16-qv", "r16-experts"], moe=True)


def test_llmcompressor_qwen3_moe_checkpoint_has_vllm_names(qwen3_moe_run):
    from int4lora.coverage import checkpoint_storage
    quant = qwen3_moe_run["quantize/vllm"]["metrics"]
    ckpt = Path(quant["path"])
    assert quant["expert_tensors_renamed_for_vllm"] == 0  # llmcompressor already writes them
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qcfg["ignore"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"]
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    experts = [n for n in names if ".experts." in n]
    assert experts and not arch.misnamed_experts(experts, "qwen3_moe")
    assert {re.sub(r"experts\.\d+\.", "experts.E.", n) for n in experts
            if n.startswith("model.layers.0.")} == {
        f"model.layers.0.mlp.experts.E.{p}.weight_{k}" for p in arch.LINEARIZED_EXPERT_NAMES
        for k in ("packed", "scale", "shape")}
    fams = checkpoint_storage(ckpt)["families"]
    assert fams["experts"]["share_4bit"] == 1.0 and fams["router"]["share_4bit"] == 0.0


@pytest.mark.parametrize("edit, expected", [
    ({"num_key_value_heads": 3}, "models.m.arch.num_key_value_heads=3: must divide "
                                 "num_attention_heads=8"),
    ({"num_key_value_heads": 16}, "models.m.arch.num_key_value_heads=16: must divide"),
    ({"num_experts_per_tok": 9}, "models.m.arch.num_experts_per_tok=9: must be between 1 and "
                                 "num_local_experts=8"),
    ({"num_experts_per_tok": 0}, "models.m.arch.num_experts_per_tok=0: must be between 1"),
    ({"vocab_size": 258}, "models.m.arch.vocab_size=258: below the byte tokenizer's 259"),
    ({"num_hidden_layers": 0}, "models.m.arch.num_hidden_layers=0: needs at least 1"),
    ({"num_attention_heads": 6, "num_key_value_heads": 2},
     "models.m.arch.num_attention_heads=6: must divide hidden_size=256 (or set head_dim)"),
    ({"hidden_sise": 256}, "models.m.arch: mixtral: unknown config field(s) ['hidden_sise']"),
])
def test_config_errors_name_the_arch_key_that_cannot_be_synthesized(edit, expected):
    arch_fields = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8,
                   "num_experts_per_tok": 2, "vocab_size": 512}
    spec = {"source": "synthetic", "model_type": "mixtral", "arch": {**arch_fields, **edit}}
    assert arch.config_errors({"m": {**spec, "arch": arch_fields}}) == []
    errors = arch.config_errors({"m": spec})
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    assert arch.config_errors({"m": {**spec, "source": "local"}}) == []  # real configs: theirs


def test_an_explicit_head_dim_frees_hidden_size_from_the_heads():
    spec = {"source": "synthetic", "model_type": "qwen3", "arch": {
        "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 1, "head_dim": 32,
        "num_attention_heads": 5, "num_key_value_heads": 1, "vocab_size": 300}}
    assert arch.config_errors({"m": spec}) == []
    del spec["arch"]["head_dim"]
    assert arch.config_errors({"m": spec}) == [
        "models.m.arch.num_attention_heads=5: must divide hidden_size=96 (or set head_dim)"]
