"""Which adapter tensors reached a module.

HF/PEFT: real tiny models and real PEFT loading. vLLM: the worker-side table builder and the
pure classification, run on stand-ins shaped like vLLM 0.26's LoRAModelManager (class names,
packed_modules, lora_index_to_id, LoRAModel.loras after _create_merged_loras_inplace); the
real engine is exercised on the GPU by the lead.
"""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from conftest import VLLM_SRC, needs_vllm_src
from int4lora import applied

# --------------------------------------------------------------------------- HF / PEFT


def tiny_llama():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return AutoModelForCausalLM.from_config(cfg)


def save_adapter(out_dir):
    """A q/v adapter with non-zero A and B, saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) + 0.1)
    peft_model.save_pretrained(out_dir)


def rename_tensors(adapter_dir, rename):
    from safetensors.torch import load_file, save_file
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    renamed = {rename(k): v for k, v in tensors.items()}
    save_file(renamed, str(path))
    return sorted(k for k in renamed if k not in tensors)


def load_peft(adapter_dir, name="a"):
    import warnings

    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the keys it could not place
        return PeftModel.from_pretrained(tiny_llama(), str(adapter_dir), adapter_name=name)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "qv"
    save_adapter(path)
    return path


def test_unaltered_adapter_fully_applied(adapter_dir):
    model = load_peft(adapter_dir)
    assert applied.peft_unapplied_tensors(model, "a", adapter_dir) == []


def test_renamed_tensors_all_listed(adapter_dir, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(adapter_dir, altered)
    new_names = rename_tensors(altered, lambda k: k.replace(".self_attn.", ".self_attnX."))
    assert len(new_names) == 8  # 2 layers x q, v x A, B
    model = load_peft(altered)
    assert applied.peft_unapplied_tensors(model, "a", altered) == new_names


def test_one_renamed_tensor_listed(adapter_dir, tmp_path):
    altered = tmp_path / "one"
    shutil.copytree(adapter_dir, altered)
    target = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    new_names = rename_tensors(altered, lambda k: k.replace("v_proj.lora_B", "v_projX.lora_B")
                               if k == target else k)
    assert new_names == [target.replace("v_proj.", "v_projX.")]
    model = load_peft(altered)
    assert applied.peft_unapplied_tensors(model, "a", altered) == new_names


def test_value_that_did_not_land_listed(adapter_dir):
    import torch
    model = load_peft(adapter_dir)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["a"].weight.add_(1.0)
    assert applied.peft_unapplied_tensors(model, "a", adapter_dir) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]


def test_expert_adapter_fully_applied(tmp_path):
    from peft import PeftModel
    from test_lora_layout import make_peft_adapter, tiny_config
    from transformers import AutoModelForCausalLM
    make_peft_adapter("mixtral", tmp_path / "experts")
    base = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "experts"), adapter_name="x")
    assert applied.peft_unapplied_tensors(model, "x", tmp_path / "experts") == []


def test_unknown_adapter_name_is_an_error(adapter_dir):
    model = load_peft(adapter_dir)
    with pytest.raises(ValueError, match="'b'.*\\['a'\\]"):
        applied.peft_unapplied_tensors(model, "b", adapter_dir)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        applied.peft_unapplied_tensors(model, "a", adapter_dir / "nowhere")


# --------------------------------------------------------------------------- vLLM stand-ins
# Class names are the ones vLLM 0.26 uses (vllm/lora/layers/); the report reads type names.

L0 = "model.layers.0"


class MergedQKVParallelLinearWithLoRA:
    def __init__(self, slots):
        import torch
        self.lora_b_stacked = tuple(torch.zeros(slots, 1, 6, 4) for _ in range(3))


class RowParallelLinearWithLoRA:
    def __init__(self, slots):
        import torch
        self.lora_b_stacked = (torch.zeros(slots, 1, 8, 4),)


class FusedMoEWithLoRA:
    def __init__(self, slots):
        import torch
        self.w13_lora_b_stacked = tuple(torch.zeros(slots, 2, 6, 4) for _ in range(2))
        self.w2_lora_b_stacked = (torch.zeros(slots, 2, 8, 4),)
        self.lora_b_stacked = ["per-expert views, not read by the report"]


class FusedMoE3DWithLoRA(FusedMoEWithLoRA):
    pass


def weights(packed: bool, present=(True, True, True)):
    if packed:
        return SimpleNamespace(lora_a=["t" if p else None for p in present],
                               lora_b=["t" if p else None for p in present])
    return SimpleNamespace(lora_a="t", lora_b="t")


def expert_children(prefix, experts=2):
    return [f"{prefix}.{e}.{w}" for e in range(experts) for w in ("w1", "w2", "w3")]


def manager(adapters: dict, *, moe_cls=FusedMoEWithLoRA, slots=(1, None), mixed=False):
    """A LoRAModelManager-shaped object: Mixtral layer 0 with qkv_proj and experts wrapped."""
    moe = f"{L0}.block_sparse_moe.experts"
    modules = {f"{L0}.self_attn.qkv_proj": MergedQKVParallelLinearWithLoRA(len(slots)),
               moe: moe_cls(len(slots))}
    packed = {f"{L0}.self_attn.qkv_proj": [f"{L0}.self_attn.{p}" for p in ("q_proj", "k_proj",
                                                                            "v_proj")]}
    if moe_cls is FusedMoEWithLoRA:
        packed[moe] = expert_children(moe)
    models = {i: SimpleNamespace(loras=loras, is_3d_lora_weight=is_3d)
              for i, (loras, is_3d) in adapters.items()}
    return SimpleNamespace(modules=modules, packed_modules=packed, lora_index_to_id=list(slots),
                           list_adapters=lambda: dict(models),
                           _enable_mixed_moe_lora_format=mixed)


def fake_worker(mgr):
    return SimpleNamespace(model_runner=SimpleNamespace(
        lora_manager=SimpleNamespace(_adapter_manager=mgr)))


def report(mgr, names=None):
    return applied.adapter_report_from_tables(applied.worker_lora_tables(fake_worker(mgr)),
                                              names)


def test_converted_expert_adapter_reaches_every_expert():
    moe = f"{L0}.block_sparse_moe.experts"
    mgr = manager({1: ({moe: weights(True)}, False)})
    got = report(mgr, {1: "x"})["x"]
    assert got["applied"] == sorted(expert_children(moe)) and got["unmatched"] == []
    assert got["wrapped_modules"] == 2 and got["slot"] == 0 and got["registered"]


def test_peft_3d_adapter_on_mixtral_is_unmatched():
    # vLLM 0.26 accepts ".experts" names, keeps them under the HF path and never reads them
    names = {f"{L0}.mlp.experts": weights(False), f"{L0}.mlp.experts.base_layer": weights(False)}
    got = report(manager({1: (names, True)}))["1"]
    assert got["applied"] == [] and got["unmatched"] == sorted(names)


def test_3d_tensor_under_the_2d_wrapper_is_unmatched():
    moe = f"{L0}.block_sparse_moe.experts"
    got = report(manager({1: ({moe: weights(False)}, False)}))["1"]
    assert got["unmatched"] == [moe] and got["applied"] == []


def test_packed_dense_slices_and_unwrapped_module():
    loras = {f"{L0}.self_attn.qkv_proj": weights(True, (True, False, True)),
             f"{L0}.self_attn.o_proj": weights(False)}  # o_proj not wrapped (target_modules)
    got = report(manager({1: (loras, False)}))["1"]
    assert got["applied"] == [f"{L0}.self_attn.q_proj", f"{L0}.self_attn.v_proj"]
    assert got["unmatched"] == [f"{L0}.self_attn.o_proj"]


def test_3d_moe_model_consumes_base_layer():
    moe = f"{L0}.mlp.experts"
    mgr = manager({1: ({f"{L0}.block_sparse_moe.experts": weights(True),
                        f"{L0}.block_sparse_moe.experts.base_layer": weights(False),
                        moe: weights(False)}, True)}, moe_cls=FusedMoE3DWithLoRA)
    got = report(mgr)["1"]
    assert got["applied"] == [f"{L0}.block_sparse_moe.experts",
                              f"{L0}.block_sparse_moe.experts.base_layer"]
    assert got["unmatched"] == [moe]


def test_mixed_format_3d_adapter_applied_under_its_own_names():
    moe = f"{L0}.block_sparse_moe.experts"
    mgr = manager({1: ({moe: weights(True)}, True)}, mixed=True)
    assert report(mgr)["1"]["applied"] == [moe, moe + ".base_layer"]


def test_slot_nonzero_b_and_unregistered_adapter():
    moe = f"{L0}.block_sparse_moe.experts"
    mgr = manager({1: ({moe: weights(True)}, False), 2: ({moe: weights(True)}, False)},
                  slots=(2, 1))
    mgr.modules[moe].w2_lora_b_stacked[0][1, 1, 3, 0] = 0.5      # adapter 1 sits in slot 1
    mgr.modules[f"{L0}.self_attn.qkv_proj"].lora_b_stacked[2][0, 0, 0, 0] = 1.0  # adapter 2
    got = report(mgr, {1: "one", 2: "two", 3: "three"})
    assert got["one"]["slot"] == 1 and got["one"]["slot_nonzero_b"] == [moe]
    assert got["two"]["slot"] == 0
    assert got["two"]["slot_nonzero_b"] == [f"{L0}.self_attn.qkv_proj"]
    assert got["three"]["registered"] is False and got["three"]["applied"] == []


def test_inactive_adapter_has_no_slot():
    moe = f"{L0}.block_sparse_moe.experts"
    got = report(manager({5: ({moe: weights(True)}, False)}, slots=(None, None)))["5"]
    assert got["slot"] is None and got["slot_nonzero_b"] is None


def test_worker_without_lora_manager_is_an_error():
    with pytest.raises(RuntimeError, match="enable_lora"):
        applied.worker_lora_tables(SimpleNamespace(model_runner=SimpleNamespace()))


class FakeLLM:
    """collective_rpc as vLLM's LLM.collective_rpc: the callable gets the worker first."""

    def __init__(self, worker):
        self.worker, self.calls = worker, []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(method)
        return [method(self.worker, *args, **(kwargs or {}))]


