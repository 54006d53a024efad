"""Which weights are really 4-bit: storage by module family, from a checkpoint's tensors.

The same family names are used for loaded HF models (nf4_experts.weight_storage_report).
"""
from __future__ import annotations

from pathlib import Path

from .architectures import module_family

FAMILIES = ("attention", "dense_mlp", "experts", "router", "embeddings", "lm_head", "norm",
            "lora", "other")


def family_of(name: str) -> str:
    """Module family of a tensor name (rules per architecture family: architectures.py);
    a shared expert is dense_mlp (every token runs it), its gate a router."""
    return module_family(name)


def _empty():
    return {f: {"bytes": 0, "elements": 0, "elements_4bit": 0, "bytes_4bit": 0} for f in FAMILIES}


def checkpoint_storage(model_dir: str | Path) -> dict:
    """Storage by family for a safetensors checkpoint (compressed-tensors pack-quantized:
    `*.weight_packed` int32 holds eight 4-bit values; scales and shapes count as overhead)."""
    from safetensors import safe_open

    families = _empty()
    dtypes: dict[str, int] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                n = 1
                for d in shape:
                    n *= d
                nbytes = n * _itemsize(dtype)
                fam = families[family_of(key)]
                fam["bytes"] += nbytes
                if key.endswith("weight_packed"):
                    fam["elements"] += n * 8
                    fam["elements_4bit"] += n * 8
                    fam["bytes_4bit"] += nbytes
                    dtypes["int4 (packed)"] = dtypes.get("int4 (packed)", 0) + nbytes
                elif key.endswith(("weight_shape", "weight_zero_point", "weight_g_idx")):
                    dtypes["quant metadata"] = dtypes.get("quant metadata", 0) + nbytes
                elif key.endswith("weight_scale"):
                    dtypes["scales"] = dtypes.get("scales", 0) + nbytes
                else:
                    if key.endswith("weight"):
                        fam["elements"] += n
                    dtypes[dtype] = dtypes.get(dtype, 0) + nbytes
    return finish(families, dtypes)


def finish(families: dict, dtypes: dict) -> dict:
    for fam in families.values():
        fam["share_4bit"] = fam["elements_4bit"] / fam["elements"] if fam["elements"] else None
    total = sum(f["bytes"] for f in families.values())
    return {"families": families, "bytes_by_dtype": dtypes, "total_bytes": total}


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype, 2)


def decode_weight_bytes(storage: dict, arch: dict, batch: int) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (rows only),
    with MoE experts scaled by the expected share of experts that `batch` tokens touch."""
    fams = storage["families"]
    dense = sum(f["bytes"] for name, f in fams.items()
                if name not in ("experts", "embeddings", "lora"))
    experts = fams["experts"]["bytes"]
    n_exp = arch.get("num_local_experts") or arch.get("num_experts")
    k = arch.get("num_experts_per_tok")
    if n_exp and k:
        experts *= 1 - (1 - k / n_exp) ** batch
    if arch.get("tie_word_embeddings") or fams["lm_head"]["bytes"] == 0:
        dense += fams["embeddings"]["bytes"]  # the head reads the tied table whole
    return int(dense + experts)


def from_loaded_model(report: dict) -> dict:
    """The same shape as checkpoint_storage, from nf4_experts.weight_storage_report."""
    families = _empty()
    for name, fam in report["by_family"].items():
        four_bit = sum(v["bytes"] for k, v in fam["by_kind"].items() if k in ("nf4", "fp4"))
        families[name] = {"bytes": fam["bytes"],
                          "elements": fam["params"] - fam.get("bias_params", 0),
                          "elements_4bit": fam["params_4bit"], "bytes_4bit": four_bit}
    return finish(families, {k: v["bytes"] for k, v in report["by_kind"].items()})
