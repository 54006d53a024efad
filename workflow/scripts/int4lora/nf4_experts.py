"""Really-NF4 MoE experts for the HF engine (bitsandbytes), with PEFT expert LoRA on top.

transformers >= 5 stores Mixtral-style experts as fused 3D ``nn.Parameter``s
(``mlp.experts.gate_up_proj`` / ``down_proj``). ``BitsAndBytesConfig(load_in_4bit=True)``
only swaps ``nn.Linear`` for ``bnb.nn.Linear4bit``, so those experts -- most of a MoE's
weights -- silently stay bf16 (bitsandbytes issue #1849). This module quantizes them with
bitsandbytes' own route for arbitrary parameters, ``replace_parameter_4bit``: the packed
NF4 data becomes ``<module>.parametrizations.<name>.original`` and a torch parametrization
dequantizes it on access (once per module forward, thanks to bnb's cache hooks).

PEFT gotchas handled here (peft 0.21, see docs/notes/nf4-experts.md):
- ``target_parameters`` suffixes such as ``"mlp.experts.gate_up_proj"`` do not match an
  already-parametrized parameter (``NoMatchingPeftModuleError``); full names do
  (``expert_target_parameters``), or apply the adapter *before* quantizing the experts.
- ``ParamWrapper`` mishandles a parameter that already carries a parametrization: one of two
  LoRAs on a module is dropped (stale parametrize cache) and the other piles up on every
  forward (proxy never removed). ``patch_peft_param_wrapper`` fixes both;
  ``quantize_fused_experts`` applies it.
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from .coverage import FAMILIES, family_of

# Names of fused 3D expert weights in Mixtral-style models (transformers 5 and older ports).
EXPERT_PARAM_NAMES = {"gate_up_proj", "down_proj", "gate_proj", "up_proj", "w1", "w2", "w3"}
_FOUR_BIT = {"nf4", "fp4"}


def _bnb_parametrization(module: nn.Module, name: str):
    """The Bnb4bitParametrization on ``module.<name>``, or None."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    if not hasattr(module, "parametrizations") or name not in module.parametrizations:
        return None
    plist = module.parametrizations[name]
    return next((p for p in plist if isinstance(p, Bnb4bitParametrization)), None)


