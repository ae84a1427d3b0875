#!/usr/bin/env bash
# GPU check for a bare CUDA machine: an NVIDIA GPU, the CUDA toolkit (nvcc) + CMake, and a Python
# with PyTorch (CUDA). No TensorRT, no network; installs nothing; imports the project from this
# checkout (PYTHONPATH). Target: under 8 minutes on an H100-class GPU.
#
#   1. builds cpp/ for the present GPU's architecture only (cpp/build-gpucheck);
#   2. runs every CUDA kernel against its C++ CPU reference on random inputs
#      (cpp/build-gpucheck/redrafter_gpu_check, the program build_scripts/gpu_kernel_check.sh runs)
#      and prints each call's achieved bandwidth as a fraction of the device's peak;
#   3. the cpp/ kernels through the torch backend's dispatch against the PyTorch references
#      (tests/test_trtllm_cuda_ops.py);
#   4. the torch backend on CUDA (python -m redrafter_trt.bench.gpu_check torch): which operators
#      ran, greedy parity with the CPU on a tiny random model, then on random bf16 models shaped
#      like a 1B and a 7B Llama the verify cost curve t(k)/t(1), k = 1..64, and the draft cost per
#      beam step; one summary table.
#
# Environment: PYTHON (default python3), GPU_CHECK_QUICK=1 (the kernel check's --quick shapes and
# the torch part's --quick models: a smoke run), GPU_CHECK_BUILD_DIR (default cpp/build-gpucheck),
# REDRAFTER_BUILD_JOBS. Exit status: 0 every check passed, 1 a check failed, 2 the toolchain is
# missing, 77 no NVIDIA GPU here (nothing was built or run).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for a in "$@"; do
  case "$a" in
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a (it takes none; see --help for the environment variables)" >&2; exit 2 ;;
  esac
done
cd "$root"
py="${PYTHON:-python3}"
quick="${GPU_CHECK_QUICK:-0}"
build="${GPU_CHECK_BUILD_DIR:-$root/cpp/build-gpucheck}"
jobs="${REDRAFTER_BUILD_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[gpu_check] $*" >&2; }
t0=$SECONDS

# 0. A GPU, before anything is built.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  log "no NVIDIA GPU visible (nvidia-smi missing or lists none): nothing built or run"
  exit 77
fi
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader >&2
"$py" -c "import torch, sys; print('PyTorch', torch.__version__, 'CUDA', torch.version.cuda, file=sys.stderr); sys.exit(0 if torch.cuda.is_available() else 77)"
rc=$?
if [ $rc -ne 0 ]; then
  [ $rc -eq 77 ] && log "PyTorch sees no CUDA device: nothing built or run" || log "$py cannot import torch"
  [ $rc -eq 77 ] && exit 77 || exit 2
fi
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
command -v nvcc >/dev/null 2>&1 || { log "nvcc not found (PATH, /usr/local/cuda*/bin)"; exit 2; }
command -v cmake >/dev/null 2>&1 || { log "cmake not found"; exit 2; }
[ -n "$cap" ] || { log "nvidia-smi did not report the compute capability"; exit 2; }

# 1. Build cpp/ for this GPU only.
log "1/4 building cpp/ for sm_$cap in $build"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
if ! cmake -S cpp -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DREDRAFTER_BUILD_CUDA=ON \
     -DCMAKE_CUDA_ARCHITECTURES="$cap" >/dev/null \
   || ! cmake --build "$build" -j "$jobs" --target redrafter_cpu redrafter_cuda redrafter_gpu_check; then
  log "build failed"
  exit 1
fi
export REDRAFTER_NATIVE_LIB="$build/libredrafter_cpu.so" REDRAFTER_CUDA_LIB="$build/libredrafter_cuda.so"
log "built in $((SECONDS - t0)) s"

status=0
# 2. Kernels against the CPU references, bandwidth as a fraction of peak.
log "2/4 kernels against their CPU references"
kargs=()
[ "$quick" = "1" ] && kargs+=(--quick)
klog="$(mktemp)"
trap 'rm -f "$klog"' EXIT
"$build/redrafter_gpu_check" "${kargs[@]}" | tee "$klog"
krc=${PIPESTATUS[0]}
peak="$("$py" -m redrafter_trt.bench.gpu_check peak)"
log "peak DRAM bandwidth: $peak GB/s"
"$py" -m redrafter_trt.bench.gpu_check kernels "$klog" || status=1
[ "$krc" -eq 0 ] || { log "kernel check failed (status $krc)"; status=1; }

# 3. The torch backend's kernel dispatch against the PyTorch references.
log "3/4 torch-backend kernel dispatch (tests/test_trtllm_cuda_ops.py)"
if "$py" -c "import pytest" 2>/dev/null; then
  "$py" -m pytest -q -p no:cacheprovider tests/test_trtllm_cuda_ops.py -rs || status=1
else
  log "pytest is not installed: step 3 skipped (step 4 still compares CPU and CUDA)"
fi

# 4. The torch backend on CUDA: parity, verify cost curve, draft cost.
log "4/4 torch backend on CUDA"
targs=()
[ "$quick" = "1" ] && targs+=(--quick)
"$py" -m redrafter_trt.bench.gpu_check torch "${targs[@]}" || status=1

log "done in $((SECONDS - t0)) s: $([ $status -eq 0 ] && echo 'all checks passed' || echo 'FAILED')"
exit $status
