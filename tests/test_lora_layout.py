"""vLLM LoRA layout: engine arguments, slot bytes (hand arithmetic from vLLM 0.26's
create_lora_weights shapes) and the PEFT 3D expert adapter -> vLLM per-expert conversion,
checked expert by expert against PEFT's own get_delta_weight on tiny real MoE models."""
from __future__ import annotations

import ast
import json

import pytest

from conftest import VLLM_SRC, needs_vllm_src
from int4lora import lora_layout as ll

R, ALPHA = 4, 8  # tiny adapters: rank 4, alpha 8 -> vLLM and PEFT scale by 2

# --------------------------------------------------------------------------- engine arguments

QV = {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"], "target_parameters": []}
EXPERTS = {"rank": 16, "alpha": 32, "target_modules": [],
           "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}


@pytest.mark.parametrize("rank,expected", [(1, 1), (2, 8), (8, 8), (16, 16), (17, 32),
                                           (64, 64), (300, 320), (512, 512)])
def test_smallest_vllm_rank(rank, expected):
    assert ll.smallest_vllm_rank(rank) == expected


def test_rank_above_vllm_limit_names_the_rank():
    with pytest.raises(ValueError, match="513"):
        ll.smallest_vllm_rank(513)
    with pytest.raises(ValueError, match="rank 600"):
        ll.vllm_lora_engine_args([dict(QV, rank=600)], "mistral", slots=1)


def test_engine_args_attention_adapter():
    args = ll.vllm_lora_engine_args([QV, dict(QV, rank=8)], "mistral", slots=4)
    assert args == {"enable_lora": True, "max_loras": 4, "max_lora_rank": 16,
                    "max_cpu_loras": 4, "lora_target_modules": ["qkv_proj"]}


def test_engine_args_expert_and_mixed_adapters():
    args = ll.vllm_lora_engine_args([EXPERTS], "mixtral", slots=1)
    assert args["lora_target_modules"] == ["experts"] and args["max_lora_rank"] == 16
    both = ll.vllm_lora_engine_args([QV, EXPERTS, dict(QV, rank=20)], "mixtral", slots=2)
    assert both["lora_target_modules"] == ["experts", "qkv_proj"]
    assert both["max_lora_rank"] == 32 and both["max_cpu_loras"] == 3
    mlp = {"rank": 8, "target_modules": ["o_proj", "gate_proj", "up_proj", "down_proj"]}
    assert ll.vllm_lora_engine_args([mlp], "llama", slots=1)["lora_target_modules"] == \
        ["down_proj", "gate_up_proj", "o_proj"]


def test_engine_args_from_make_adapter_metrics():
    """make_adapter's metrics carry "targets" (tensor module suffixes) and no target_modules."""
    qv = {"rank": 16, "alpha": 32, "targets": ["q_proj", "v_proj"], "target_parameters": []}
    experts = {"rank": 8, "alpha": 16, "targets": ["experts"],
               "target_parameters": EXPERTS["target_parameters"]}
    assert ll.vllm_lora_engine_args([qv], "llama", slots=2)["lora_target_modules"] == \
        ["qkv_proj"]
    assert ll.vllm_lora_engine_args([experts, qv], "mixtral", slots=1)["lora_target_modules"] \
        == ["experts", "qkv_proj"]
    with pytest.raises(ValueError, match="'experts'"):
        ll.vllm_lora_engine_args([dict(qv, targets=["experts"])], "llama", slots=1)


@pytest.mark.parametrize("adapters,model_type,slots,match", [
    ([], "mistral", 1, "no adapters"),
    ([QV], "mistral", 0, "slots=0"),
    ([QV], "falcon", 1, "'falcon'"),
    ([dict(QV, target_modules=["q_projX"])], "mistral", 1, "'q_projX'"),
    ([EXPERTS], "llama", 1, "llama has no experts"),
    ([dict(QV, target_modules=["gate_proj"])], "mixtral", 1, "no dense MLP"),
    ([dict(EXPERTS, target_parameters=["mlp.gate.weight"])], "mixtral", 1, "'mlp.gate.weight'"),
    ([dict(QV, rank="16")], "mistral", 1, "'16'"),
])
def test_engine_args_bad_input_named(adapters, model_type, slots, match):
    with pytest.raises(ValueError, match=match):
        ll.vllm_lora_engine_args(adapters, model_type, slots=slots)


# --------------------------------------------------------------------------- slot bytes

MISTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000}
MIXTRAL = dict(MISTRAL, num_local_experts=8)


def test_slot_bytes_qkv_by_hand():
    # qkv: 3 A slices [r, 4096]; B slices [4096, r], [1024, r], [1024, r]
    per_layer = 3 * 4096 + (4096 + 1024 + 1024)
    assert ll.lora_slot_bytes(MISTRAL, ["qkv_proj"], slots=4, max_rank=16) == \
        per_layer * 32 * 4 * 16 * 2


def test_slot_bytes_every_dense_module_by_hand():
    qkv = 3 * 4096 + 6144
    o_proj = 4096 + 4096
    gate_up = 2 * 4096 + 2 * 14336
    down = 14336 + 4096
    got = ll.lora_slot_bytes(MISTRAL, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                             slots=1, max_rank=8, dtype_bytes=4)
    assert got == (qkv + o_proj + gate_up + down) * 32 * 1 * 8 * 4


def test_slot_bytes_experts_router_lm_head_by_hand():
    # FusedMoEWithLoRA: w13 A 2x[E, r, H], w13 B 2x[E, I, r], w2 A [E, r, I], w2 B [E, H, r]
    experts = 8 * (2 * 4096 + 2 * 14336 + 14336 + 4096)
    router = 4096 + 8
    lm_head = 4096 + 32000  # once, not per layer
    got = ll.lora_slot_bytes(MIXTRAL, ["experts", "gate", "lm_head"], slots=2, max_rank=16)
    assert got == ((experts + router) * 32 + lm_head) * 2 * 16 * 2


def test_slot_bytes_head_dim_and_embeddings():
    arch = dict(MISTRAL, head_dim=64, num_key_value_heads=4)  # q = 2048, kv = 256
    assert ll.lora_slot_bytes(arch, ["o_proj"], slots=1, max_rank=1, dtype_bytes=1) == \
        (2048 + 4096) * 32
    assert ll.lora_slot_bytes(MISTRAL, ["embed_tokens"], slots=3, max_rank=8) == \
        (32000 + 4096) * 3 * 8 * 2


def test_decode_step_bytes():
    qkv_slot = ll.lora_slot_bytes(MISTRAL, ["qkv_proj"], slots=1, max_rank=16)
    assert ll.lora_bytes_per_decode_step(MISTRAL, ["qkv_proj"], active_adapters=0,
                                         max_rank=16) == 0
    assert ll.lora_bytes_per_decode_step(MISTRAL, ["qkv_proj"], active_adapters=3,
                                         max_rank=16) == 3 * qkv_slot
    # two of eight experts per layer read by one adapter
    assert ll.lora_bytes_per_decode_step(MIXTRAL, ["experts"], active_adapters=1, max_rank=16,
                                         experts_touched=2) == \
        2 * (2 * 4096 + 2 * 14336 + 14336 + 4096) * 32 * 16 * 2
    assert ll.lora_bytes_per_decode_step(MISTRAL, ["embed_tokens"], active_adapters=1,
                                         max_rank=8, batch=5) == (5 + 4096) * 8 * 2


@pytest.mark.parametrize("arch,modules,kw,match", [
    (MISTRAL, ["qkv_projX"], {}, "'qkv_projX'"),
    (MISTRAL, ["experts"], {}, "experts"),
    ({"hidden_size": 8}, ["o_proj"], {}, "num_hidden_layers"),
    (MISTRAL, ["o_proj"], {"slots": -1}, "slots=-1"),
    (MISTRAL, ["lm_head"], {"max_rank": 2.5}, "max_rank=2.5"),
])
def test_slot_bytes_bad_input_named(arch, modules, kw, match):
    args = {"slots": 1, "max_rank": 16, **kw}
    with pytest.raises(ValueError, match=match):
        ll.lora_slot_bytes(arch, modules, **args)


# --------------------------------------------------------------------------- expert adapters

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, num_experts_per_tok=2)
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_config(model_type: str):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    if model_type == "mixtral":
        return MixtralConfig(intermediate_size=24, num_local_experts=4, **TINY)
    common = dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, **TINY)
    if model_type == "qwen2_moe":
        return Qwen2MoeConfig(shared_expert_intermediate_size=40, **common)
    return Qwen3MoeConfig(**common)


