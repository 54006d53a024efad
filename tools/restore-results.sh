#!/usr/bin/env bash
# Restore an earlier GPU lease's results for PRESET (a tarball with mtimes kept, so nothing reruns)
# unless this machine already has them; set them aside if they come from another GPU model, and
# drop those that point into that lease's weight cache.
#   tools/restore-results.sh PRESET      (reads .gpu-results/results.tar.gz)
preset=$1
if [ -f .gpu-results/results.tar.gz ] && [ ! -d "results/$preset" ]; then
  tar xzf .gpu-results/results.tar.gz
  # timings of another GPU model must not join this lease's run folder
  python3 tools/restored-gpu.py "results/$preset"
  # their weights were in that machine's cache: rebuild what points into a missing cache
  [ -d "results/$preset" ] && python3 tools/drop-stale-cache-results.py "results/$preset"
fi
