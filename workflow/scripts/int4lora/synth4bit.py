"""Synthetic weights written directly in 4 bit: a compressed-tensors W4A16 checkpoint.

Seeded random int4 values (symmetric, -7..7, mean zero) and per-group bf16 scales are drawn
tensor by tensor (on the GPU when there is one) and packed eight to an int32 the way
compressed-tensors' pack_to_int32 does (element i of a row in bits 4*(i%8) of word i//8, offset
+8). Shards are written one at a time, so neither the whole model nor any bf16 form of its
4-bit weights ever exists. Embeddings, norms, lm_head, biases and routers are bf16.

Scales: a dequantized weight q*s has std initializer_range (s = base x U(0.5, 1.5) per group,
base = initializer_range / (std(q) * sqrt(E[U^2]))), which is what transformers' own init
gives, so activations through many layers behave like a from_config model's.

The same seed gives the same checkpoint on the same kind of device (CPU and CUDA generators
differ). Tensors are named as vLLM 0.26 loads them (experts: architectures.vllm_expert_tensor).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import architectures

Q_MIN, Q_MAX = -7, 7                               # drawn int4 range (symmetric, mean 0)
Q_STD = math.sqrt(((Q_MAX - Q_MIN + 1) ** 2 - 1) / 12)
JITTER_LO, JITTER_HI = 0.5, 1.5                    # per-group scale spread
JITTER_RMS = math.sqrt((JITTER_HI ** 3 - JITTER_LO ** 3) / (3 * (JITTER_HI - JITTER_LO)))
SHARD_BYTES = 5 * 1024 ** 3
HEADER_SLACK = 64 * 1024                           # safetensors JSON header, per shard at most


@dataclass(frozen=True)
class Planned:
    name: str          # checkpoint name; for int4 the weight's name (".weight")
    shape: tuple       # int4: logical [out, in]
    kind: str          # "int4" | "normal" | "ones"
    std: float

    def nbytes(self, group_size: int) -> int:
        n = math.prod(self.shape)
        if self.kind == "int4":
            return n // 2 + (n // group_size) * 2 + 2 * 8   # packed + bf16 scales + int64 shape
        return n * 2


def quantization_config(group_size: int, ignore: list[str]) -> dict:
    """The quantization_config llmcompressor 0.14 writes for W4A16 (same keys and values)."""
    import compressed_tensors
    weights = {"actorder": None, "block_structure": None, "dynamic": False,
               "group_size": group_size, "num_bits": 4, "observer": "memoryless_minmax",
               "observer_kwargs": {}, "scale_dtype": None, "strategy": "group",
               "symmetric": True, "type": "int", "zp_dtype": None}
    group = {"format": "pack-quantized", "input_activations": None, "output_activations": None,
             "targets": ["Linear"], "weights": weights}
    return {"config_groups": {"group_0": group}, "format": "pack-quantized",
            "global_compression_ratio": None, "ignore": list(ignore), "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {},
            "version": compressed_tensors.__version__.split("+")[0]}


def pack_quantized_config(model_dir) -> dict | None:
    """The checkpoint's quantization_config when it is compressed-tensors pack-quantized."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return None
    qcfg = json.loads(path.read_text()).get("quantization_config") or {}
    return qcfg if qcfg.get("format") == "pack-quantized" else None


