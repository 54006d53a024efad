"""vLLM 0.26 LoRA layout: engine arguments from the adapters a job serves, PEFT 3D expert
adapters rewritten in the per-expert 2D layout vLLM loads, and the bytes of vLLM's LoRA slots.

Pure: imports without vLLM (torch and safetensors only inside the converter). Every fact
below is taken from the vLLM 0.26.0 source; docs/notes/vllm-lora.md gives file:line for each.

LoRA speed knobs of vLLM 0.26 that this module documents but does not set:
- ``specialize_active_lora`` (LoRAConfig, default False): the Punica grid's LoRA dimension is
  the number of active adapters (rounded up to a captured power of two) instead of
  max_loras + 1, with one CUDA graph per count; only with cudagraph_specialize_lora.
- ``compilation_config.cudagraph_specialize_lora`` (default True): separate CUDA graphs for
  batches with and without active adapters, so base-only batches skip the LoRA kernels.
- ``max_cpu_loras`` (default max_loras): adapters kept in host memory; an adapter outside this
  LRU cache is re-read from disk when requested.
- ``VLLM_LORA_ENABLE_DUAL_STREAM=1``: LoRA shrink/expand on a second CUDA stream, overlapping
  the base GEMM (dense and fused-MoE layers), and PDL launches on SM90+.
- ``VLLM_LORA_DISABLE_PDL=1``: no programmatic dependent launch for the LoRA kernels.
- ``VLLM_TUNED_CONFIG_FOLDER``: tuned Triton tile configs for shrink/expand/fused-MoE LoRA.
- ``fully_sharded_loras``: tensor-parallel sharding of the LoRA buffers (TP > 1 only).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

# vllm/config/lora.py: MaxLoRARanks
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

MOE_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})
DENSE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# PEFT target_modules name -> the vLLM module whose LoRA slots carry it
# (the models' packed_modules_mapping: qkv_proj <- q/k/v, gate_up_proj <- gate/up).
PEFT_TO_VLLM_MODULE = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
    "lm_head": "lm_head", "embed_tokens": "embed_tokens",
}
# Dense MLP modules that vLLM's Mixtral does not have (its MLP is the MoE block).
_NO_DENSE_MLP = frozenset({"mixtral"})
# The MoERunner of every MoE model is registered under this suffix (lora/utils.py).
VLLM_MOE_MODULE = "experts"
_EXPERT_PARAM = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")


# --------------------------------------------------------------------------- engine arguments


def smallest_vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM 0.26 accepts that holds an adapter of this rank."""
    if int(rank) < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1")
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= int(rank):
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank "
                     f"{VLLM_MAX_LORA_RANKS[-1]}")


def vllm_target_modules(adapter: dict, model_type: str) -> set[str]:
    """vLLM module suffixes that must be LoRA-wrapped for one adapter on this architecture
    (from target_modules / target_parameters, else make_adapter's "targets")."""
    if model_type not in MOE_MODEL_TYPES | DENSE_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: no vLLM LoRA module map (known: "
                         f"{', '.join(sorted(MOE_MODEL_TYPES | DENSE_MODEL_TYPES))})")
    modules = set()
    names = list(adapter.get("target_modules") or [])
    if not names and not adapter.get("target_parameters"):
        # make_adapter's metrics: "targets" = module suffixes of the tensors ("experts")
        names = list(adapter.get("targets") or [])
    for name in names:
        if name == VLLM_MOE_MODULE and model_type in MOE_MODEL_TYPES:
            modules.add(VLLM_MOE_MODULE)
            continue
        mapped = PEFT_TO_VLLM_MODULE.get(name)
        if mapped is None:
            raise ValueError(f"adapter target_modules entry {name!r} has no vLLM module "
                             f"(known: {', '.join(sorted(PEFT_TO_VLLM_MODULE))})")
        if model_type in _NO_DENSE_MLP and mapped in ("gate_up_proj", "down_proj"):
            raise ValueError(f"target {name!r}: vLLM's {model_type} has no dense MLP module")
        modules.add(mapped)
    for name in adapter.get("target_parameters") or []:
        if not _EXPERT_PARAM.search(name):
            raise ValueError(f"adapter target_parameters entry {name!r} is not a fused "
                             f"expert parameter (…experts.gate_up_proj / …experts.down_proj)")
        if model_type not in MOE_MODEL_TYPES:
            raise ValueError(f"target_parameters {name!r}: {model_type} has no experts")
        modules.add(VLLM_MOE_MODULE)
    if not modules:
        raise ValueError(f"adapter {adapter} targets nothing")
    return modules


