"""The direct-4-bit synthetic writer (synth4bit), NF4 from its checkpoints, and tiny
synthetic-w4a16 Qwen2 / Qwen3-MoE through the rule scripts on the CPU."""
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

from int4lora import synth4bit  # noqa: E402
from int4lora.architectures import build_config  # noqa: E402
from int4lora.reference import compressed_state_dict, dequantized_compressed_model  # noqa: E402

BASE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 256, "initializer_range": 0.1}
ARCHS = {
    "llama": BASE,
    "qwen2": BASE,
    "mixtral": {**BASE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {**BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128},
    "qwen2_moe": {**BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                  "shared_expert_intermediate_size": 256},
}
GROUP = 64
IDS = torch.tensor([[1, 5, 9, 20, 30, 7, 100, 3, 77, 250, 12, 64]])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """model_type -> checkpoint dir, written on the CPU (several shards for the MoEs)."""
    root = tmp_path_factory.mktemp("synth4bit")
    out = {}
    for model_type, arch in ARCHS.items():
        out[model_type] = root / model_type
        synth4bit.write_checkpoint(out[model_type], model_type, arch, seed=3, group_size=GROUP,
                                   device="cpu", max_shard_bytes=300_000)
    return out


def _plan(model_type):
    cfg = build_config(model_type, ARCHS[model_type], tie_word_embeddings=False)
    return synth4bit.plan_tensors(cfg)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


# --------------------------------------------------------------------------- packing

def test_pack_int4_matches_compressed_tensors_layout():
    from compressed_tensors.compressors.pack_quantized.helpers import (pack_to_int32,
                                                                       unpack_from_int32)
    q = torch.randint(-8, 8, (6, 64), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int8)
    q[0, 7] = 7   # top nibble 15: the int32 sign bit
    ours = synth4bit.pack_int4(q)
    assert ours.dtype == torch.int32 and ours.shape == (6, 8)
    assert torch.equal(ours, pack_to_int32(q, 4))
    assert torch.equal(unpack_from_int32(ours, 4, q.shape), q)


# --------------------------------------------------------------------------- the checkpoint

@pytest.mark.parametrize("model_type", ["qwen2", "mixtral", "qwen2_moe"])
def test_checkpoint_dequantizes_to_the_values_it_was_written_from(written, model_type):
    state = compressed_state_dict(written[model_type])
    plan = _plan(model_type)
    assert set(state) == {t.name for t in plan}
    for item in plan:
        if item.kind == "int4":
            q, scale = synth4bit.draw_int4(item, 3, GROUP, "cpu")
            # compressed-tensors multiplies in the scale dtype (bf16), as vLLM's kernels do
            expected = (q.to(torch.bfloat16) * scale.repeat_interleave(GROUP, dim=1)).float()
        else:
            expected = synth4bit.draw_plain(item, 3, "cpu").float()
        assert torch.equal(state[item.name], expected), item.name


def test_int4_values_and_scales_have_the_intended_statistics(written):
    state = compressed_state_dict(written["qwen2"])
    plan = {t.name: t for t in _plan("qwen2")}
    w = state["model.layers.0.mlp.down_proj.weight"]
    q, _ = synth4bit.draw_int4(plan["model.layers.0.mlp.down_proj.weight"], 3, GROUP, "cpu")
    assert q.min() == -7 and q.max() == 7 and abs(q.float().mean()) < 0.05
    assert 0.9 < w.std().item() / BASE["initializer_range"] < 1.1
    assert torch.equal(state["model.norm.weight"], torch.ones(128))
    assert state["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0


def test_expert_tensors_carry_vllm_names_and_routers_stay_16bit(written):
    from int4lora.architectures import misnamed_experts
    from int4lora.coverage import checkpoint_storage
    for model_type in ("mixtral", "qwen3_moe", "qwen2_moe"):
        ckpt = written[model_type]
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        names = list(index["weight_map"])
        assert len(set(index["weight_map"].values())) > 1
        experts = [n for n in names if ".experts." in n]
        assert len(experts) == 2 * 4 * 3 * 3 and not misnamed_experts(experts, model_type)
        fams = checkpoint_storage(ckpt)["families"]
        assert fams["experts"]["share_4bit"] == 1.0 and fams["attention"]["share_4bit"] == 1.0
        assert fams["router"]["share_4bit"] == 0.0 and fams["router"]["elements"] > 0
    mixtral = json.loads((written["mixtral"] / "model.safetensors.index.json").read_text())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in mixtral["weight_map"]
    qwen2_moe = json.loads((written["qwen2_moe"] / "config.json").read_text())
    assert qwen2_moe["quantization_config"]["ignore"] == [
        "model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate",
        "model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate", "lm_head"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_config_and_tensors_match_what_llmcompressor_writes(written, model_type, tmp_path):
    """Generate the same shape with the real llmcompressor oneshot (quantize.py's recipe) and
    compare config keys, quantization_config and every tensor's name, shape and dtype."""
    pytest.importorskip("llmcompressor")
    import quantize
    from safetensors import safe_open

    from int4lora.models import synthesize
    synthesize(tmp_path / "bf16", model_type, ARCHS[model_type], 0)
    quantize.quantize_w4a16(str(tmp_path / "bf16"), tmp_path / "q",
                            quantize.w4a16_recipe(GROUP, model_type))

    def tensors(d):
        out = {}
        for f in Path(d).glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                out.update({k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype())
                            for k in fh.keys()})
        return out

    theirs = json.loads((tmp_path / "q" / "config.json").read_text())
    ours = json.loads((written[model_type] / "config.json").read_text())
    assert set(ours) == set(theirs)
    assert ours["quantization_config"] == theirs["quantization_config"]
    assert ours["architectures"] == theirs["architectures"]
    assert tensors(written[model_type]) == tensors(tmp_path / "q")


@pytest.mark.parametrize("model_type", ["qwen2", "mixtral", "qwen3_moe"])
def test_transformers_compressed_path_gives_the_reference_logits(written, model_type):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(written[model_type], dtype=torch.bfloat16)
    ref = dequantized_compressed_model(written[model_type], None, "cpu", dtype=torch.bfloat16)
    assert torch.equal(_logits(hf), _logits(ref))
    ref32 = dequantized_compressed_model(written[model_type], None, "cpu")
    assert (_logits(ref32) - _logits(ref)).abs().max() < 0.1  # bf16 rounding only


def test_activations_stay_sane_through_eight_layers(tmp_path):
    """Eight layers deep, the int4 model's activations and logits look like those of
    transformers' own random init of the same config (finite, same scale, not degenerate)."""
    from transformers import AutoModelForCausalLM
    arch = {**BASE, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8,
            "num_attention_heads": 8, "initializer_range": 0.02}
    synth4bit.write_checkpoint(tmp_path, "qwen2", arch, seed=0, group_size=128, device="cpu")
    torch.manual_seed(0)
    models = {"int4": dequantized_compressed_model(tmp_path, None, "cpu"),
              "hf": AutoModelForCausalLM.from_config(build_config("qwen2", arch)).float()}
    ids = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(0))
    stats = {}
    for name, model in models.items():
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        assert torch.isfinite(out.logits).all()
        stats[name] = {"std": out.logits.std().item(),
                       "step": (out.logits[:, 1:] - out.logits[:, :-1]).std().item(),
                       "rms": [h.pow(2).mean().sqrt().item() for h in out.hidden_states[:-1]]}
    ours, theirs = stats["int4"], stats["hf"]
    assert 0.7 < ours["std"] / theirs["std"] < 1.4
    assert ours["step"] > 0.2 * ours["std"]          # positions differ: not one flat output
    for a, b in zip(ours["rms"], theirs["rms"]):
        assert 0.67 < a / b < 1.5


def test_same_seed_same_bytes_other_seed_other_values(tmp_path, written):
    synth4bit.write_checkpoint(tmp_path / "again", "qwen2", ARCHS["qwen2"], seed=3,
                               group_size=GROUP, device="cpu", max_shard_bytes=300_000)
    for f in written["qwen2"].glob("*.safetensors"):
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()
    synth4bit.write_checkpoint(tmp_path / "other", "qwen2", ARCHS["qwen2"], seed=4,
                               group_size=GROUP, device="cpu")
    a, b = (compressed_state_dict(p) for p in (written["qwen2"], tmp_path / "other"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           b["model.layers.0.mlp.up_proj.weight"])


# --------------------------------------------------------------------------- size estimate

def test_estimate_matches_the_bytes_written(written):
    for model_type, ckpt in written.items():
        files = list(ckpt.glob("*.safetensors"))
        on_disk = sum(f.stat().st_size for f in files)
        cfg = build_config(model_type, ARCHS[model_type], tie_word_embeddings=False)
        estimate = synth4bit.estimate_bytes(cfg, GROUP)
        assert estimate <= on_disk <= estimate + synth4bit.HEADER_SLACK * len(files), model_type


def test_full_size_estimates_fit_the_node_disk():
    qwen2_32b = build_config("qwen2", {
        "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
        "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064})
    mixtral = build_config("mixtral", {"num_hidden_layers": 32})  # 8x7B defaults
    q, m = (synth4bit.estimate_bytes(c, 128) for c in (qwen2_32b, mixtral))
    params_q = 64 * (2 * 5120 * 5120 + 2 * 1024 * 5120 + 3 * 5120 * 27648)
    bf16 = 2 * 152064 * 5120 + 64 * (5120 + 2 * 1024 + 2 * 5120) + 5120  # + biases, norms
    assert q == params_q // 2 + params_q // 128 * 2 + 64 * 7 * 16 + bf16 * 2
    assert 18e9 < q < 20e9 and 24e9 < m < 25.5e9
    assert q + m < 64e9 * 0.75


# --------------------------------------------------------------------------- bad input

def test_indivisible_group_is_an_error_naming_the_tensor(tmp_path):
    import fetch_model
    spec = {"source": "synthetic-w4a16", "model_type": "llama", "group_size": 128,
            "arch": {**BASE, "intermediate_size": 320}}
    with pytest.raises(ValueError, match=r"group_size=128.*mlp\.down_proj.*in_features=320"):
        fetch_model.main("wide", spec, str(tmp_path / "cache"), str(tmp_path / "r.json"))
    assert not list((tmp_path / "cache" / "models").iterdir())  # no staging, no target
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match="'lama'"):
        fetch_model.main("bad", {**spec, "model_type": "lama"}, str(tmp_path / "cache"),
                         str(tmp_path / "r.json"))


# --------------------------------------------------------------------------- NF4 from 4 bit

def _bf16_copy(ckpt, out):
    """A 16-bit checkpoint holding exactly the dequantized int4 weights (rounded to bf16)."""
    dequantized_compressed_model(ckpt, None, "cpu", dtype=torch.bfloat16).save_pretrained(out)
    return out


def _adapter(model_dir, spec, out):
    import make_adapter
    shapes, lcfg = make_adapter.adapter_shapes(str(model_dir), spec)
    tensors = make_adapter.seeded_weights(shapes, 5, 0.05, zero_b=False, dtype=torch.bfloat16)
    make_adapter.save_adapter(out, lcfg, tensors, str(model_dir))
    return str(out)


@pytest.mark.parametrize("model_type,targets", [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("mixtral", {"target_modules": ["q_proj", "v_proj"],
                 "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}),
])
def test_load_nf4_from_compressed_equals_nf4_of_the_dequantized_weights(written, tmp_path,
                                                                        model_type, targets):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from int4lora.nf4_experts import (load_nf4_from_compressed, load_nf4_model,
                                      weight_storage_report)
    ckpt = written[model_type]
    bf16 = _bf16_copy(ckpt, tmp_path / "bf16")
    adapters = {"a": _adapter(ckpt, {"rank": 8, "alpha": 16, **targets}, tmp_path / "a")}
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_nf4_from_compressed(ckpt, dtype, "cpu", adapters=adapters)
        theirs = load_nf4_model(bf16, compute_dtype=dtype, device_map="cpu", adapters=adapters)
        assert torch.equal(_logits(ours), _logits(theirs)), dtype
        with ours.disable_adapter(), theirs.disable_adapter():
            base = _logits(ours)
            assert torch.equal(base, _logits(theirs))
        assert not torch.equal(base, _logits(ours))  # the adapter is applied
        rep_ours = weight_storage_report(ours.get_base_model())
        rep_theirs = weight_storage_report(theirs.get_base_model())
        assert rep_ours["by_family"] == rep_theirs["by_family"]
    if model_type == "mixtral":
        assert rep_ours["by_family"]["experts"]["share_4bit"] == 1.0


def test_hf_engine_loads_a_compressed_checkpoint(written):
    pytest.importorskip("bitsandbytes")
    from int4lora.engines.hf_engine import load_model
    nf4 = load_model(str(written["qwen3_moe"]), quantization="nf4", compute_dtype="float32",
                     device="cpu")
    assert type(nf4).__name__ == "Qwen3MoeForCausalLM"
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.modules())
    plain = load_model(str(written["qwen3_moe"]), quantization="none", compute_dtype="float32",
                       device="cpu")
    ref = dequantized_compressed_model(written["qwen3_moe"], None, "cpu")
    assert torch.equal(_logits(plain), _logits(ref))
    cos = torch.nn.functional.cosine_similarity(_logits(nf4).flatten(), _logits(ref).flatten(), 0)
    assert cos > 0.9  # NF4 of uniform int4 values: a coarser fit than of Gaussian weights


# --------------------------------------------------------------------------- pipeline (CPU)

@pytest.fixture(scope="module")
def synth_runs(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from test_architectures import run_pipeline
    runs = {}
    for model_type, adapters in (("qwen2", ["r16-qv"]), ("qwen3_moe", ["r16-qv", "r16-experts"])):
        spec = {"source": "synthetic-w4a16", "model_type": model_type, "group_size": GROUP,
                "arch": ARCHS[model_type], "seed": 0}
        runs[model_type] = run_pipeline(tmp_path_factory.mktemp(model_type), f"w4-{model_type}",
                                        spec, adapters, engines=("hf", "vllm"))
    return runs


@pytest.mark.parametrize("model_type,adapters", [("qwen2", ["r16-qv"]),
                                                 ("qwen3_moe", ["r16-qv", "r16-experts"])])
def test_synthetic_w4a16_models_pass_the_pipeline(synth_runs, model_type, adapters):
    from test_architectures import assert_pipeline_passes
    run = synth_runs[model_type]
    fetched = run["fetch"]["metrics"]
    assert fetched["synthetic"] is True and fetched["written_in_4bit"] is True
    assert fetched["weight_bytes_on_disk"] == fetched["bytes_written"]
    assert not list(Path(fetched["path"]).parent.glob("*.partial"))
    assert_pipeline_passes(run, adapters, moe=model_type == "qwen3_moe")
    vllm = run["quantize/vllm"]["metrics"]
    assert vllm["path"] == fetched["path"] and vllm["recipe"]["synthetic"] is True
    assert vllm["recipe"]["method"] == "written directly in W4A16 by synth4bit"
    assert vllm["recipe"]["group_size"] == GROUP
    assert "load_nf4_from_compressed" in run["quantize/hf"]["metrics"]["recipe"]["from"]


def test_quantize_pass_through_refuses_what_it_cannot_honour(synth_runs, tmp_path):
    import quantize
    root = Path(synth_runs["qwen2"]["fetch"]["metrics"]["path"]).parents[2]
    model_json = str(root / "results" / "models" / "w4-qwen2.json")
    cases = {"vllm128": {"backend": "vllm", "quantization": "w4a16", "group_size": 128},
             "vllm-bnb": {"backend": "vllm", "quantization": "bitsandbytes"}}
    for engine, cfg in cases.items():
        res = quantize.main("w4-qwen2", engine, cfg, model_json, str(tmp_path),
                            str(tmp_path / f"{engine}.json"))
        assert res["status"] == "unsupported", engine
    assert "group_size=128" in json.loads((tmp_path / "vllm128.json").read_text())["reason"]


def test_qwen2_moe_nf4_keeps_routers_16bit_and_runs(written):
    """The shared-expert gate is an nn.Linear [1, H]: it must stay 16-bit (a router; bnb's CPU
    kernel also cannot run a 1-row NF4 linear)."""
    pytest.importorskip("bitsandbytes")
    from int4lora.nf4_experts import load_nf4_from_compressed, weight_storage_report
    model = load_nf4_from_compressed(written["qwen2_moe"], torch.float32, "cpu")
    fams = weight_storage_report(model)["by_family"]
    assert fams["router"]["share_4bit"] == 0.0 and set(fams["router"]["by_kind"]) == {"fp32"}
    assert fams["experts"]["share_4bit"] == 1.0 and fams["dense_mlp"]["share_4bit"] == 1.0
    assert torch.isfinite(_logits(model)).all()
