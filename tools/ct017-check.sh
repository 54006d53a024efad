#!/usr/bin/env bash
# vLLM 0.26 pins compressed-tensors 0.17.0; llmcompressor 0.14 (and the GPU bundle) bring 0.19.0.
# Run the pipeline's vLLM stages with 0.17.0 first on the path against a checkpoint that
# llmcompressor wrote with 0.19.0 (gpu-smoke's tiny Mixtral), on a GPU node with the bundle unpacked:
#   here:     pip download compressed-tensors==0.17.0 --no-deps -d .whl
#   device:   carry .whl; bash tools/ct017-check.sh [WHEEL]   (results: results/gpu-smoke/, env
#             records 0.17.0). The device tool deletes .whl/ on a later call that does not carry it:
#             a detached job started in one call must read a copy, e.g.
#             cp .whl/*.whl /tmp/ && bash tools/ct017-check.sh /tmp/compressed_tensors-0.17.0-py3-none-any.whl
set -euo pipefail
source /tmp/gpu-env.sh
export PYTHONUNBUFFERED=1 VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0
smk() {  # targets first: --configfile takes several files and would swallow them
  python3 -m snakemake "$@" --cores all --resources gpu=1 --configfile config/gpu-smoke.yaml
}
out=results/gpu-smoke
# 1. llmcompressor, with its own compressed-tensors 0.19.0, writes the W4A16 checkpoint
smk "$out/quantize/tiny-mixtral/vllm.json"
# 2. the vLLM stages with 0.17.0 ahead of 0.19.0
mkdir -p /tmp/ct017
python3 -m zipfile -e "${1:-.whl/compressed_tensors-0.17.0-py3-none-any.whl}" /tmp/ct017
export PYTHONPATH=/tmp/ct017${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import compressed_tensors as c; assert c.__version__ == '0.17.0', c.__version__"
# validation first (the check that the checkpoint loads and LoRA applies), then the benchmarks
smk "$out/validate/tiny-mixtral/vllm/r16-qv.json" || true
smk "$out/bench/tiny-mixtral/vllm/r16-qv.json" "$out/bench/tiny-mixtral/vllm/baseline.json" || true
python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*/tiny-mixtral/vllm/*.json")):
    r = json.loads(f.read_text())
    print(f, r["status"], "compressed-tensors", r["env"].get("compressed-tensors"),
          (r.get("metrics") or {}).get("verdict", ""))
EOF
