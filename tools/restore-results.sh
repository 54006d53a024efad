#!/usr/bin/env bash
# Restore an earlier GPU lease's results for PRESET (a tarball with mtimes kept, so nothing reruns)
# unless this machine already has them, and drop those that point into that lease's weight cache.
#   tools/restore-results.sh PRESET      (reads .gpu-results/results.tar.gz)
preset=$1
if [ -f .gpu-results/results.tar.gz ] && [ ! -d "results/$preset" ]; then
  tar xzf .gpu-results/results.tar.gz
  # their weights were in that machine's cache: rebuild what points into a missing cache
  python3 tools/drop-stale-cache-results.py "results/$preset"
fi