def vllm_lora_engine_args(adapters: list[dict], model_type: str, *, slots: int) -> dict:
    """vllm.LLM LoRA arguments for a job serving these adapters (make_adapter metrics dicts).

    - max_loras = slots: distinct adapters one batch carries (GPU slot buffers).
    - max_lora_rank: smallest allowed value >= the largest adapter rank (buffers and the
      Punica kernels work at this width, so a larger value only costs bytes and time).
    - max_cpu_loras = max(slots, len(adapters)): every served adapter stays in host memory.
    - lora_target_modules: vLLM module suffixes the adapters need; vLLM wraps every
      LoRA-capable layer when it is None (LoRAConfig.target_modules).
    """
    if not adapters:
        raise ValueError("no adapters given: a LoRA engine needs at least one")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots={slots!r} must be an integer >= 1")
    ranks = []
    targets: set[str] = set()
    for adapter in adapters:
        rank = adapter.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"adapter rank {rank!r} is not an integer")
        ranks.append(rank)
        targets |= vllm_target_modules(adapter, model_type)
    return {"enable_lora": True, "max_loras": slots,
            "max_lora_rank": smallest_vllm_rank(max(ranks)),
            "max_cpu_loras": max(slots, len(adapters)),
            "lora_target_modules": sorted(targets)}


# --------------------------------------------------------------------------- slot bytes


