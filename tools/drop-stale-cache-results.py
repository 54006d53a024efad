"""Results restored from an earlier GPU lease point into that machine's weight cache. Remove the
model/quantize/adapter results whose cache paths are gone here, and tuning results whose kernel
config folder is gone (Snakemake then rebuilds them), and any error result that a job produced
from such a dangling path."""
import glob
import json
import os
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else "results"

for f in sorted(glob.glob(f"{ROOT}/models/*.json") + glob.glob(f"{ROOT}/quantize/*/*.json")
                + glob.glob(f"{ROOT}/adapters/*/*.json") + glob.glob(f"{ROOT}/tuning/*/*/*.json")):
    m = json.load(open(f)).get("metrics") or {}
    paths = [m.get("path"), m.get("config_folder"), *(m.get("paths") or [])]
    if any(p and not os.path.exists(p) for p in paths):
        os.remove(f)
        print("stale (cache path gone):", f)
for f in sorted(glob.glob(f"{ROOT}/bench/*/*/*.json") + glob.glob(f"{ROOT}/validate/*/*/*.json")):
    r = json.load(open(f))
    if r.get("status") == "error" and "int4-lora-bench-cache" in (r.get("reason") or "") + json.dumps(r.get("error") or ""):
        os.remove(f)
        print("error from a dangling cache path:", f)
