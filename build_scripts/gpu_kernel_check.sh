#!/usr/bin/env bash
# Run every CUDA kernel against its CPU reference on random inputs (all dtypes, W in {1,4,8,64},
# V in {1000, 32000, 152064}) and time it, printing achieved bandwidth against the bytes each call
# must move. Builds first (build_scripts/build_cpp.sh). Exit status: 0 pass, 1 mismatch or CUDA
# error, 77 no GPU on this machine (the kernels were built, nothing was run).
#   bash build_scripts/gpu_kernel_check.sh [--quick] [--iters N] [--only beam_search|tree_pack|accept|kv_relocate]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/build_scripts/build_cpp.sh"
bin="$root/cpp/build/redrafter_gpu_check"
if [ ! -x "$bin" ]; then
  echo "gpu_kernel_check: $bin was not built (nvcc missing?)" >&2
  exit 1
fi
set +e
"$bin" "$@"
status=$?
set -e
if [ $status -eq 77 ]; then
  echo "gpu_kernel_check: no GPU here; the kernels compiled for sm_80/86/89/90 and ran on the CPU emulator only" >&2
fi
exit $status
