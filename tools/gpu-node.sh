#!/usr/bin/env bash
# Run a preset on an air-gapped GPU node that has the offline bundle unpacked
# (../shared/gpu/README.md), within a wall-clock budget, and pack the run for the trip back.
#   tools/gpu-node.sh PRESET [snakemake targets/options...]
#   e.g. tools/gpu-node.sh gpu-seeds --config only_models=[qwen2-32b-shape]
# BUDGET_S (default 480; the device tool stops a command at 600 s): snakemake is interrupted after it; finished jobs stay done, the
# interrupted one is cleaned up, and the next call resumes (--rerun-incomplete).
set -uo pipefail
preset=$1; shift
[ -f /tmp/gpu-env.sh ] && source /tmp/gpu-env.sh
# the device gets the working tree but not this checkout's .git (its `git rev-parse HEAD` can name
# an older commit): `git rev-parse HEAD > .git-commit` here and carry it, and the results say so
[ -f .git-commit ] && export INT4LORA_GIT_COMMIT=$(cat .git-commit)
export PYTHONUNBUFFERED=1
# FlashInfer's sampler is JIT-compiled with ninja at the first engine start (minutes on a bare
# node, seen on the H100 node); vLLM's PyTorch sampler needs no build.
export VLLM_USE_FLASHINFER_SAMPLER=0
# a script that touched CUDA before vllm.LLM() must not fork the engine core
export VLLM_WORKER_MULTIPROC_METHOD=spawn
# results of an earlier lease travel as a tarball
bash tools/restore-results.sh "$preset"
# a run interrupted by the budget leaves Snakemake's lock behind
python3 -m snakemake --unlock --configfile "config/$preset.yaml" >/dev/null 2>&1 || true
# every core: timed jobs take them all (nothing runs beside them); one GPU job at a time
timeout --signal=INT --kill-after=30 "${BUDGET_S:-480}" \
  python3 -m snakemake --cores all --resources gpu=1 --configfile "config/$preset.yaml" \
  --rerun-triggers mtime --rerun-incomplete --keep-going "$@"
rc=$?
echo "snakemake exit code $rc"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/run-$preset.tar.gz" "results/$preset" "logs/$preset" "benchmarks/$preset" \
    2>/dev/null
  ls -la "$OUT"
fi
logs=$(find "logs/$preset" -name '*.log' 2>/dev/null)
for f in $( [ -n "$logs" ] && ls -t $logs | head -3); do
  echo "== $f"; grep -v "it/s\]" "$f" | tail -15
done
exit $rc
