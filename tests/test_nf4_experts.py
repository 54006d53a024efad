"""NF4 (bitsandbytes) fused MoE experts and PEFT expert LoRA on top, on the CPU.

Tiny seeded models; tolerances were measured over model seeds 0-5 (see
docs/notes/nf4-experts.md) and set with margin.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.error import NoMatchingPeftModuleError  # noqa: E402
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MixtralConfig, MixtralForCausalLM)

from int4lora.nf4_experts import (expert_target_parameters, find_fused_experts,  # noqa: E402
                                  load_nf4_model, quantize_fused_experts, weight_storage_report)

MIXTRAL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=256)
EXPERT_SUFFIXES = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERT_NAMES = [f"model.layers.{i}.mlp.experts.{p}"
                for i in range(2) for p in ("gate_up_proj", "down_proj")]
EXPERT_ELEMENTS = 2 * 4 * (2 * 128 * 64 + 64 * 128)


def _mixtral(seed=0):
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**MIXTRAL)).to(torch.bfloat16).eval()


def _load(path, **kw):
    return load_nf4_model(path, compute_dtype=torch.bfloat16, device_map="cpu", **kw)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _set_lora_b(model, std, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    _mixtral().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_4bit(mixtral_dir):
    """What transformers' own load_in_4bit gives (experts untouched)."""
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(mixtral_dir, quantization_config=cfg,
                                                dtype=torch.bfloat16, device_map="cpu")


def test_report_families_of_bf16_mixtral():
    model = _mixtral()
    rep = weight_storage_report(model)
    assert set(rep["by_family"]) == {"attention", "experts", "router", "embeddings", "lm_head",
                                     "norm"}
    assert rep["total"]["params"] == sum(p.numel() for p in model.parameters())
    assert rep["by_kind"]["bf16"]["bytes"] == 2 * rep["total"]["params"]
    assert rep["by_family"]["experts"]["params"] == EXPERT_ELEMENTS
    assert rep["total"]["share_4bit"] == 0.0


def test_plain_load_in_4bit_leaves_experts_bf16(plain_4bit):
    """The upstream gap (bitsandbytes #1849): only nn.Linear becomes 4-bit."""
    fam = weight_storage_report(plain_4bit)["by_family"]
    assert fam["attention"]["share_4bit"] == 1.0
    assert fam["experts"]["share_4bit"] == 0.0
    assert set(fam["experts"]["by_kind"]) == {"bf16"}
    assert fam["router"]["share_4bit"] == 0.0  # the Mixtral router is not an nn.Linear either
    assert [f"{m}.{n}" for m, _, n in find_fused_experts(plain_4bit)] == EXPERT_NAMES


def test_quantize_fused_experts_makes_experts_nf4(mixtral_dir, plain_4bit, ids):
    bf16 = _logits(_mixtral(), ids)
    before = _logits(plain_4bit, ids)
    bf16_bytes = weight_storage_report(plain_4bit)["by_family"]["experts"]["bytes"]

    model = _load(mixtral_dir, quantize_experts=False)
    assert quantize_fused_experts(model) == EXPERT_NAMES
    assert quantize_fused_experts(model) == []  # idempotent
    rep = weight_storage_report(model)
    experts = rep["by_family"]["experts"]
    assert experts["share_4bit"] == 1.0 and set(experts["by_kind"]) == {"nf4"}
    assert experts["params"] == EXPERT_ELEMENTS  # logical elements, not the packed uint8 count
    # stored: 0.5 B/element packed + uint8 absmax per 64 + nested/code-book overhead
    assert EXPERT_ELEMENTS / 2 < experts["bytes"] < 0.55 * EXPERT_ELEMENTS
    assert experts["bytes"] < 0.3 * bf16_bytes

    after = _logits(model, ids)
    assert torch.isfinite(after).all()
    assert not torch.equal(after, before)
    # measured (seeds 0-5): vs load_in_4bit cos 0.99972-0.99982; vs bf16 cos 0.9947-0.9963,
    # top-1 agreement 0.83-0.91 (random tiny models have flat logits)
    assert _cos(after, before) > 0.999
    assert _cos(after, bf16) > 0.99
    assert (after.argmax(-1) == bf16.argmax(-1)).float().mean() >= 0.75
    assert torch.equal(_logits(_load(mixtral_dir), ids), after)  # load_nf4_model == manual route


def test_expert_lora_on_nf4_experts(mixtral_dir, ids):
    model = _load(mixtral_dir)
    base = _logits(model, ids)
    names = expert_target_parameters(model)
    assert names == EXPERT_NAMES
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_parameters=names))
    lora = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert len(lora) == 8 and all(".mlp.experts." in n for n in lora)
    assert torch.equal(_logits(pm, ids), base)  # B initialised to zero

    _set_lora_b(pm, std=0.5)
    first, second = _logits(pm, ids), _logits(pm, ids)
    assert (first - base).abs().max() > 0.1
    assert torch.equal(first, second)  # no LoRA proxy left behind between forwards
    experts = pm.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert [len(experts.parametrizations[n]) for n in ("gate_up_proj", "down_proj")] == [1, 1]
    with pm.disable_adapter():
        assert torch.equal(_logits(pm, ids), base)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert torch.equal(_logits(pm, ids), base)
    fam = weight_storage_report(pm)["by_family"]
    assert fam["experts"]["share_4bit"] == 1.0 and fam["lora"]["params"] > 0


