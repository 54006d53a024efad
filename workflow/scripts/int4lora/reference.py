"""Higher-precision references: the engine's own 4-bit weights dequantized to fp32.

Comparing an engine with the dequantized form of its own weights isolates kernel and
LoRA error from quantization error; comparing with the original weights measures the
quantization error itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path


def _strip_quantization(model):
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def dequantize_bnb_model(model):
    """Replace every bitsandbytes 4-bit weight (Linear4bit and parametrized expert
    tensors) with its fp32 dequantized value, in place."""
    import bitsandbytes as bnb
    import torch
    from torch.nn.utils import parametrize

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                plain = torch.nn.Linear(child.in_features, child.out_features,
                                        bias=child.bias is not None, device=w.device,
                                        dtype=torch.float32)
                plain.weight.data.copy_(w.float())
                if child.bias is not None:
                    plain.bias.data.copy_(child.bias.data.float())
                setattr(parent, child_name, plain)
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                value = getattr(module, name).detach().float().clone()  # dequantized on access
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    _strip_quantization(model)
    return model.float()


def _dequantize_packed(packed, scale, shape, args: dict):
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    q = unpack_from_int32(packed, args["num_bits"], torch.Size(shape.tolist()))
    return dequantize(q, scale, None, QuantizationArgs(**args), dtype=torch.float32)


def compressed_state_dict(quant_dir: str | Path, device: str = "cpu") -> dict:
    """fp32 weights of a compressed-tensors pack-quantized checkpoint, under its own names
    (unpacked on `device`, the GPU in a GPU run)."""
    from safetensors import safe_open

    qcfg = json.loads((Path(quant_dir) / "config.json").read_text())["quantization_config"]
    args = next(iter(qcfg["config_groups"].values()))["weights"]
    raw = {}
    for path in sorted(Path(quant_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt", device=device) as fh:
            raw.update({k: fh.get_tensor(k) for k in fh.keys()})
    out = {}
    for key, tensor in raw.items():
        if key.endswith("weight_packed"):
            stem = key[: -len("_packed")]
            out[stem] = _dequantize_packed(tensor, raw[stem + "_scale"], raw[stem + "_shape"],
                                           args)
        elif not key.endswith(("weight_scale", "weight_shape", "weight_zero_point")):
            out[key] = tensor.float()
    return out


def fuse_experts(state: dict, target_keys: dict, model_type: str = "mixtral") -> dict:
    """Map per-expert Linear weights (checkpoint or vLLM names of this model_type, e.g. Mixtral
    block_sparse_moe.experts.N.{w1,w3,w2}, Qwen MoE mlp.experts.N.{gate,up,down}_proj) back to
    transformers 5 fused experts (mlp.experts.gate_up_proj [E, 2I, H] gate rows first,
    down_proj [E, H, I]); other names go through architectures.checkpoint_to_hf_name."""
    import torch

    from .architectures import checkpoint_to_hf_name, parse_expert_name

    fused, rest = {}, {}
    for key, tensor in state.items():
        parsed = parse_expert_name(key, model_type)
        if parsed and parsed[3] == "weight":
            layer, expert, role, _ = parsed
            fused.setdefault(layer, {}).setdefault(expert, {})[role] = tensor
        else:
            rest[checkpoint_to_hf_name(key, model_type)] = tensor
    for prefix, experts in fused.items():
        order = sorted(experts)
        rest[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate"], experts[e]["up"]], dim=0) for e in order])
        rest[f"{prefix}.mlp.experts.down_proj"] = torch.stack([experts[e]["down"] for e in order])
    missing = set(target_keys) - set(rest)
    if missing:
        raise KeyError(f"dequantized checkpoint lacks {len(missing)} weights, "
                       f"e.g. {sorted(missing)[0]}")
    for key, shape in target_keys.items():
        if tuple(rest[key].shape) != tuple(shape):
            raise ValueError(f"dequantized {key} has shape {tuple(rest[key].shape)}, "
                             f"model expects {tuple(shape)}")
    return rest


def plain_config(model_dir: str | Path):
    """The model's transformers config without its quantization_config."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def empty_model(config, dtype):
    """The transformers model with parameters on the meta device and real buffers (rotary
    tables are computed at init and are not in any checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _unwrapped(name: str) -> str:
    """A parameter name without PEFT's wrapping (base_model.model., .base_layer)."""
    return re.sub(r"\.base_layer(?=\.|$)", "", name).removeprefix("base_model.model.")


