"""Rule quantize: make or record the INT4 form of a model for one engine.

hf:   bitsandbytes NF4 happens at load time; this records the recipe.
vllm: w4a16 -> llmcompressor `oneshot` writes a compressed-tensors checkpoint to the cache
      (keyed by model + recipe); bitsandbytes -> vLLM quantizes in flight, recipe recorded.
"""

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from int4lora.resultio import ExpectedFailure, new_result, read_json, recorded_failures, write_result
from int4lora.resultio import make_public  # cache files 0644, not 0600


def nf4_recipe(engine_cfg: dict) -> dict:
    return {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
            "compute_dtype": engine_cfg.get("compute_dtype", "bfloat16"),
            "quantize_fused_experts": engine_cfg.get("quantize_experts", True),
            "when": "at load"}


def w4a16_recipe(group_size: int) -> dict:
    return {"method": "llmcompressor.oneshot", "scheme": "W4A16", "format": "pack-quantized",
            "num_bits": 4, "symmetric": True, "strategy": "group", "group_size": group_size,
            "targets": ["Linear"], "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*router$"],
            "expert_names": "vllm (w1/w2/w3)"}


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
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, save_compressed=True)
    renamed = rename_experts_for_vllm(staging)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
    (staging / ".complete").write_text("ok")
    make_public(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return {"quantize_s": time.perf_counter() - start, "expert_tensors_renamed_for_vllm": renamed}


# vLLM's Mixtral loader reads experts as w1 (gate), w2 (down), w3 (up) and silently skips any
# other expert name (vllm/model_executor/layers/fused_moe/routed_experts.py load_weights),
# leaving those experts uninitialised; transformers 5 + llmcompressor write gate/up/down_proj.
VLLM_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_EXPERT_KEY = re.compile(r"(\.block_sparse_moe\.experts\.\d+\.)(gate_proj|down_proj|up_proj)\.")


def rename_experts_for_vllm(ckpt_dir: Path) -> int:
    """Rewrite per-expert tensor names of a saved checkpoint to vLLM's Mixtral names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = 0
    mapping = {}
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
            tensors = {}
            for key in fh.keys():
                new = _EXPERT_KEY.sub(lambda m: m.group(1) + VLLM_EXPERT_NAMES[m.group(2)] + ".",
                                      key)
                renamed += new != key
                mapping[key] = new
                tensors[new] = fh.get_tensor(key)
        if any(mapping[k] != k for k in mapping):
            save_file(tensors, str(path), metadata=meta)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {mapping.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return renamed


def main(model: str, engine: str, engine_cfg: dict, model_json: str, cache_dir: str,
         output: str, config: dict | None = None) -> dict:
    started = time.time()
    fetched = read_json(model_json)
    backend, quant = engine_cfg["backend"], engine_cfg.get("quantization")
    result = new_result("quantize", model, engine, params={"backend": backend,
                                                           "quantization": quant})
    with recorded_failures(result):
        if backend == "hf":
            result["metrics"] = {"recipe": nf4_recipe(engine_cfg), "path": fetched["metrics"]["path"]}
        elif quant == "bitsandbytes":
            result["metrics"] = {"recipe": {"method": "vllm in-flight bitsandbytes",
                                            "quant_type": "nf4", "when": "at load"},
                                 "path": fetched["metrics"]["path"]}
        elif quant == "w4a16":
            recipe = w4a16_recipe(engine_cfg.get("group_size", 128))
            key = hashlib.sha256(json.dumps([fetched["metrics"]["path"], recipe],
                                            sort_keys=True).encode()).hexdigest()[:12]
            out_dir = Path(cache_dir) / "quantized" / f"{model}-w4a16-{key}"
            details = {"cached": True}
            if not (out_dir / ".complete").exists():
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
