#!/usr/bin/env bash
# Run a preset on a GPU node in priority phases within ONE wall-clock budget, so that a device
# session that ends early has run what matters most (one device session is 30 minutes; a preset
# can need more). Each non-comment line of PHASES is one phase: Snakemake targets relative to
# results/<preset>/, run by tools/gpu-node.sh with the time left; a phase that would start with
# under a minute left is skipped and named. Jobs done by an earlier phase (or lease) are not redone.
#   BUDGET_S=1500 tools/gpu-phases.sh gpu-lora-cost config/gpu-lora-cost.phases
# Exit code: 0 when every phase ran to completion, else the last failing phase's code (124: the
# budget ran out).
set -uo pipefail
preset=$1 phases=$2
deadline=$(( $(date +%s) + ${BUDGET_S:-480} ))
n=0 rc=0
while IFS= read -r line || [ -n "$line" ]; do
  line=${line%%#*}
  read -ra targets <<< "$line"
  [ ${#targets[@]} -eq 0 ] && continue
  n=$((n + 1))
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 60 ]; then
    echo "== phase $n not started ($left s left): ${targets[*]}"; rc=124; continue
  fi
  echo "== phase $n ($left s left): ${targets[*]}"
  BUDGET_S=$left OUT='' bash tools/gpu-node.sh "$preset" "${targets[@]/#/results/$preset/}" \
    || rc=$?
done < "$phases"
echo "phases exit code $rc"
exit $rc