def test_vllm_adapter_report_ships_the_worker_function(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    moe = f"{L0}.block_sparse_moe.experts"
    llm = FakeLLM(fake_worker(manager({1: ({moe: weights(True)}, False)})))
    got = applied.vllm_adapter_report(llm, {1: "r16-experts"})
    assert llm.calls == [applied.worker_lora_tables]
    assert got["r16-experts"]["applied"] == sorted(expert_children(moe))


def test_vllm_adapter_report_needs_serialization_env(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    llm = FakeLLM(fake_worker(manager({})))
    with pytest.raises(RuntimeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION=1"):
        applied.vllm_adapter_report(llm)
    assert llm.calls == []
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core
    assert applied.vllm_adapter_report(llm) == {}


@needs_vllm_src("lora/model_manager.py")
def test_stand_ins_match_the_vllm_source():
    """Every attribute and class name the worker function reads exists in vLLM 0.26."""
    src = {p: (VLLM_SRC / p).read_text() for p in (
        "lora/model_manager.py", "lora/worker_manager.py", "lora/lora_model.py",
        "v1/worker/lora_model_runner_mixin.py", "lora/layers/fused_moe.py",
        "lora/layers/base_linear.py", "lora/layers/column_parallel_linear.py",
        "lora/layers/row_parallel_linear.py", "v1/worker/gpu_worker.py")}
    needles = {
        "lora/model_manager.py": ["self.lora_index_to_id: list[int | None]",
                                  "self.modules: dict[str, BaseLayerWithLoRA] = {}",
                                  "self.packed_modules: dict[str, list[str]] = {}",
                                  "def list_adapters(self) -> dict[int, LoRAModel]:",
                                  "self._enable_mixed_moe_lora_format = ("],
        "lora/worker_manager.py": ["self._adapter_manager = lora_manager"],
        "lora/lora_model.py": ["self.loras: dict[str, LoRALayerWeights] = loras",
                               "self.is_3d_lora_weight = is_3d_lora_weight"],
        "v1/worker/lora_model_runner_mixin.py": ["self.lora_manager = LRUCacheWorkerLoRAManager("],
        "v1/worker/gpu_worker.py": ["return self.model_runner.add_lora(lora_request)"],
        "lora/layers/fused_moe.py": ["class FusedMoEWithLoRA(BaseLayerWithLoRA):",
                                     "class FusedMoE3DWithLoRA(FusedMoEWithLoRA):",
                                     "self.w13_lora_b_stacked: tuple[torch.Tensor, ...]",
                                     "self.w2_lora_b_stacked: tuple[torch.Tensor, ...]"],
        "lora/layers/base_linear.py": ["self.lora_b_stacked = tuple("],
        "lora/layers/column_parallel_linear.py": [
            "class MergedQKVParallelLinearWithLoRA(MergedColumnParallelLinearWithLoRA):"],
        "lora/layers/row_parallel_linear.py": [
            "class RowParallelLinearWithLoRA(BaseLinearLayerWithLoRA):"],
    }
    missing = [(p, n) for p, ns in needles.items() for n in ns if n not in src[p]]
    assert missing == []