def make_peft_adapter(model_type: str, out_dir, *, target_parameters=EXPERT_TARGETS,
                      seed: int = 0, **lora_kw):
    """A real PEFT adapter on a tiny model, every A and B random and non-zero, saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                     target_parameters=list(target_parameters), **lora_kw)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5 + 0.1)
    peft_model.save_pretrained(out_dir)
    return peft_model


def load(path):
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


def vllm_delta(tensors: dict, name: str):
    """vLLM's delta for one converted pair: B scaled by alpha / r, then B @ A."""
    a = tensors[f"{name}.lora_A.weight"].float()
    b = tensors[f"{name}.lora_B.weight"].float()
    return (ALPHA / R) * b @ a


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_converted_experts_match_peft_delta(tmp_path, model_type):
    import torch
    peft_model = make_peft_adapter(model_type, tmp_path / "peft")
    summary = ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm",
                                                 model_type=model_type, num_experts=4)
    out = load(tmp_path / "vllm")
    # vLLM 0.26: Mixtral's MoE is block_sparse_moe.experts with ckpt_names (w1, w2, w3) =
    # (gate, down, up); Qwen MoE keeps mlp.experts and gate/down/up_proj
    block, gate, up, down = {"mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2")}.get(
        model_type, ("mlp.experts", "gate_proj", "up_proj", "down_proj"))
    checked = 0
    for layer in range(2):
        experts = peft_model.base_model.model.model.layers[layer].mlp.experts
        assert experts.parameter_name == "down_proj"
        assert experts.base_layer.parameter_name == "gate_up_proj"
        d_down = experts.get_delta_weight("default")              # [E, H, I]
        d_gate_up = experts.base_layer.get_delta_weight("default")  # [E, 2I, H]
        assert d_down.abs().min() > 0 and d_gate_up.abs().min() > 0  # non-zero everywhere
        for e in range(4):
            base = f"base_model.model.model.layers.{layer}.{block}.{e}"
            torch.testing.assert_close(vllm_delta(out, f"{base}.{gate}"),
                                       d_gate_up[e, :24].float())
            torch.testing.assert_close(vllm_delta(out, f"{base}.{up}"),
                                       d_gate_up[e, 24:].float())
            torch.testing.assert_close(vllm_delta(out, f"{base}.{down}"),
                                       d_down[e].float())
            checked += 3
    assert checked == 2 * 4 * 3
    assert summary["expert_tensors"] == 2 * 4 * 3 * 2 and summary["moe_layers"] == 2
    assert summary["zero_filled"] == []