def _arch_dims(arch: dict) -> dict:
    try:
        hidden, layers = int(arch["hidden_size"]), int(arch["num_hidden_layers"])
        heads = int(arch["num_attention_heads"])
        kv_heads = int(arch.get("num_key_value_heads") or heads)
    except KeyError as exc:
        raise ValueError(f"arch lacks {exc.args[0]!r}: {sorted(arch)}") from None
    head_dim = int(arch.get("head_dim") or hidden // heads)
    experts = arch.get("num_local_experts") or arch.get("num_experts")
    return {"H": hidden, "L": layers, "q": heads * head_dim, "kv": kv_heads * head_dim,
            "E": int(experts) if experts else 0, "V": arch.get("vocab_size"),
            "I": arch.get("intermediate_size"),
            "I_moe": arch.get("moe_intermediate_size") or arch.get("intermediate_size"),
            "I_shared": arch.get("shared_expert_intermediate_size")}


def _need(dims: dict, key: str, module: str) -> int:
    if not dims.get(key):
        raise ValueError(f"module {module!r} needs arch field for {key} (missing)")
    return int(dims[key])


def _mlp_width(dims: dict, module: str) -> int:
    # a MoE model's dense gate_up/down_proj are its shared expert (qwen2_moe)
    return _need(dims, "I_shared" if dims["E"] else "I", module)


def _module_elements(module: str, dims: dict, experts: int | None) -> tuple[int, int]:
    """(A, B) elements of ONE slot of one module, per unit of rank: create_lora_weights of
    vllm/lora/layers/{column,row}_parallel_linear.py, replicated_linear.py, fused_moe.py,
    logits_processor.py, vocal_parallel_embedding.py (TP = 1)."""
    H = dims["H"]
    if module == "qkv_proj":    # MergedQKVParallelLinearWithLoRA: 3 slices
        return 3 * H, dims["q"] + 2 * dims["kv"]
    if module == "o_proj":      # RowParallelLinearWithLoRA
        return dims["q"], H
    if module == "gate_up_proj":  # MergedColumnParallelLinearWithLoRA: 2 slices
        return 2 * H, 2 * _mlp_width(dims, module)
    if module == "down_proj":
        return _mlp_width(dims, module), H
    if module == "gate":        # router, ReplicatedLinearWithLoRA
        return H, _need(dims, "E", module)
    if module == "shared_expert_gate":
        return H, 1
    if module == VLLM_MOE_MODULE:  # FusedMoEWithLoRA: w1, w3 (A: r x H, B: I x r), w2
        n = _need(dims, "E", module) if experts is None else int(experts)
        inter = _need(dims, "I_moe", module)
        return n * (2 * H + inter), n * (2 * inter + H)
    if module == "lm_head":     # LogitsProcessorWithLoRA
        return H, _need(dims, "V", module)
    raise ValueError(f"unknown vLLM LoRA module {module!r} (known: qkv_proj, o_proj, "
                     f"gate_up_proj, down_proj, gate, shared_expert_gate, experts, "
                     f"lm_head, embed_tokens)")


def _check_counts(**counts) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer")


def lora_slot_bytes(arch: dict, wrapped_modules: list[str], *, slots: int, max_rank: int,
                    dtype_bytes: int = 2) -> int:
    """Bytes of the stacked LoRA A/B buffers vLLM allocates for these wrapped modules
    (every decoder layer; lm_head / embed_tokens once), at max_lora_rank width, TP = 1."""
    _check_counts(slots=slots, max_rank=max_rank, dtype_bytes=dtype_bytes)
    dims = _arch_dims(arch)
    elements = 0
    for module in sorted(set(wrapped_modules)):
        if module == "embed_tokens":  # A: V x r, B: H x r (VocabParallelEmbeddingWithLoRA)
            elements += _need(dims, "V", module) + dims["H"]
            continue
        a, b = _module_elements(module, dims, None)
        elements += (a + b) * (1 if module == "lm_head" else dims["L"])
    return elements * slots * max_rank * dtype_bytes


def lora_bytes_per_decode_step(arch: dict, wrapped_modules: list[str], *,
                               active_adapters: int, max_rank: int,
                               experts_touched: int | None = None, batch: int = 1,
                               dtype_bytes: int = 2) -> int:
    """LoRA weight bytes one decode step reads for adapter requests.

    Assumptions (vLLM 0.26 kernels): the Punica shrink/expand grid has one program column
    per slot, and columns of empty slots or of base tokens (lora id -1) return before
    loading weights, so each of the ``active_adapters`` distinct adapters in the batch reads
    its own A and B once per wrapped module, at the full max_lora_rank width; no adapter in
    the batch -> the kernels are skipped (0 bytes). Fused-MoE LoRA reads only the experts
    its tokens are routed to: ``experts_touched`` per adapter and layer (None = all, an
    upper bound). embed_tokens reads ``batch`` rows of A. Activations are not counted.
    """
    _check_counts(active_adapters=active_adapters, max_rank=max_rank, batch=batch,
                  dtype_bytes=dtype_bytes)
    if experts_touched is not None:
        _check_counts(experts_touched=experts_touched)
    dims = _arch_dims(arch)
    elements = 0
    for module in sorted(set(wrapped_modules)):
        if module == "embed_tokens":
            elements += min(batch, _need(dims, "V", module)) + dims["H"]
            continue
        a, b = _module_elements(module, dims, experts_touched)
        elements += (a + b) * (1 if module == "lm_head" else dims["L"])
    return elements * active_adapters * max_rank * dtype_bytes


# --------------------------------------------------------------------------- expert adapters


@dataclass(frozen=True)
class ExpertLayout:
    """Where vLLM 0.26 reads per-expert LoRA for one architecture."""
    vllm_block: str   # module path of the MoERunner under model.layers.N
    gate: str         # checkpoint names of gate, down, up (FusedMoE ckpt_names)
    down: str
    up: str


EXPERT_LAYOUTS = {
    "mixtral": ExpertLayout("block_sparse_moe.experts", "w1", "w2", "w3"),
    "qwen2_moe": ExpertLayout("mlp.experts", "gate_proj", "down_proj", "up_proj"),
    "qwen3_moe": ExpertLayout("mlp.experts", "gate_proj", "down_proj", "up_proj"),
}
# PEFT target_parameters tensors: ParamWrappers nest, the inner one saved as ".base_layer"
_PEFT_EXPERT_KEY = re.compile(
    r"^(?P<layer>.*\.layers\.\d+\.)mlp\.experts\.(?P<inner>base_layer\.)?"
    r"lora_(?P<ab>[AB])\.weight$")


def _expert_pairs(tensors: dict) -> tuple[dict, dict]:
    """{layer prefix: {wrapper: {"A": t, "B": t}}} for expert tensors; the rest as is."""
    layers: dict[str, dict] = {}
    dense = {}
    for name, tensor in tensors.items():
        m = _PEFT_EXPERT_KEY.match(name)
        if m is None:
            if ".experts." in name:
                raise ValueError(f"expert tensor {name!r} is not in PEFT's target_parameters "
                                 f"layout (…mlp.experts[.base_layer].lora_A/B.weight)")
            dense[name] = tensor
            continue
        wrapper = "inner" if m["inner"] else "outer"
        layers.setdefault(m["layer"], {}).setdefault(wrapper, {})[m["ab"]] = tensor
    for layer, wrappers in layers.items():
        for wrapper, pair in wrappers.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{layer}mlp.experts ({wrapper}): lora_A and lora_B must "
                                 f"both be present, found {sorted(pair)}")
    return layers, dense


