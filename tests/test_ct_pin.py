"""vLLM 0.26 pins compressed-tensors 0.17.0; llmcompressor 0.14 writes its checkpoints with
0.19.0. vLLM's own parsing of a checkpoint's quantization_config (compiled from its source,
tests/ct_parse_probe.py) must read an llmcompressor checkpoint the same way under both versions:
a field 0.17.0 rejects, or reads differently, would stop or silently change the vLLM engine.
(The GPU half of this check, the vLLM stages with 0.17.0 on the path, is tools/ct017-check.sh.)"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, VLLM_SRC, load_tool, needs_vllm_src

pytest.importorskip("llmcompressor")
CT_SITE = VLLM_SRC.parent / "ct"
PROBE = ROOT / "tests" / "ct_parse_probe.py"
ARCH = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 256, "initializer_range": 0.1, "num_local_experts": 4,
        "num_experts_per_tok": 2}


@pytest.fixture(scope="module")
def llmcompressor_checkpoint(tmp_path_factory):
    import quantize
    from int4lora.models import synthesize
    root = tmp_path_factory.mktemp("ct-pin")
    synthesize(root / "bf16", "mixtral", ARCH, 0)
    quantize.quantize_w4a16(str(root / "bf16"), root / "q", quantize.w4a16_recipe(64, "mixtral"))
    return root / "q"


def _probe(checkpoint, *site):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(PROBE), str(checkpoint), str(VLLM_SRC), *site],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_vllm_src("model_executor/layers/quantization/compressed_tensors/compressed_tensors.py",
                "../ct/compressed_tensors/__init__.py")
def test_vllm_reads_llmcompressor_checkpoints_alike_with_its_pinned_compressed_tensors(
        llmcompressor_checkpoint):
    import compressed_tensors
    pinned = _probe(llmcompressor_checkpoint, str(CT_SITE))
    written = _probe(llmcompressor_checkpoint)
    assert pinned["compressed_tensors"] == \
        load_tool("vllm-src").pinned_version("compressed-tensors") == "0.17.0"
    assert pinned["compressed_tensors_path"].startswith(str(CT_SITE))
    assert written["compressed_tensors"] == compressed_tensors.__version__ == "0.19.0"
    versionless = [{k: v for k, v in p.items() if not k.startswith("compressed_tensors")}
                   for p in (pinned, written)]
    assert versionless[0] == versionless[1]
    assert pinned["pack_quantized"] and pinned["targets"]
    for target, scheme in pinned["targets"].items():
        assert scheme["wNa16"] and not scheme["input_activations"], target
        assert scheme["weights"]["num_bits"] == "4" and scheme["weights"]["group_size"] == "64"


@needs_vllm_src("model_executor/layers/quantization/compressed_tensors/compressed_tensors.py",
                "../ct/compressed_tensors/__init__.py")
def test_a_field_the_pinned_version_does_not_know_stops_the_parse(llmcompressor_checkpoint,
                                                                   tmp_path):
    """compressed-tensors forbids unknown fields: what vLLM with 0.17.0 would do if llmcompressor
    wrote one that 0.17.0 does not have."""
    config = json.loads((llmcompressor_checkpoint / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    group["weights"]["field_from_the_future"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp_path), str(VLLM_SRC),
                           str(CT_SITE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "field_from_the_future" in proc.stderr and "Extra inputs are not permitted" in \
        proc.stderr