def test_mixtral_names_and_config_are_what_vllm_loads(tmp_path):
    make_peft_adapter("mixtral", tmp_path / "peft")
    ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm",
                                       model_type="mixtral", num_experts=4)
    src, out = load(tmp_path / "peft"), load(tmp_path / "vllm")
    expert_names = {n for n in out if ".experts." in n}
    expected = {f"base_model.model.model.layers.{i}.block_sparse_moe.experts.{e}.{w}"
                f".lora_{ab}.weight"
                for i in range(2) for e in range(4) for w in ("w1", "w2", "w3") for ab in "AB"}
    assert expert_names == expected
    assert out["base_model.model.model.layers.1.block_sparse_moe.experts.3.w3.lora_A.weight"] \
        .shape == (R, 32)
    assert out["base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight"] \
        .shape == (32, R)
    dense = {n for n in src if ".experts." not in n}
    assert dense and dense == {n for n in out if ".experts." not in n}
    for name in dense:  # copied unchanged
        assert out[name].dtype == src[name].dtype and bool((out[name] == src[name]).all())
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj", "w1", "w2", "w3"]
    assert config["target_parameters"] is None
    assert config["r"] == R and config["lora_alpha"] == ALPHA
    assert not (tmp_path / "vllm.partial").exists()


def test_single_expert_parameter_zero_fills_the_other(tmp_path):
    import torch
    peft_model = make_peft_adapter("mixtral", tmp_path / "peft",
                                   target_parameters=["mlp.experts.down_proj"])
    summary = ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm",
                                                 model_type="mixtral", num_experts=4)
    assert summary["zero_filled"] == ["gate_up_proj"]
    out = load(tmp_path / "vllm")
    experts = peft_model.base_model.model.model.layers[0].mlp.experts
    d_down = experts.get_delta_weight("default")
    base = "base_model.model.model.layers.0.block_sparse_moe.experts.2"
    torch.testing.assert_close(vllm_delta(out, f"{base}.w2"), d_down[2].float())
    assert vllm_delta(out, f"{base}.w1").shape == (24, 32)
    assert not vllm_delta(out, f"{base}.w1").any() and not vllm_delta(out, f"{base}.w3").any()


def test_conversion_reconverts_in_place(tmp_path):
    make_peft_adapter("mixtral", tmp_path / "peft")
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "stale.txt").write_text("old")
    ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm",
                                       model_type="mixtral", num_experts=4)
    assert not (tmp_path / "vllm" / "stale.txt").exists()
    assert json.loads((tmp_path / "vllm" / "vllm_conversion.json").read_text())["num_experts"] == 4


