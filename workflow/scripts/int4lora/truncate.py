"""The first N decoder layers of a checkpoint (and of its adapters), for validating a model whose
fp32 reference does not fit: the same kernels, quantization and LoRA path run per layer, so a
layer subset shows what every layer does; the report says which layers were validated.

Both checkpoint kinds work: bf16 and compressed-tensors W4A16 (its quantization_config and
per-tensor scales travel unchanged). Entries are cached (int4lora.cache) beside the source.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .cache import cache_key, damage, is_complete, staged

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
COPY_SUFFIXES = (".json", ".model", ".txt", ".jinja")


def keep(name: str, layers: int) -> bool:
    """A tensor of layer >= `layers` is dropped; everything outside the layers stays."""
    m = LAYER.search(name)
    return m is None or int(m.group(1)) < layers


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix in COPY_SUFFIXES and f.name != "model.safetensors.index.json" \
                and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)


def _write_subset(src: Path, dst: Path, layers: int) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file
    weight_map, kept = {}, 0
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            names = [n for n in fh.keys() if keep(n, layers)]
            tensors = {n: fh.get_tensor(n) for n in names}
            meta = fh.metadata()
        if tensors:
            save_file(tensors, str(dst / shard.name), metadata=meta)
            weight_map.update(dict.fromkeys(tensors, shard.name))
            kept += len(tensors)
    return {"weight_map": weight_map, "tensors": kept}


def truncated_checkpoint(src: str | Path, layers: int, cache_root: str | Path) -> str:
    """A model folder holding only decoder layers 0..layers-1 (config num_hidden_layers set)."""
    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    total = config["num_hidden_layers"]
    if layers >= total:
        return str(src)
    target = Path(cache_root) / "truncated" / f"{src.name}-first{layers}-{cache_key(str(src))}"
    if is_complete(target) and damage(target) is None:
        return str(target)
    with staged(target) as staging:
        _copy_side_files(src, staging)
        written = _write_subset(src, staging, layers)
        config["num_hidden_layers"] = layers
        for key in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the cut
            if isinstance(config.get(key), list):
                config[key] = config[key][:layers]
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": written["weight_map"]}, indent=1))
    return str(target)


def truncated_adapter(src: str | Path, layers: int, cache_root: str | Path) -> str:
    """An adapter folder holding only the LoRA tensors of layers 0..layers-1."""
    src = Path(src)
    target = Path(cache_root) / "truncated" / \
        f"{src.parent.name}-{src.name}-first{layers}-{cache_key(str(src))}"
    if is_complete(target) and damage(target) is None:
        return str(target)
    with staged(target) as staging:
        _copy_side_files(src, staging)
        _write_subset(src, staging, layers)
        (staging / "model.safetensors.index.json").unlink(missing_ok=True)
    return str(target)
