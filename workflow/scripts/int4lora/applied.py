"""Which adapter tensors reached a module: HF/PEFT and vLLM 0.26.

A LoRA tensor whose name matches no module is dropped silently by both engines (PEFT warns
at most; vLLM 0.26 keeps it in the loaded LoRAModel and never reads it, saying so only at
DEBUG level). These checks turn that into a list of names a validation can FAIL on.

vLLM: ``vllm_adapter_report(llm)`` ships ``worker_lora_tables`` to the engine's worker with
``LLM.collective_rpc``. With vLLM's default multiprocess engine core a callable only crosses
the process boundary when VLLM_ALLOW_INSECURE_SERIALIZATION=1 was in the environment when
the engine was created (vllm/v1/serial_utils.py); REPORT_ENGINE_ENV holds it. The function is
pickled by reference, so ``int4lora`` must be importable in the engine core (it is: spawned
and forked children inherit sys.path). Facts and file:line: docs/notes/vllm-lora.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

REPORT_ENGINE_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


# --------------------------------------------------------------------------- HF / PEFT


def _same_values(in_model, in_file) -> bool:
    """Equal after casting both to the narrower of the two dtypes (PEFT may upcast)."""
    import torch
    if tuple(in_model.shape) != tuple(in_file.shape):
        return False
    narrow = min((in_model.dtype, in_file.dtype), key=lambda d: torch.finfo(d).bits)
    return torch.equal(in_model.detach().to("cpu", narrow), in_file.to(narrow))


def peft_unapplied_tensors(peft_model, adapter_name: str, adapter_dir) -> list[str]:
    """Tensor names of adapter_dir/adapter_model.safetensors that did not land in the model:
    absent from PEFT's state dict of that adapter, or there with another shape or value."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    known = list(getattr(peft_model, "peft_config", {}) or {})
    if adapter_name not in known:
        raise ValueError(f"adapter {adapter_name!r} is not loaded in the model "
                         f"(loaded: {known})")
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    in_model = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return sorted(name for name, tensor in load_file(str(path)).items()
                  if name not in in_model or not _same_values(in_model[name], tensor))


# --------------------------------------------------------------------------- vLLM, worker side


def _present(factor) -> list[bool] | bool:
    if isinstance(factor, (list, tuple)):
        return [f is not None for f in factor]
    return factor is not None


def _lora_entries(lora_model) -> dict:
    """{module name: {"packed": bool, "a": presence, "b": presence}} of a loaded LoRAModel."""
    return {name: {"packed": isinstance(w.lora_a, (list, tuple)), "a": _present(w.lora_a),
                   "b": _present(w.lora_b)}
            for name, w in lora_model.loras.items()}


def _slot_b_buffers(module) -> list:
    """The stacked LoRA-B buffers of a wrapped module (first dim = slot)."""
    names = ("w13_lora_b_stacked", "w2_lora_b_stacked") \
        if hasattr(module, "w13_lora_b_stacked") else ("lora_b_stacked",)
    out = []
    for attr in names:
        value = getattr(module, attr, None)
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return [t for t in out if t is not None]


def _nonzero_b_modules(modules: Mapping[str, Any], slot: int) -> list[str]:
    return sorted(name for name, module in modules.items()
                  if any(bool(t[slot].any()) for t in _slot_b_buffers(module)))


def lora_tables(manager) -> dict:
    """Plain-data view of a vLLM LoRAModelManager: wrapped modules, packing, slots and each
    registered adapter's loaded entries (the pure input of adapter_report_from_tables)."""
    slots = list(manager.lora_index_to_id)
    adapters = {}
    for lora_id, lora_model in manager.list_adapters().items():
        slot = slots.index(lora_id) if lora_id in slots else None
        adapters[str(lora_id)] = {
            "is_3d_lora_weight": bool(getattr(lora_model, "is_3d_lora_weight", False)),
            "loras": _lora_entries(lora_model), "slot": slot,
            "slot_nonzero_b": None if slot is None else _nonzero_b_modules(manager.modules, slot),
        }
    return {
        "wrapped": {name: type(m).__name__ for name, m in manager.modules.items()},
        "packed": {name: list(children) for name, children in manager.packed_modules.items()},
        "mixed_moe_format": bool(getattr(manager, "_enable_mixed_moe_lora_format", False)),
        "slots": slots, "adapters": adapters,
    }