def _identify(wrappers: dict, target_parameters: list[str], layer: str) -> dict:
    """{"gate_up": pair, "down": pair}: by shape when both are present (gate_up A is
    [r*E, H] with B [2I, r*E]; down A is [r*E, I] with B [H, r*E]), else by the config."""
    pairs = list(wrappers.values())
    if len(pairs) == 2:
        p, q = pairs
        for gu, dn in ((p, q), (q, p)):
            if gu["B"].shape[0] == 2 * dn["A"].shape[1] and gu["A"].shape[1] == dn["B"].shape[0]:
                return {"gate_up": gu, "down": dn}
        raise ValueError(f"{layer}mlp.experts: tensor shapes "
                         f"{[(tuple(x['A'].shape), tuple(x['B'].shape)) for x in pairs]} "
                         f"are not a gate_up_proj / down_proj pair")
    names = [t.rsplit(".", 1)[-1] for t in target_parameters if "experts" in t]
    if len(names) != 1 or names[0] not in ("gate_up_proj", "down_proj"):
        raise ValueError(f"{layer}mlp.experts: one LoRA pair but target_parameters "
                         f"{target_parameters} do not say which parameter it adapts")
    return {"gate_up" if names[0] == "gate_up_proj" else "down": pairs[0]}


def _per_expert(pair: dict, num_experts: int, what: str) -> tuple[list, list]:
    """PEFT ParamWrapper layout -> per-expert (A [r, in], B [out, r]): A rows are
    expert-major (e*r + j), B columns expert-minor (j*E + e); peft/tuners/lora/layer.py
    ParamWrapper.get_delta_weight."""
    a, b = pair["A"], pair["B"]
    if a.shape[0] % num_experts or b.shape[1] != a.shape[0]:
        raise ValueError(f"{what}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                         f"hold num_experts={num_experts} experts of one rank")
    rank = a.shape[0] // num_experts
    a3 = a.reshape(num_experts, rank, a.shape[1])
    b3 = b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)
    return [a3[e] for e in range(num_experts)], [b3[e] for e in range(num_experts)]


def _convert_layer(layer: str, pairs: dict, layout: ExpertLayout, num_experts: int,
                   zero_filled: set) -> dict:
    """vLLM tensors of one layer: every expert gets gate, up and down (pack_moe needs all
    three); a projection the adapter does not adapt gets zeros, recorded in zero_filled."""
    import torch
    gu, dn = pairs.get("gate_up"), pairs.get("down")
    ref = gu or dn
    rank = ref["A"].shape[0] // num_experts
    if gu is not None:
        hidden, inter = gu["A"].shape[1], gu["B"].shape[0] // 2
    else:
        hidden, inter = dn["B"].shape[0], dn["A"].shape[1]
    def zeros(rows, cols):
        return torch.zeros(rows, cols, dtype=ref["A"].dtype)

    out = {}
    ga, gb = _per_expert(gu, num_experts, f"{layer}gate_up_proj") if gu else (None, None)
    da, db = _per_expert(dn, num_experts, f"{layer}down_proj") if dn else (None, None)
    zero_filled.update(n for n, p in (("gate_up_proj", gu), ("down_proj", dn)) if p is None)
    for e in range(num_experts):
        base = f"{layer}{layout.vllm_block}.{e}."
        if gu is not None:
            gate, up = (ga[e], gb[e][:inter]), (ga[e], gb[e][inter:])
        else:
            gate = up = (zeros(rank, hidden), zeros(inter, rank))
        down = (da[e], db[e]) if dn is not None else (zeros(rank, inter), zeros(hidden, rank))
        parts = {layout.gate: gate, layout.up: up, layout.down: down}
        for proj, (a, b) in parts.items():
            out[f"{base}{proj}.lora_A.weight"] = a.contiguous().clone()
            out[f"{base}{proj}.lora_B.weight"] = b.contiguous().clone()
    return out