def test_adapter_loaded_before_quantization_matches_dequantized_reference(mixtral_dir, tmp_path,
                                                                          ids):
    """An adapter made on the bf16 model, applied to NF4 experts, equals PEFT on the dequantized
    weights exactly, in both LoRA-ed parameters of each expert module."""
    made = get_peft_model(_mixtral(),
                          LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERT_SUFFIXES))
    _set_lora_b(made, std=0.05)
    ref_bf16 = _logits(made, ids)
    made.save_pretrained(tmp_path / "adapter")

    # experts-only NF4 (no bnb linears), so a bf16 copy of the dequantized experts is exact
    nf4 = PeftModel.from_pretrained(_mixtral(), tmp_path / "adapter")
    assert len(quantize_fused_experts(nf4)) == 4
    got, again = _logits(nf4, ids), _logits(nf4, ids)
    assert torch.equal(got, again)
    deq = _mixtral()
    with torch.no_grad():
        for i, layer in enumerate(deq.model.layers):
            src = nf4.base_model.model.model.layers[i].mlp.experts.get_base_layer()
            layer.mlp.experts.gate_up_proj.copy_(src.gate_up_proj)
            layer.mlp.experts.down_proj.copy_(src.down_proj)
    reference = _logits(PeftModel.from_pretrained(deq, tmp_path / "adapter"), ids)
    assert torch.equal(got, reference)
    assert _cos(got, ref_bf16) > 0.99  # measured 0.9993

    full = _load(mixtral_dir, adapters={"default": tmp_path / "adapter"})
    assert isinstance(full, PeftModel)
    fam = weight_storage_report(full)["by_family"]
    assert fam["experts"]["share_4bit"] == 1.0 and fam["attention"]["share_4bit"] == 1.0
    assert fam["lora"]["params"] == 16384
    assert _cos(_logits(full, ids), ref_bf16) > 0.98  # measured 0.9947 (attention NF4 too)


def test_suffix_target_parameters_do_not_match_nf4_experts(mixtral_dir):
    with pytest.raises(NoMatchingPeftModuleError):
        get_peft_model(_load(mixtral_dir), LoraConfig(r=4, target_parameters=EXPERT_SUFFIXES))


def test_target_modules_do_not_reach_fused_experts(mixtral_dir):
    with pytest.raises(NoMatchingPeftModuleError):
        get_peft_model(_mixtral(), LoraConfig(r=4, target_modules=["gate_up_proj"]))
    # next to a real module name it silently adds nothing to the experts
    pm = get_peft_model(_mixtral(), LoraConfig(r=4, target_modules=["q_proj", "gate_up_proj"]))
    lora = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert lora and all(".self_attn.q_proj." in n for n in lora)
    # on NF4 experts the name hits torch's ParametrizationList container, which PEFT rejects
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(_load(mixtral_dir), LoraConfig(r=4, target_modules=["gate_up_proj"]))


def test_dense_llama_has_no_fused_experts(tmp_path, ids):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    dense = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    assert quantize_fused_experts(dense) == []
    dense.save_pretrained(tmp_path)
    model = _load(tmp_path)
    assert quantize_fused_experts(model) == []
    fam = weight_storage_report(model)["by_family"]
    assert "experts" not in fam
    assert fam["attention"]["share_4bit"] == 1.0 and fam["dense_mlp"]["share_4bit"] == 1.0
    assert torch.isfinite(_logits(model, ids)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_nf4_model_on_cuda_never_holds_the_bf16_experts(tmp_path):
    cfg = MixtralConfig(**{**MIXTRAL, "hidden_size": 512, "intermediate_size": 1536,
                           "num_hidden_layers": 4, "num_attention_heads": 8,
                           "num_local_experts": 8})
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    bf16_experts = weight_storage_report(model)["by_family"]["experts"]["bytes"]
    model.save_pretrained(tmp_path)
    del model
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = load_nf4_model(tmp_path, compute_dtype=torch.bfloat16, device_map="cuda:0")
    peak = torch.cuda.max_memory_allocated() - start
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert weight_storage_report(model)["by_family"]["experts"]["share_4bit"] == 1.0
    # final NF4 model (~0.27 of the bf16 experts) + one layer's bf16 gate_up stack (1/6)
    assert peak < 0.6 * bf16_experts
    ids = torch.randint(0, 256, (2, 8), device="cuda")
    assert torch.isfinite(_logits(model, ids)).all()
