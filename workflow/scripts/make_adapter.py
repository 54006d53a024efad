"""Rule make_adapter: a PEFT LoRA adapter from config, seeded, with non-zero B.

Writes `copies` distinct adapters (seed, seed+1, ...) for multi-adapter batches and one
control adapter whose B is zero (it must leave outputs unchanged). Shapes come from PEFT
itself on a meta-device model, so nothing is guessed and no weights are loaded.

Expert adapters (PEFT target_parameters on fused 3D experts) are also written in the per-expert
2D layout vLLM loads (int4lora.lora_layout.convert_expert_adapter_for_vllm): vLLM 0.26 accepts
PEFT's 3D layout, matches it to no module and silently serves the base model.
"""

import math
import time
from pathlib import Path

from int4lora.cache import staged
from int4lora.resultio import ExpectedFailure, new_result, read_json, recorded_failures, write_result


def lora_config(spec: dict):
    from peft import LoraConfig
    kwargs = dict(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, bias="none",
                  task_type="CAUSAL_LM")
    if spec.get("target_modules"):
        kwargs["target_modules"] = list(spec["target_modules"])
    if spec.get("target_parameters"):
        kwargs["target_parameters"] = list(spec["target_parameters"])
        kwargs.setdefault("target_modules", [])
    return LoraConfig(**kwargs)


def adapter_shapes(model_dir: str, spec: dict) -> tuple[dict, object]:
    """PEFT's own state-dict names and shapes for this adapter on this architecture."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    lcfg = lora_config(spec)
    try:
        peft_model = get_peft_model(model, lcfg)
    except ValueError as exc:
        raise ExpectedFailure("unsupported", f"adapter targets match nothing in "
                              f"{cfg.model_type}: {str(exc).splitlines()[0]}") from exc
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    if not shapes:
        raise ExpectedFailure("unsupported", f"adapter targets {spec} add no LoRA weights "
                              f"to {cfg.model_type}")
    return shapes, lcfg


def seeded_weights(shapes: dict, seed: int, b_std: float, zero_b: bool, dtype) -> dict:
    import torch
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if "lora_B" in name:
            t = torch.zeros(shape) if zero_b else torch.randn(shape, generator=gen) * b_std
        else:  # lora_A: fan-in scaled, like PEFT's kaiming init
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        tensors[name] = t.to(dtype).contiguous()
    return tensors


def save_adapter(out_dir: Path, lcfg, tensors: dict, base_path: str) -> None:
    from safetensors.torch import save_file
    lcfg.base_model_name_or_path = base_path
    out_dir.mkdir(parents=True, exist_ok=True)
    lcfg.save_pretrained(out_dir)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))


def vllm_copies(staging: Path, fetched: dict, spec: dict, copies: int) -> dict:
    """Expert adapters rewritten for vLLM beside the PEFT ones (copy<i>-vllm,
    control-zero-b-vllm); dense adapters are what vLLM loads already."""
    names = [f"copy{i}" for i in range(copies)] + ["control-zero-b"]
    if not spec.get("target_parameters"):
        return {"copies": names[:-1], "control": names[-1], "summary": None}
    from int4lora.lora_layout import convert_expert_adapter_for_vllm
    arch = fetched["architecture"]
    experts = arch.get("num_local_experts") or arch.get("num_experts")
    summary = None
    for name in names:
        summary = convert_expert_adapter_for_vllm(staging / name, staging / f"{name}-vllm",
                                                  model_type=arch["model_type"],
                                                  num_experts=int(experts))
    return {"copies": [f"{n}-vllm" for n in names[:-1]], "control": f"{names[-1]}-vllm",
            "summary": summary}


def write_adapters(root: Path, shapes: dict, lcfg, spec: dict, fetched: dict) -> dict:
    """copy<i> (seed + i), the zero-B control and, for expert adapters, their vLLM layout; all
    staged into `root` (a failure leaves nothing behind)."""
    import torch
    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    base_path = fetched["path"]
    with staged(root) as staging:
        for i in range(spec.get("copies", 1)):
            tensors = seeded_weights(shapes, spec.get("seed", 0) + i, spec.get("b_std", 0.02),
                                     zero_b=False, dtype=dtype)
            save_adapter(staging / f"copy{i}", lcfg, tensors, base_path)
        control = seeded_weights(shapes, spec.get("seed", 0), 0.0, zero_b=True, dtype=dtype)
        save_adapter(staging / "control-zero-b", lcfg, control, base_path)
        vllm_layout = vllm_copies(staging, fetched, spec, spec.get("copies", 1))
    return {"dtype_bytes": dtype.itemsize, **vllm_layout}


def main(model: str, adapter: str, spec: dict, model_json: str, cache_dir: str, output: str,
         config: dict | None = None) -> dict:
    started = time.time()
    fetched = read_json(model_json)
    result = new_result("adapter", model, adapter=adapter, params={"spec": spec})
    with recorded_failures(result):
        shapes, lcfg = adapter_shapes(fetched["metrics"]["path"], spec)
        root = (Path(cache_dir) / "adapters" / model / adapter).resolve()
        written = write_adapters(root, shapes, lcfg, spec, fetched["metrics"])
        n_params = sum(math.prod(s) for s in shapes.values())
        result["metrics"] = {
            "paths": [str(root / f"copy{i}") for i in range(spec.get("copies", 1))],
            "control_path": str(root / "control-zero-b"),
            "parameters": n_params, "bytes": n_params * written["dtype_bytes"],
            "lora_tensors": len(shapes), "rank": spec["rank"], "alpha": spec["alpha"],
            "targets": sorted({n.split(".lora_")[0].replace(".base_layer", "").rsplit(".", 1)[-1]
                               for n in shapes}),
            "target_parameters": spec.get("target_parameters", []),
            # the adapters in the layout vLLM loads (the same folders for dense adapters)
            "vllm_paths": [str(root / d) for d in written["copies"]],
            "vllm_control_path": str(root / written["control"]),
            "vllm_conversion": written["summary"],
        }
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
