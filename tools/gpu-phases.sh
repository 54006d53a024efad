#!/usr/bin/env bash
# Run a preset on a GPU node in priority phases within ONE wall-clock budget, so that a device
# session that ends early has run what matters most (one device session is 30 minutes; a preset
# can need more). Each non-comment line of PHASES is one phase: Snakemake targets relative to
# results/<preset>/, run by tools/gpu-node.sh with the time left; a phase that would start with
# under a minute left is skipped and named. A target whose result exists (this lease, or an earlier
# one restored from .gpu-results/results.tar.gz) is not asked for again: an earlier lease's weights
# are rebuilt here, and asking Snakemake for a finished target downstream of them would rerun it.
# Rerun failed results with tools/rerun-failed.py.
#   BUDGET_S=1500 tools/gpu-phases.sh gpu-lora-cost config/gpu-lora-cost.phases
# Exit code: 0 when every phase ran to completion, else the last failing phase's code (124: the
# budget ran out).
set -uo pipefail
preset=$1 phases=$2
deadline=$(( $(date +%s) + ${BUDGET_S:-480} ))
bash tools/restore-results.sh "$preset"  # before asking which targets are done
n=0 rc=0
while IFS= read -r line || [ -n "$line" ]; do
  line=${line%%#*}
  read -ra named <<< "$line"
  [ ${#named[@]} -eq 0 ] && continue
  n=$((n + 1))
  targets=()
  for t in "${named[@]}"; do [ -e "results/$preset/$t" ] || targets+=("$t"); done
  if [ ${#targets[@]} -eq 0 ]; then echo "== phase $n done before: ${named[*]}"; continue; fi
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
