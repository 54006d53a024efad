"""Rule quantize: make or record the INT4 form of a model for one engine.

hf:   bitsandbytes NF4 happens at load time; this records the recipe.
vllm: w4a16 -> llmcompressor `oneshot` writes a compressed-tensors checkpoint to the cache
      (keyed by model + recipe); bitsandbytes -> vLLM quantizes in flight, recipe recorded.
A model fetched as `synthetic-w4a16` already is a W4A16 checkpoint (synth4bit): vllm w4a16
passes it through; hf records NF4 made from its dequantized int4 weights at load.
"""

import json
import re
import time
from pathlib import Path

from int4lora import architectures
from int4lora.cache import cache_key, damage, is_complete, staged
from int4lora.resultio import ExpectedFailure, new_result, read_json, recorded_failures, write_result
from int4lora.synth4bit import pack_quantized_config


def nf4_recipe(engine_cfg: dict) -> dict:
    return {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
            "compute_dtype": engine_cfg.get("compute_dtype", "bfloat16"),
            "quantize_fused_experts": engine_cfg.get("quantize_experts", True),
            "when": "at load"}


def w4a16_recipe(group_size: int, model_type: str | None = None) -> dict:
    """The llmcompressor recipe; routers and (Qwen2-MoE) the shared-expert gate stay 16-bit,
    since vLLM builds those layers unquantized (architectures.w4a16_ignore)."""
    return {"method": "llmcompressor.oneshot", "scheme": "W4A16", "format": "pack-quantized",
            "num_bits": 4, "symmetric": True, "strategy": "group", "group_size": group_size,
            "targets": ["Linear"], "ignore": architectures.w4a16_ignore(model_type),
            "expert_names": _vllm_expert_names(model_type)}


def _vllm_expert_names(model_type: str | None) -> str:
    moe = architectures.FAMILIES.get(model_type, architectures.Family("")).moe
    if moe is None or model_type == "mixtral":
        return "vllm (w1/w2/w3)"
    return f"vllm ({'/'.join(sorted(moe.vllm_expert_names))})"


def prequantized_recipe(qcfg: dict) -> dict:
    """What a synthetic-w4a16 checkpoint holds (no llmcompressor run)."""
    weights = next(iter(qcfg["config_groups"].values()))["weights"]
    return {"method": "written directly in W4A16 by synth4bit", "scheme": "W4A16",
            "format": qcfg["format"], "num_bits": weights["num_bits"],
            "symmetric": weights["symmetric"], "strategy": weights["strategy"],
            "group_size": weights["group_size"], "ignore": qcfg["ignore"],
            "expert_names": "vllm", "synthetic": True}


def indivisible_layers(model, group_size: int, ignore_names=("lm_head",)) -> list[str]:
    """Linear layers and fused 3D expert tensors whose input width group_size does not divide."""
    import torch
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith(ignore_names):
            if module.in_features % group_size:
                bad.append(f"{name} (in_features={module.in_features})")
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.shape[-1] % group_size:  # [experts, out, in]
                bad.append(f"{name}.{pname} (in_features={param.shape[-1]})")
    return bad


def quantize_w4a16(model_dir: str, out_dir: Path, recipe: dict) -> dict:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # oneshot needs config._name_or_path to be a real directory: load from the saved path
    # "auto" spills to host memory where the GPU is too small (Mixtral-8x7B in bf16 is 93 GB)
    device_map = "auto" if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 device_map=device_map)
    bad = indivisible_layers(model, recipe["group_size"])
    if bad:
        raise ExpectedFailure("unsupported", f"W4A16 group_size={recipe['group_size']} does not "
                              f"divide {len(bad)} layer(s), e.g. {bad[0]}")
    weights = {k: recipe[k] for k in ("num_bits", "symmetric", "strategy", "group_size")}  # noqa
    weights["type"] = "int"
    modifier = QuantizationModifier(
        config_groups={"group_0": {"targets": recipe["targets"], "weights": weights}},
        ignore=recipe["ignore"])
    start = time.perf_counter()
    oneshot(model=model, recipe=modifier)
    with staged(out_dir) as staging:
        model.save_pretrained(staging, save_compressed=True)
        renamed = rename_experts_for_vllm(staging, model.config.model_type)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
    return {"quantize_s": time.perf_counter() - start, "expert_tensors_renamed_for_vllm": renamed}


def _model_type(ckpt_dir: Path, names) -> str | None:
    cfg = ckpt_dir / "config.json"
    if cfg.exists():
        return json.loads(cfg.read_text()).get("model_type")
    return "mixtral" if any(".block_sparse_moe.experts." in n for n in names) else None


