#!/usr/bin/env bash
# CMake compiler launcher for the CUDA objects: runs the nvcc command given after the log
# directory and keeps its ptxas report (-Xptxas -v) in LOGDIR/<object>.ptxas.log, so that
# build_scripts/check_ptxas.py can check every kernel even when the build was incremental.
# Lines other than ptxas' info lines still go to stderr.
set -u
logdir="$1"
shift
obj=unknown
prev=""
for a in "$@"; do
  if [ "$prev" = "-o" ]; then obj="$a"; fi
  prev="$a"
done
mkdir -p "$logdir"
log="$logdir/$(basename "$obj").ptxas.log"
tmp="$log.tmp.$$"
"$@" 2> "$tmp"
status=$?
grep -v -E '^(ptxas info|    [0-9]+ bytes stack frame)' "$tmp" >&2 || true
if [ $status -eq 0 ]; then mv "$tmp" "$log"; else cat "$tmp" > "$log.failed"; rm -f "$tmp"; fi
exit $status
