"""Rule fetch_model: put a model's weights in the cache (hub, local, synthetic,
synthetic-w4a16, gguf-package)."""

import time
from pathlib import Path

from int4lora import models
from int4lora.architectures import model_type_of
from int4lora.cache import cache_key, damage, is_complete, staged
from int4lora.resultio import new_result, write_result
from int4lora.synth4bit import write_checkpoint


def weights_on_disk(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def _build(target: Path, spec: dict, source: str, device: str) -> dict:
    """Write the model into the cache (staged: a failure leaves nothing behind)."""
    if source == "local":
        return models.link_local(target, spec["path"])
    with staged(target) as staging:
        if source == "synthetic":
            return models.synthesize(staging, model_type_of(spec), spec["arch"],
                                     spec.get("seed", 0), spec.get("dtype", "bfloat16"),
                                     device=device)
        if source == "synthetic-w4a16":
            return write_checkpoint(staging, model_type_of(spec), spec["arch"],
                                    spec.get("seed", 0), spec.get("group_size", 128),
                                    device=device)
        if source == "gguf-package":
            return models.convert_gguf_package(staging, spec["package"], spec.get("file"),
                                               spec.get("dtype", "bfloat16"))
        if source == "hub":
            return models.download_hub(staging, spec["repo"], spec["revision"])
        raise ValueError(f"unknown source {source!r}")


def main(model: str, spec: dict, cache_dir: str, output: str, device: str = "cpu",
         config: dict | None = None) -> dict:
    started = time.time()
    result = new_result("fetch", model, params={"spec": spec})
    source = spec["source"]
    weights = models.weight_spec(spec)
    # synthetic weights are named by what they are, so model entries that share them share one
    name = model_type_of(spec) if source.startswith("synthetic") else model
    target = Path(cache_dir) / "models" / f"{name}-{cache_key(weights)}"
    if (is_complete(target) and damage(target) is None) or (source == "local"
                                                            and target.is_symlink()):
        details = {"cached": True}
        if source == "local":
            details = models.link_local(target, spec["path"])
    else:
        details = _build(target, spec, source, device)
    arch = models.architecture_summary(target)
    result["metrics"] = {"path": str(target.resolve()), "architecture": arch,
                         "moe": bool(arch.get("num_local_experts") or arch.get("num_experts")),
                         "synthetic": source in ("synthetic", "synthetic-w4a16"),
                         "weight_bytes_on_disk": weights_on_disk(target), **details}
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