def rename_experts_for_vllm(ckpt_dir: Path, model_type: str | None = None) -> int:
    """Rewrite per-expert tensor names of a saved checkpoint to what vLLM 0.26 loads for this
    model_type (Mixtral: w1/w2/w3; Qwen MoE: gate/up/down_proj, as llmcompressor writes).

    vLLM skips expert names it does not expect without a word and serves those experts
    uninitialised, so an expert tensor that still has a foreign name afterwards is an error.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    renamed, mapping = 0, {}
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            keys = list(fh.keys())
            model_type = model_type or _model_type(ckpt_dir, keys)
            if model_type is None or architectures.family(model_type).moe is None:
                continue
            meta, tensors, changed = fh.metadata(), {}, False
            for key in keys:
                new = architectures.to_vllm_name(key, model_type)
                mapping[key] = new
                changed |= new != key
                tensors[new] = fh.get_tensor(key)
        renamed += sum(mapping[k] != k for k in keys)
        if changed:
            save_file(tensors, str(path), metadata=meta)
    bad = architectures.misnamed_experts(mapping.values(), model_type) if model_type else []
    if bad:
        raise ValueError(f"{len(bad)} expert tensor(s) that vLLM would skip for {model_type}, "
                         f"e.g. {bad[0]}")
    index = ckpt_dir / "model.safetensors.index.json"
    if renamed and index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {mapping.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return renamed


def _tensor_names(ckpt_dir) -> list[str]:
    from safetensors import safe_open
    names = []
    for path in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            names += list(fh.keys())
    return names


def pass_through(qcfg: dict, fetched: dict, backend: str, quant: str, engine_cfg: dict) -> dict:
    """Metrics of a model that is already a W4A16 checkpoint (source synthetic-w4a16)."""
    path = fetched["path"]
    if backend == "hf":
        recipe = {**nf4_recipe(engine_cfg),
                  "from": "compressed-tensors W4A16 checkpoint, dequantized layer by layer "
                          "and quantized to NF4 at load (load_nf4_from_compressed)"}
        return {"recipe": recipe, "path": path}
    if quant != "w4a16":
        raise ExpectedFailure("unsupported", f"vLLM {quant} needs 16-bit weights; this model "
                              "is a W4A16 checkpoint (source synthetic-w4a16)")
    recipe = prequantized_recipe(qcfg)
    wanted = engine_cfg.get("group_size")
    if wanted is not None and wanted != recipe["group_size"]:
        raise ExpectedFailure("unsupported", f"engine group_size={wanted} but the checkpoint "
                              f"was written with group_size={recipe['group_size']}")
    bad = architectures.misnamed_experts(_tensor_names(path), fetched["architecture"]["model_type"])
    if bad:
        raise ValueError(f"{len(bad)} expert tensor(s) in {path} that vLLM would skip, "
                         f"e.g. {bad[0]}")
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {"recipe": recipe, "path": path, "checkpoint_bytes": size, "cached": True,
            "expert_tensors_renamed_for_vllm": 0}


def main(model: str, engine: str, engine_cfg: dict, model_json: str, cache_dir: str,
         output: str, config: dict | None = None) -> dict:
    started = time.time()
    fetched = read_json(model_json)
    backend, quant = engine_cfg["backend"], engine_cfg.get("quantization")
    result = new_result("quantize", model, engine, params={"backend": backend,
                                                           "quantization": quant})
    with recorded_failures(result):
        prequantized = pack_quantized_config(fetched["metrics"]["path"])
        if prequantized is not None:
            result["metrics"] = pass_through(prequantized, fetched["metrics"], backend, quant,
                                             engine_cfg)
        elif backend == "hf":
            result["metrics"] = {"recipe": nf4_recipe(engine_cfg), "path": fetched["metrics"]["path"]}
        elif quant == "bitsandbytes":
            result["metrics"] = {"recipe": {"method": "vllm in-flight bitsandbytes",
                                            "quant_type": "nf4", "when": "at load"},
                                 "path": fetched["metrics"]["path"]}
        elif quant == "w4a16":
            model_type = fetched["metrics"].get("architecture", {}).get("model_type")
            recipe = w4a16_recipe(engine_cfg.get("group_size", 128), model_type)
            out_dir = Path(cache_dir) / "quantized" / \
                f"{model}-w4a16-{cache_key(fetched['metrics']['path'], recipe)}"
            details = {"cached": True}
            if not is_complete(out_dir) or damage(out_dir) is not None:
                details = quantize_w4a16(fetched["metrics"]["path"], out_dir, recipe)
            size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
            result["metrics"] = {"recipe": recipe, "path": str(out_dir.resolve()),
                                 "checkpoint_bytes": size, **details}
        else:
            raise ValueError(f"engine {engine!r}: unknown quantization {quant!r}")
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