def worker_lora_tables(worker) -> dict:
    """Runs inside the vLLM worker (collective_rpc): the LoRA tables of its model runner."""
    runner = getattr(worker, "model_runner", None)
    lora_manager = getattr(runner, "lora_manager", None)
    if lora_manager is None:
        raise RuntimeError("the vLLM worker has no LoRA manager: engine built without "
                           "enable_lora=True")
    return lora_tables(lora_manager._adapter_manager)


# --------------------------------------------------------------------------- vLLM, pure part

_MOE_WRAPPERS = ("FusedMoEWithLoRA", "FusedMoE3DWithLoRA")


def _consumed_names(name: str, entry: dict, tables: dict, is_3d: bool) -> list[str] | None:
    """Module names an engine entry feeds into a slot, or None when no slot reads it."""
    wrapped, packed = tables["wrapped"], tables["packed"]
    cls = wrapped.get(name)
    if cls is None:
        parent = name.removesuffix(".base_layer")
        # 3D layout: gate_up_proj sits under ".base_layer" and is stacked into the parent
        # (model_manager.py _stack_moe_lora_weights); the 2D wrapper never reads it
        if parent != name and wrapped.get(parent) == "FusedMoE3DWithLoRA":
            return [name]
        return None
    if cls == "FusedMoEWithLoRA" and not entry["packed"]:
        return None  # a 3D tensor under the 2D wrapper: set_lora cannot take it
    if not entry["packed"]:
        return [name]
    children = packed.get(name)
    if cls in _MOE_WRAPPERS:
        if is_3d and tables["mixed_moe_format"]:
            # 3D file split for the 2D wrapper (_convert_3d_to_2d_moe_lora), which pops
            # the ".base_layer" (gate_up_proj) entry after use
            return [name, name + ".base_layer"]
        # 2D: pack_moe asserts every expert's w1, w2, w3 are present
        return list(children) if children else [name]
    if children is None or len(children) != len(entry["a"]):
        return [name]
    return [c for c, a, b in zip(children, entry["a"], entry["b"]) if a and b]


def adapter_report_from_tables(tables: dict,
                               adapter_names: Mapping[int, str] | None = None) -> dict:
    """{adapter: {"applied", "unmatched", "wrapped_modules", "slot", "slot_nonzero_b",
    "registered"}}. applied / unmatched hold vLLM module names (an adapter file's tensors
    are "base_model.model.<name>.lora_A/B.weight"); unmatched ones are never read."""
    names = {str(k): v for k, v in (adapter_names or {}).items()}
    report = {}
    for lora_id, adapter in tables["adapters"].items():
        applied, unmatched = [], []
        for name, entry in adapter["loras"].items():
            consumed = _consumed_names(name, entry, tables, adapter["is_3d_lora_weight"])
            if consumed is None:
                unmatched.append(name)
            else:
                applied.extend(consumed)
        report[names.get(lora_id, lora_id)] = {
            "applied": sorted(set(applied)), "unmatched": sorted(unmatched),
            "wrapped_modules": len(tables["wrapped"]), "slot": adapter["slot"],
            "slot_nonzero_b": adapter["slot_nonzero_b"], "registered": True}
    for lora_id, name in names.items():
        if name not in report:
            report[name] = {"applied": [], "unmatched": [], "registered": False,
                            "wrapped_modules": len(tables["wrapped"]), "slot": None,
                            "slot_nonzero_b": None}
    return report


def vllm_adapter_report(llm, adapter_names: Mapping[int, str] | None = None) -> dict:
    """Ask a running vllm.LLM which tensors of each registered adapter reach a LoRA-wrapped
    module. Call after add_lora; adapter_names maps lora_int_id -> name (ids not registered
    in the engine are reported with registered=False)."""
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
    if not in_process and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
        raise RuntimeError("vllm_adapter_report ships a function to the engine core: create "
                           "the engine with VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the "
                           "environment (int4lora.applied.REPORT_ENGINE_ENV)")
    results = llm.collective_rpc(worker_lora_tables)
    if not results:
        raise RuntimeError("collective_rpc returned no worker result")
    return adapter_report_from_tables(results[0], adapter_names)