def _vllm_adapter_config(config: dict, tensors: dict) -> dict:
    """adapter_config.json for vLLM: target_modules = the module suffixes of the tensors
    (PEFTHelper requires the field; vLLM matches tensors by name, not by this list)."""
    out = dict(config)
    out["target_modules"] = sorted({n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1]
                                    for n in tensors})
    out["target_parameters"] = None
    return out


def convert_expert_adapter_for_vllm(adapter_dir, out_dir, *, model_type: str,
                                    num_experts: int) -> dict:
    """Rewrite a PEFT target_parameters (fused 3D experts) adapter as the per-expert 2D
    LoRA tensors vLLM 0.26 loads for ``model_type``; dense tensors are copied unchanged.

    Written to ``out_dir + '.partial'`` and renamed at the end (nothing half-written stays).
    Returns a summary (also written to out_dir/vllm_conversion.json).
    """
    from safetensors.torch import load_file, save_file

    if model_type not in EXPERT_LAYOUTS:
        raise ValueError(f"model_type {model_type!r}: no vLLM expert layout (known: "
                         f"{', '.join(sorted(EXPERT_LAYOUTS))})")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} must be an integer >= 1")
    src, dst = Path(adapter_dir), Path(out_dir)
    config = json.loads((src / "adapter_config.json").read_text())
    if config.get("use_rslora"):
        # vLLM's pack_moe scales experts by alpha / r whatever use_rslora says
        raise ValueError(f"{src}: use_rslora=True expert adapters are scaled wrongly by "
                         f"vLLM 0.26 (lora_weights.py pack_moe uses alpha / r)")
    layers, dense = _expert_pairs(load_file(str(src / "adapter_model.safetensors")))
    layout = EXPERT_LAYOUTS[model_type]
    tensors, zero_filled = dict(dense), set()
    for layer in sorted(layers):
        pairs = _identify(layers[layer], config.get("target_parameters") or [], layer)
        tensors.update(_convert_layer(layer, pairs, layout, num_experts, zero_filled))
    summary = {"layout": "vllm-2d-per-expert", "model_type": model_type,
               "source": str(src.resolve()), "moe_layers": len(layers),
               "num_experts": num_experts, "dense_tensors": len(dense),
               "expert_tensors": len(tensors) - len(dense),
               "zero_filled": sorted(zero_filled),
               "expert_module": f"model.layers.N.{layout.vllm_block}.E."
                                f"{{{layout.gate},{layout.up},{layout.down}}}"}
    staging = dst.with_name(dst.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        (staging / "adapter_config.json").write_text(
            json.dumps(_vllm_adapter_config(config, tensors), indent=2))
        (staging / "vllm_conversion.json").write_text(json.dumps(summary, indent=1))
        shutil.rmtree(dst, ignore_errors=True)
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def converted_delta(a, b, lora_alpha: float, rank: int):
    """The weight delta vLLM applies for one 2D pair: B is multiplied by alpha / r once
    (lora_weights.py optimize(); pack_moe uses alpha / r for experts), then x @ A^T @ B^T."""
    return (b.float() * (lora_alpha / rank)) @ a.float()


__all__ = ["VLLM_MAX_LORA_RANKS", "EXPERT_LAYOUTS", "smallest_vllm_rank",
           "vllm_target_modules", "vllm_lora_engine_args", "lora_slot_bytes",
           "lora_bytes_per_decode_step", "convert_expert_adapter_for_vllm", "converted_delta"]
