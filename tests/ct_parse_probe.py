"""What vLLM 0.26 reads from a checkpoint's quantization_config, parsed by its own code with
whichever compressed_tensors comes first on sys.path; printed as JSON.

    python tests/ct_parse_probe.py CHECKPOINT VLLM_SRC [CT_SITE]

vLLM's CompressedTensorsConfig.from_config and the helpers it calls are compiled from the vLLM
source tree (VLLM_SRC/model_executor/layers/quantization/compressed_tensors/), with their vllm
imports left out and compressed_tensors' own classes in their place: the part of loading a W4A16
checkpoint that depends on the compressed-tensors version. CT_SITE, when given, goes first on
sys.path (vLLM 0.26 pins compressed-tensors 0.17.0; llmcompressor writes with 0.19.0).
"""
import __future__

import ast
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal, cast

CT_DIR = "model_executor/layers/quantization/compressed_tensors"
METHODS = {"from_config", "_parse_sparsity_config", "_quantization_scheme_map_from_config",
           "_is_wNa16_group_channel"}
# what vLLM's WNA16 scheme and kernel selection read from the weight arguments
WEIGHT_FIELDS = ("num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "actorder")


def _compile(source: Path, keep_functions: set, keep_class: str | None, namespace: dict) -> None:
    """Exec the named top-level functions (or the named methods of keep_class) of a vLLM file."""
    tree = ast.parse(source.read_text())
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in keep_functions:
            body.append(node)
        elif isinstance(node, ast.ClassDef) and node.name == keep_class:
            init = ast.parse("def __init__(self, **kwargs):\n    self.kwargs = kwargs").body[0]
            node.bases, node.keywords = [], []
            node.body = [init] + [n for n in node.body
                                  if isinstance(n, ast.FunctionDef) and n.name in METHODS]
            body.append(node)
    code = compile(ast.Module(body=body, type_ignores=[]), str(source), "exec",
                   flags=__future__.annotations.compiler_flag)
    exec(code, namespace)


def parse(checkpoint: Path, vllm_src: Path) -> dict:
    import compressed_tensors
    from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationStrategy,
                                                 QuantizationType)
    namespace = {"CompressionFormat": CompressionFormat, "QuantizationArgs": QuantizationArgs,
                 "QuantizationStrategy": QuantizationStrategy, "QuantizationType": QuantizationType,
                 "SparsityCompressionConfig": SparsityCompressionConfig, "cast": cast, "Any": Any,
                 "Literal": Literal, "logger": logging.getLogger("vllm"),
                 "SPARSITY_CONFIG_NAME": "sparsity_config"}
    _compile(vllm_src / CT_DIR / "utils.py", {"is_activation_quantization_format"}, None, namespace)
    _compile(vllm_src / CT_DIR / "compressed_tensors.py", set(), "CompressedTensorsConfig",
             namespace)
    config_cls = namespace["CompressedTensorsConfig"]
    quant_config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    parsed = config_cls.from_config(copy.deepcopy(quant_config)).kwargs
    targets = {}
    for target, scheme in parsed["target_scheme_map"].items():
        weights = scheme["weights"]
        targets[target] = {
            "weights": {f: str(getattr(weights, f, None)) for f in WEIGHT_FIELDS},
            "input_activations": scheme["input_activations"] is not None,
            "wNa16": config_cls._is_wNa16_group_channel(weights, scheme["input_activations"])}
    fmt = parsed["quant_format"]
    return {"compressed_tensors": compressed_tensors.__version__,
            "compressed_tensors_path": str(Path(compressed_tensors.__file__).parent),
            "format": fmt, "pack_quantized": fmt == CompressionFormat.pack_quantized.value,
            "ignore": parsed["ignore"], "targets": targets}


if __name__ == "__main__":
    if len(sys.argv) > 3:
        sys.path.insert(0, sys.argv[3])
    print(json.dumps(parse(Path(sys.argv[1]), Path(sys.argv[2]))))