class CompressedReader:
    """Dequantizes one tensor of a compressed-tensors checkpoint at a time, on `device`, and
    rounds it to bf16 as a 16-bit checkpoint of the same int4 weights would hold it."""

    def __init__(self, ckpt_dir, device, model_type: str):
        import torch
        device = torch.device(device)
        self.dir, self.device, self.model_type = Path(ckpt_dir), device, model_type
        qcfg = json.loads((self.dir / "config.json").read_text())["quantization_config"]
        self.args = next(iter(qcfg["config_groups"].values()))["weights"]
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open
            with safe_open(str(self.dir / "model.safetensors"), "pt") as fh:
                self.files = dict.fromkeys(fh.keys(), "model.safetensors")

    def _raw(self, name: str):
        from safetensors import safe_open
        if name not in self.files:
            raise KeyError(f"checkpoint {self.dir} has no tensor {name}")
        dev = "cpu" if self.device.type == "cpu" else str(self.device)
        with safe_open(str(self.dir / self.files[name]), "pt", device=dev) as fh:
            return fh.get_tensor(name)

    def checkpoint_tensor(self, name: str):
        """Value of checkpoint tensor `name`, dequantized when it is packed (compressed-tensors
        multiplies int4 by the bf16 scales in bf16, as vLLM's kernels do: the bf16 cast below
        changes nothing for such checkpoints and rounds fp32-scale ones)."""
        import torch
        if f"{name}_packed" in self.files:
            value = _dequantize_packed(self._raw(f"{name}_packed"), self._raw(f"{name}_scale"),
                                       self._raw(f"{name}_shape"), self.args)
            return value.to(torch.bfloat16)
        return self._raw(name)

    def hf_tensor(self, hf_name: str):
        """The checkpoint tensor behind a transformers 5 parameter name (PEFT prefixes
        stripped; a missing lm_head is the tied embedding)."""
        from .architectures import hf_to_checkpoint_name
        name = hf_to_checkpoint_name(_unwrapped(hf_name), self.model_type)
        if name == "lm_head.weight" and name not in self.files and \
                f"{name}_packed" not in self.files:
            name = "model.embed_tokens.weight"
        return self.checkpoint_tensor(name)

    def fused_experts(self, hf_name: str, n_experts: int):
        """A transformers 5 fused expert tensor ([E, 2I, H] gate_up, [E, H, I] down)."""
        import torch

        from .architectures import vllm_expert_tensor
        layer = _unwrapped(hf_name).split(".mlp.experts.")[0]
        roles = ("gate", "up") if hf_name.endswith("gate_up_proj") else ("down",)
        return torch.stack([torch.cat([self.checkpoint_tensor(
            vllm_expert_tensor(layer, e, role, "weight", self.model_type)) for role in roles])
            for e in range(n_experts)])


def dequantized_compressed_model(quant_dir: str | Path, original_dir: str | Path | None,
                                 device: str, dtype=None):
    """A transformers model (fp32 unless `dtype`) holding the dequantized W4A16 weights, built
    from the checkpoint's own config.json with empty weights and filled one tensor at a time,
    so no original 16-bit checkpoint is needed (`original_dir` is accepted and not read)."""
    import torch
    from torch import nn

    dtype = dtype or torch.float32
    config = plain_config(quant_dir)
    model = empty_model(config, dtype)
    reader = CompressedReader(quant_dir, device, config.model_type)
    modules = dict(model.named_modules())
    for name, param in list(model.named_parameters()):
        owner_name, _, pname = name.rpartition(".")
        if param.ndim == 3 and type(modules[owner_name]).__name__.endswith("Experts"):
            value = reader.fused_experts(name, param.shape[0])
        else:
            value = reader.hf_tensor(name)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"dequantized {name} has shape {tuple(value.shape)}, model expects "
                             f"{tuple(param.shape)}")
        setattr(modules[owner_name], pname,
                nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()