@pytest.mark.parametrize("kw,match", [
    ({"model_type": "mixtral", "num_experts": 3}, r"num_experts=3"),
    ({"model_type": "llama", "num_experts": 4}, "'llama'"),
    ({"model_type": "mixtral", "num_experts": 0}, "num_experts=0"),
])
def test_conversion_bad_input_leaves_nothing(tmp_path, kw, match):
    make_peft_adapter("mixtral", tmp_path / "peft")
    with pytest.raises(ValueError, match=match):
        ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm", **kw)
    assert not (tmp_path / "vllm").exists() and not (tmp_path / "vllm.partial").exists()


def test_conversion_refuses_rslora(tmp_path):
    make_peft_adapter("mixtral", tmp_path / "peft", use_rslora=True)
    with pytest.raises(ValueError, match="use_rslora"):
        ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm",
                                           model_type="mixtral", num_experts=4)
    assert not (tmp_path / "vllm").exists()


def test_conversion_rejects_unknown_expert_tensor(tmp_path):
    from safetensors.torch import save_file
    make_peft_adapter("mixtral", tmp_path / "peft")
    tensors = load(tmp_path / "peft")
    name = "base_model.model.model.layers.0.mlp.experts.3.w1.lora_A.weight"
    tensors[name] = tensors[next(iter(tensors))].clone()
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"experts\.3\.w1"):
        ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm",
                                           model_type="mixtral", num_experts=4)


# --------------------------------------------------------------------------- through vLLM's code
# Where the vLLM 0.26.0 source tree is at hand (conftest.VLLM_SRC: tools/vllm-src.py), run
# the converted adapter through vLLM's own name parsing, target matching, pack_moe and
# optimize() (the functions are compiled from that tree, vllm imports stubbed).



def vllm_namespace(relpath: str, keep: set[str] | None = None, **stubs) -> dict:
    """Compile a vLLM source file without its vllm imports (keep: only these top-level defs)."""
    tree = ast.parse((VLLM_SRC / relpath).read_text())
    body = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
            continue
        if keep is not None and isinstance(node, (ast.FunctionDef, ast.ClassDef)) \
                and node.name not in keep:
            continue
        if keep is not None and not isinstance(node, (ast.FunctionDef, ast.ClassDef,
                                                      ast.Import, ast.ImportFrom)):
            continue
        body.append(node)
    namespace = dict(stubs)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(relpath), "exec"), namespace)
    return namespace


@needs_vllm_src("lora/lora_weights.py", "lora/utils.py")
def test_converted_mixtral_adapter_through_vllm_code(tmp_path):
    import re as regex_module

    import torch
    weights = vllm_namespace("lora/lora_weights.py", PEFTHelper=object, PIN_MEMORY=False)
    utils = vllm_namespace("lora/utils.py", keep={"parse_fine_tuned_lora_name",
                                                  "is_in_target_modules"}, re=regex_module)
    peft_model = make_peft_adapter("mixtral", tmp_path / "peft")
    ll.convert_expert_adapter_for_vllm(tmp_path / "peft", tmp_path / "vllm",
                                       model_type="mixtral", num_experts=4)
    loras = {}  # LoRAModel.from_lora_tensors, lora/lora_model.py
    for name, tensor in load(tmp_path / "vllm").items():
        module, is_a = utils["parse_fine_tuned_lora_name"](name, None)
        w = loras.setdefault(module, weights["LoRALayerWeights"](module, R, ALPHA, None, None))
        setattr(w, "lora_a" if is_a else "lora_b", tensor.float())
    for layer in range(2):
        moe = f"model.layers.{layer}.block_sparse_moe.experts"
        assert utils["is_in_target_modules"](moe, ["experts"], {"experts": []})
        # packed children in build_expert_params_mapping order: per expert w1, w2, w3
        children = [f"{moe}.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")]
        packed = weights["PackedLoRALayerWeights"].pack_moe([loras.pop(c) for c in children],
                                                            moe).optimize()
        (a1, a2, a3), (b1, b2, b3) = packed.lora_a, packed.lora_b
        experts = peft_model.base_model.model.model.layers[layer].mlp.experts
        d_down = experts.get_delta_weight("default").float()
        d_gate_up = experts.base_layer.get_delta_weight("default").float()
        torch.testing.assert_close(torch.bmm(b1, a1), d_gate_up[:, :24])  # w1 = gate
        torch.testing.assert_close(torch.bmm(b3, a3), d_gate_up[:, 24:])  # w3 = up
        torch.testing.assert_close(torch.bmm(b2, a2), d_down)
    assert set(loras) == {f"model.layers.{i}.self_attn.{p}" for i in range(2)
                          for p in ("q_proj", "v_proj")}
    assert all(utils["is_in_target_modules"](m, ["qkv_proj"], {"qkv_proj": ["q_proj", "k_proj",
                                                                            "v_proj"]})
               for m in loras)
