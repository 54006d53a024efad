#!/usr/bin/env bash
# One device lease's work in one detached process, so that no job is cut at a call boundary:
# the compressed-tensors 0.17.0 check first (tools/ct017-check.sh, short, CT_BUDGET_S), then the
# gpu-lora-cost phases (tools/gpu-phases.sh) with what is left of BUDGET_S; everything packed into
# $SESSION_DIR/session.tar.gz (default /tmp) for the calls that bring it back. On the device, after the bundle's parts:
#   cp .whl/compressed_tensors-0.17.0-py3-none-any.whl /tmp/
#   setsid nohup env BUDGET_S=1500 bash tools/gpu-session.sh \
#     /tmp/compressed_tensors-0.17.0-py3-none-any.whl > /tmp/session.log 2>&1 &
# (the device tool deletes .whl/ on a later call that does not carry it: hence the copy in /tmp)
set -uo pipefail
wheel=$1
deadline=$(( $(date +%s) + ${BUDGET_S:-1500} ))
PRESET=${PRESET:-gpu-lora-cost}
out=${SESSION_DIR:-/tmp}
echo "== ct017 check (${CT_BUDGET_S:-420} s at most)"
timeout --signal=INT --kill-after=30 "${CT_BUDGET_S:-420}" bash tools/ct017-check.sh "$wheel" \
  > "$out/ct017.log" 2>&1
echo "ct017 check exit code $?"; tail -5 "$out/ct017.log"
left=$(( deadline - $(date +%s) ))
echo "== $PRESET phases ($left s left)"
BUDGET_S=$left bash tools/gpu-phases.sh "$PRESET" "config/$PRESET.phases"
echo "phases exit code $?"
mkdir -p logs && cp "$out/ct017.log" logs/
tar czf "$out/session.tar.gz" results logs benchmarks 2>/dev/null
echo "session done: $out/session.tar.gz"