def find_fused_experts(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every fused 3D expert weight, quantized or not."""
    found = []
    for mod_name, module in model.named_modules():
        is_experts = type(module).__name__.endswith("Experts")
        for name, param in module._parameters.items():
            if param is not None and param.ndim == 3 and (is_experts or name in EXPERT_PARAM_NAMES):
                found.append((mod_name, module, name))
        for name in getattr(module, "parametrizations", {}):
            qs = _bnb_parametrization(module, name)
            if qs is not None and len(qs.quant_state.shape) == 3 and (
                    is_experts or name in EXPERT_PARAM_NAMES):
                found.append((mod_name, module, name))
    return found


def quantize_fused_experts(model: nn.Module, *, quant_type: str = "nf4",
                           compress_statistics: bool = True, blocksize: int = 64,
                           device: torch.device | str | None = None) -> list[str]:
    """Quantize every fused 3D expert parameter to 4-bit in place; return their qualified names.

    Uses ``bitsandbytes.nn.parametrize.replace_parameter_4bit`` (bnb 0.50 has CPU and CUDA
    kernels). ``device``: where each parameter is quantized and then kept (default: where
    it lives); the bf16 tensor is moved there one parameter at a time. Already-quantized
    parameters are skipped, so the call is idempotent. Works on a ``PeftModel`` too.
    """
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    patch_peft_param_wrapper()
    done = []
    for mod_name, module, name in find_fused_experts(model):
        if _bnb_parametrization(module, name) is not None:
            continue
        param = module._parameters[name]
        if device is not None and param.device != torch.device(device):
            setattr(module, name, nn.Parameter(param.data.to(device), requires_grad=False))
            del param
        replace_parameter_4bit(module, name, compress_statistics=compress_statistics,
                               quant_type=quant_type, blocksize=blocksize)
        done.append(f"{mod_name}.{name}" if mod_name else name)
    return done


def expert_target_parameters(
        model: nn.Module,
        suffixes=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) -> list[str]:
    """Full names for ``LoraConfig(target_parameters=...)`` on a model whose experts are NF4.

    PEFT matches already-parametrized parameters only by their full name (relative to the model
    handed to ``get_peft_model``). Caveat: the nesting order of the ParamWrappers then differs
    from a bf16 model's (sorted names vs. registration order), so an adapter *saved* from such a
    model does not load onto a bf16 one and vice versa; make adapters on the bf16 model and
    load them before quantizing (``load_nf4_model(adapters={...})``).
    """
    names = [f"{m}.{n}" if m else n for m, _, n in find_fused_experts(model)]
    return [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]


def patch_peft_param_wrapper() -> bool:
    """Fix PEFT's ParamWrapper for parameters that already carry a parametrization (our NF4 one).

    Two peft 0.21 bugs, both silent (wrong logits), both only when LoRA targets an
    already-parametrized parameter, as with NF4 experts:
    1. With two wrapped parameters on one module, the inner wrapper registers its LoRA proxy
       while the outer wrapper's ``parametrize.cached()`` is on; torch's shape check evaluates
       the parameter and caches it *without* the new delta, so that LoRA is never applied.
    2. On exit it only looks for ``_LoraParameterProxy`` in a multi-entry list, but a single
       adapter on a 3D parameter uses ``_LoraFactorsProxy``: it stays registered and the delta
       is added once more on every forward ("Could not find any LoRA parametrization").
    Idempotent; returns False when peft is not installed.
    """
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return False
    cls = lora_layer.ParamWrapper
    if getattr(cls, "_nf4_experts_patched", False):
        return True
    proxies = tuple(getattr(lora_layer, n) for n in ("_LoraParameterProxy", "_LoraFactorsProxy")
                    if hasattr(lora_layer, n))
    original_activate = cls._activate_lora
    original_remove = cls._remove_parametrizations

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        with original_activate(self, active_adapters):
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    def _remove_parametrizations(self):
        plist = self.get_base_layer().parametrizations[self.parameter_name]
        if len(plist) > 1:
            for i in reversed(range(len(plist))):
                if isinstance(plist[i], proxies):
                    del plist[i]
                    return
        return original_remove(self)

    cls._activate_lora = _activate_lora
    cls._remove_parametrizations = _remove_parametrizations
    cls._nf4_experts_patched = True
    return True


def _single_device(device_map) -> torch.device | None:
    """The one device a device_map names, or None for a multi-device map."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1 or "disk" in devices:
            return None
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    device = torch.device(device_map)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _skeleton(path, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def nf4_config(skeleton: nn.Module, compute_dtype: torch.dtype):
    """BitsAndBytesConfig (NF4, double quant) that also leaves router-family nn.Linear layers
    (Qwen2-MoE's shared_expert_gate, [1, H]) in 16 bit: routers are never quantized, and bnb's
    CPU kernel cannot run a 1-row NF4 linear. Other models keep transformers' default skips."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    routers = [n for n, m in skeleton.named_modules()
               if isinstance(m, nn.Linear) and family_of(f"{n}.weight") == "router"]
    skip = sorted(set(get_keys_to_not_convert(skeleton)) | set(routers)) if routers else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip)


def load_nf4_model(path, *, compute_dtype: torch.dtype, device_map, quantize_experts: bool = True,
                   adapters: dict[str, str] | None = None, trust_remote_code: bool = False):
    """Load an HF causal LM with bnb NF4 (double quant) everywhere, fused MoE experts included.

    Memory plan: when the model has fused experts and the target is an accelerator, the model
    is loaded with ``device_map={"": "cpu"}`` (bnb quantizes the nn.Linear layers on the CPU;
    experts stay bf16 in host memory), then each expert tensor is moved to the target device
    alone and quantized there (peak extra device memory: one bf16 expert stack of one layer),
    and finally the rest (already-4-bit linears, embeddings, norms, routers) is moved with
    ``model.to``. The whole bf16 model is never on the GPU; host memory must hold the bf16
    experts. Dense models load straight onto the target. Only single-device maps are supported
    for MoE models (the pipeline runs one GPU per job).

    ``adapters``: name -> PEFT adapter directory, loaded after the base and *before* the experts
    are quantized, so their suffix-style ``target_parameters`` match and their ParamWrapper
    nesting is the same as on the bf16 model they were made on. Returns the model (a PeftModel
    when adapters are given).
    """
    from transformers import AutoModelForCausalLM

    skeleton = _skeleton(path, trust_remote_code)
    bnb_config = nf4_config(skeleton, compute_dtype)
    target = _single_device(device_map)
    moe = bool(find_fused_experts(skeleton))
    if moe and quantize_experts and target is None:
        raise ValueError("load_nf4_model: MoE models need a single-device device_map, "
                         f"got {device_map!r}")
    staged = moe and quantize_experts and target.type != "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config, dtype=compute_dtype,
        device_map={"": "cpu"} if staged else device_map, trust_remote_code=trust_remote_code)
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    if quantize_experts:
        quantize_fused_experts(model, device=target)
    if staged:
        model.to(target)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.hf_device_map = {"": str(target)}
    return model


def _quant_state_tensors(qs):
    for t in (qs.absmax, qs.code, qs.offset):
        if isinstance(t, torch.Tensor):
            yield t
    if getattr(qs, "state2", None) is not None:  # nested states have no state2 attribute
        yield from _quant_state_tensors(qs.state2)


def _storage(model: nn.Module):
    """Yield (qualified weight name, kind, logical elements, stored bytes) for every parameter."""
    import bitsandbytes as bnb

    owners = dict(model.named_modules())
    seen_state = set()  # quant-state tensors can be shared (e.g. the nested code book)

    def state_bytes(qs):
        total = 0
        for t in _quant_state_tensors(qs):
            key = (t.device, t.data_ptr())
            if key not in seen_state:
                seen_state.add(key)
                total += t.numel() * t.element_size()
        return total

    for pname, p in model.named_parameters():
        stored = p.numel() * p.element_size()
        m = re.match(r"^(.*?)\.?parametrizations\.([^.]+)\.original$", pname)
        if m:
            owner = owners[m.group(1)]
            qs_mod = _bnb_parametrization(owner, m.group(2))
            name = f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2)
            if qs_mod is not None:
                qs = qs_mod.quant_state
                yield name, qs.quant_type, math.prod(qs.shape), stored + state_bytes(qs)
                continue
            pname = name
        if isinstance(p, bnb.nn.Params4bit) and p.quant_state is not None:
            qs = p.quant_state
            yield pname, qs.quant_type, math.prod(qs.shape), stored + state_bytes(qs)
        elif isinstance(p, bnb.nn.Int8Params) or p.dtype == torch.int8:
            yield pname, "int8", p.numel(), stored
        else:
            kind = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
                p.dtype, str(p.dtype).removeprefix("torch."))
            yield pname, kind, p.numel(), stored


def weight_storage_report(model: nn.Module) -> dict:
    """Weight bytes and element counts by storage kind and by module family.

    4-bit weights (bnb ``Params4bit`` and parametrized expert stacks) count their logical
    element count under ``params`` and their packed data plus quant state (absmax, nested
    absmax, code books, offset) under ``bytes``; the dequantized views are never counted.
    Buffers (rotary tables) are not weights and are left out. ``share_4bit`` is the fraction of
    a family's weight elements stored in 4 bits; biases (Qwen2's q/k/v, never quantized by any
    engine) are counted in ``params`` and ``bias_params`` but not in the share.
    """
    by_kind: dict[str, dict] = {}
    by_family = {f: {"bytes": 0, "params": 0, "params_4bit": 0, "bias_params": 0, "tensors": 0,
                     "by_kind": {}} for f in FAMILIES}
    for name, kind, n, nbytes in _storage(model):
        k = by_kind.setdefault(kind, {"bytes": 0, "params": 0, "tensors": 0})
        k["bytes"] += nbytes
        k["params"] += n
        k["tensors"] += 1
        fam = by_family[family_of(name)]
        fam["bytes"] += nbytes
        fam["params"] += n
        fam["tensors"] += 1
        fam["params_4bit"] += n if kind in _FOUR_BIT else 0
        fam["bias_params"] += n if name.endswith(".bias") else 0
        fk = fam["by_kind"].setdefault(kind, {"bytes": 0, "params": 0})
        fk["bytes"] += nbytes
        fk["params"] += n
    for fam in by_family.values():
        weights = fam["params"] - fam["bias_params"]
        fam["share_4bit"] = fam["params_4bit"] / weights if weights else None
    total_params = sum(f["params"] for f in by_family.values())
    params_4bit = sum(f["params_4bit"] for f in by_family.values())
    return {
        "total": {"bytes": sum(k["bytes"] for k in by_kind.values()), "params": total_params,
                  "params_4bit": params_4bit,
                  "share_4bit": params_4bit / total_params if total_params else None},
        "by_kind": by_kind,
        "by_family": {f: v for f, v in by_family.items() if v["tensors"]},
    }


def _fill_dense(model: nn.Module, reader, dtype, device,
                skip: set[str]) -> None:
    """Every parameter but the fused experts: linears become NF4 (transformers' own
    Bnb4bitQuantize route), the rest is copied; buffers move to `device`."""
    import bitsandbytes as bnb
    modules = dict(model.named_modules())
    for name, param in list(model.named_parameters()):
        if name in skip:
            continue
        owner_name, _, pname = name.rpartition(".")
        owner = modules[owner_name]
        value = reader.hf_tensor(name).to(device=device, dtype=dtype)
        if isinstance(owner, bnb.nn.Linear4bit) and pname == "weight":
            new = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(device)
        else:
            new = nn.Parameter(value, requires_grad=False)
        setattr(owner, pname, new)
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[bname] = buf.to(device)


def _placeholder_experts(model: nn.Module, dtype, device) -> None:
    """Fused experts as zero-stride views of one zero on `device` (no memory): PEFT can wrap
    them and puts their LoRA weights on `device`; on the meta device it would leave those
    LoRA weights on meta. _fill_experts replaces them with the real values."""
    zero = torch.zeros((), dtype=dtype, device=device)
    for _, module, name in find_fused_experts(model):
        shape = module._parameters[name].shape
        setattr(module, name, nn.Parameter(zero.expand(shape), requires_grad=False))


def _fill_experts(model: nn.Module, reader, dtype, device,
                  quantize: bool) -> None:
    """Fused experts one tensor at a time: dequantized on `device`, then NF4 in place."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit
    patch_peft_param_wrapper()
    for mod_name, module, name in find_fused_experts(model):
        shape = module._parameters[name].shape
        value = reader.fused_experts(f"{mod_name}.{name}", shape[0]).to(device=device, dtype=dtype)
        setattr(module, name, nn.Parameter(value, requires_grad=False))
        if quantize:
            replace_parameter_4bit(module, name, compress_statistics=True, quant_type="nf4",
                                   blocksize=64)


def load_nf4_from_compressed(ckpt_dir, compute_dtype: torch.dtype, device,
                             quantize_experts: bool = True,
                             adapters: dict[str, str] | None = None):
    """NF4 (double quant) model from a compressed-tensors W4A16 checkpoint, built layer by layer.

    The skeleton is built from config.json with empty weights; transformers' bnb quantizer swaps
    its nn.Linear for Linear4bit (same modules as ``load_nf4_model``). Each weight is then
    dequantized on ``device``, rounded to bf16 (what a 16-bit checkpoint of these int4 weights
    would hold), cast to ``compute_dtype`` and quantized to NF4 in place, so the model never
    exists in 16 bit. Adapters are attached while the fused experts are still empty (PEFT
    matches and nests them as on a bf16 model: _placeholder_experts); each expert tensor is
    then filled and quantized alone. Returns the model (a PeftModel with adapters).
    """
    from transformers.quantizers.auto import AutoHfQuantizer

    from .reference import CompressedReader, empty_model, plain_config

    target = _single_device(device)
    if target is None:
        raise ValueError(f"load_nf4_from_compressed: needs one device, got {device!r}")
    config = plain_config(ckpt_dir)
    model = empty_model(config, compute_dtype)
    bnb_config = nf4_config(model, compute_dtype)
    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.preprocess_model(model, dtype=compute_dtype, device_map={"": str(target)})
    reader = CompressedReader(ckpt_dir, target, config.model_type)
    experts = {f"{m}.{n}" for m, _, n in find_fused_experts(model)}
    _fill_dense(model, reader, compute_dtype, target, experts)
    if config.tie_word_embeddings:
        model.tie_weights()
    quantizer.postprocess_model(model)
    model.hf_quantizer, model.config.quantization_config = quantizer, bnb_config
    if adapters:
        from peft import PeftModel
        _placeholder_experts(model, compute_dtype, target)
        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0],
                                          torch_device=str(target))
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name, torch_device=str(target))
    _fill_experts(model, reader, compute_dtype, target, quantize_experts)
    # set only now: PEFT dispatches a model whose map names the CPU (meta experts cannot move)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.hf_device_map = {"": str(target)}
    return model.eval()