def skeleton(config):
    """The transformers model on the meta device (shapes and module types, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _expert_tensors(name: str, shape, model_type: str, std: float) -> list[Planned]:
    """Per-expert int4 weights, under vLLM's names, of one fused [E, out, in] parameter."""
    layer = name.split(".mlp.experts.")[0]
    n_exp, out, inp = shape
    if name.endswith("gate_up_proj"):
        parts = [("gate", out // 2), ("up", out // 2)]
    else:
        parts = [("down", out)]
    return [Planned(architectures.vllm_expert_tensor(layer, e, role, "weight", model_type),
                    (rows, inp), "int4", std) for e in range(n_exp) for role, rows in parts]


def plan_tensors(config) -> list[Planned]:
    """Every tensor of the checkpoint, in order, from the meta skeleton of `config`."""
    import torch
    model_type = config.model_type
    fam = architectures.family(model_type)
    model = skeleton(config)
    std = config.initializer_range
    keep16 = {architectures.checkpoint_to_hf_name(r, model_type)
              for r in architectures.router_modules(config)} | {"lm_head"}
    modules = dict(model.named_modules())
    plan = []
    for name, param in model.named_parameters():
        owner_name, _, pname = name.rpartition(".")
        owner = modules[owner_name]
        if param.ndim == 3 and type(owner).__name__.endswith("Experts"):
            if fam.moe is None or pname not in architectures.HF_FUSED_EXPERTS:
                raise ValueError(f"{model_type}: fused expert tensor {name} but no expert naming "
                                 f"registered for it (architectures.FAMILIES)")
            plan += _expert_tensors(name, tuple(param.shape), model_type, std)
            continue
        ckpt = architectures.hf_to_checkpoint_name(name, model_type)
        if isinstance(owner, torch.nn.Linear) and pname == "weight" and owner_name not in keep16:
            plan.append(Planned(ckpt, tuple(param.shape), "int4", std))
        elif "norm" in type(owner).__name__.lower():
            plan.append(Planned(ckpt, tuple(param.shape), "ones", std))
        else:
            plan.append(Planned(ckpt, tuple(param.shape), "normal", std))
    return plan


def causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def check_groups(plan: list[Planned], group_size: int) -> None:
    bad = [t for t in plan if t.kind == "int4" and (t.shape[1] % group_size or t.shape[1] % 8)]
    if bad:
        raise ValueError(f"W4A16 group_size={group_size} does not divide {len(bad)} weight(s), "
                         f"e.g. {bad[0].name} (in_features={bad[0].shape[1]})")


def estimate_bytes(config, group_size: int = 128) -> int:
    """Bytes the checkpoint's safetensors files take on disk (headers bounded by HEADER_SLACK)."""
    return sum(t.nbytes(group_size) for t in plan_tensors(config))


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_int4(item: Planned, seed: int, group_size: int, device):
    """(int4 values as int8 [out, in], bf16 scales [out, in/group]) of one planned weight."""
    import torch
    gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, item.name))
    out, inp = item.shape
    q = torch.randint(Q_MIN, Q_MAX + 1, (out, inp), generator=gen, device=device,
                      dtype=torch.int8)
    base = item.std / (Q_STD * JITTER_RMS)
    jitter = torch.rand((out, inp // group_size), generator=gen, device=device)
    scale = (base * (JITTER_LO + (JITTER_HI - JITTER_LO) * jitter)).to(torch.bfloat16)
    return q, scale


def draw_plain(item: Planned, seed: int, device):
    import torch
    if item.kind == "ones":
        return torch.ones(item.shape, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, item.name))
    return (torch.randn(item.shape, generator=gen, device=device) * item.std).to(torch.bfloat16)


def pack_int4(q):
    """int4 values (int8 [..., in], in % 8 == 0) -> int32 [..., in/8], nibble i%8 of word i//8
    holding element i + 8 (compressed-tensors' pack_to_int32 layout)."""
    import torch
    u = (q.to(torch.int32) + 8).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    packed = u[..., 0].clone()
    for j in range(1, 8):
        packed |= u[..., j] << (4 * j)   # int32 shifts wrap: bit 31 is the sign bit
    return packed


def materialize(item: Planned, seed: int, group_size: int, device) -> dict:
    """Checkpoint tensors (on the CPU) of one planned item."""
    import torch
    if item.kind != "int4":
        return {item.name: draw_plain(item, seed, device).cpu()}
    q, scale = draw_int4(item, seed, group_size, device)
    stem = item.name
    return {f"{stem}_packed": pack_int4(q).cpu(), f"{stem}_scale": scale.cpu(),
            f"{stem}_shape": torch.tensor(item.shape, dtype=torch.int64)}


def shard_plan(plan: list[Planned], group_size: int, max_bytes: int) -> list[list[Planned]]:
    shards, current, size = [], [], 0
    for item in plan:
        nbytes = item.nbytes(group_size)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    return shards + ([current] if current else [])


def _write_shards(out_dir: Path, shards, seed: int, group_size: int, device) -> dict:
    """Write every shard (generation of the next overlaps the disk write of the last)."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    weight_map, pending = {}, None
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with ThreadPoolExecutor(max_workers=1) as writer:
        for fname, items in zip(names, shards):
            tensors = {}
            for item in items:
                tensors.update(materialize(item, seed, group_size, device))
            if pending is not None:
                pending.result()
            weight_map.update(dict.fromkeys(tensors, fname))
            pending = writer.submit(save_file, tensors, str(out_dir / fname), {"format": "pt"})
            del tensors
        if pending is not None:
            pending.result()
    return weight_map


def _write_config(out_dir: Path, config, group_size: int) -> None:
    from transformers import GenerationConfig

    from .models import byte_tokenizer
    config.dtype = "bfloat16"
    config.save_pretrained(out_dir)
    data = json.loads((out_dir / "config.json").read_text())
    ignore = architectures.router_modules(config) + ["lm_head"]
    data["quantization_config"] = quantization_config(group_size, ignore)
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = GenerationConfig.from_model_config(config)
    gen.pad_token_id = 1
    gen.save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_checkpoint(out_dir, model_type: str, arch: dict, seed: int, group_size: int = 128,
                     device: str | None = None, max_shard_bytes: int = SHARD_BYTES) -> dict:
    """Write a synthetic W4A16 compressed-tensors checkpoint into `out_dir` (which the caller
    stages); returns the fetch details (labelled synthetic)."""
    import torch
    start = time.perf_counter()
    out_dir = Path(out_dir)
    config = architectures.build_config(model_type, arch, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1,
                                        tie_word_embeddings=arch.get("tie_word_embeddings", False))
    if config.vocab_size < 259:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the byte tokenizer "
                         "(259 tokens)")
    plan = plan_tensors(config)
    check_groups(plan, group_size)
    config.architectures = [causal_lm_class(model_type)]
    device = torch.device(device or default_device())
    shards = shard_plan(plan, group_size, max_shard_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map = _write_shards(out_dir, shards, seed, group_size, device)
    written = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    if len(shards) > 1:
        index = {"metadata": {"total_size": written},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _write_config(out_dir, config, group_size)
    n_int4 = sum(math.prod(t.shape) for t in plan if t.kind == "int4")
    return {"parameters": sum(math.prod(t.shape) for t in plan), "parameters_int4": n_int4,
            "synthetic": True, "seed": seed, "model_type": model_type,
            "dtype": "int4 W4A16 (pack-quantized) + bfloat16",
            "format": "compressed-tensors pack-quantized", "group_size": group_size,
            "written_in_4bit": True, "shards": len(shards), "write_s": time.perf_counter() - start,
            "estimated_bytes": sum(t.nbytes(group_size) for t in plan), "bytes_written": written,
            "generated_on": device.type,
            "note": "synthetic: seeded random int4 values and scales written directly by "
                    "synth4bit; no bf16 original exists"}
