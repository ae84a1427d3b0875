#!/usr/bin/env bash
# GPU check for a bare CUDA machine: an NVIDIA GPU with its driver, the CUDA toolkit (nvcc, no newer
# than the driver's CUDA) + CMake >= 3.21 + a C++17 compiler, and a Python with numpy and PyTorch
# (a CUDA build). Nothing else: no TensorRT, no network, no other Python package (pytest, when
# present, adds step 3). Installs nothing; imports the project from this checkout (PYTHONPATH).
# Target: under 8 minutes on an H100-class GPU.
#
#   0. checks the above before building anything, each with a message saying what to do;
#   1. builds cpp/ for the present GPU's architecture only (cpp/build-gpucheck); nvcc warnings and
#      ptxas spills are reported, not fatal (another nvcc can allocate registers differently;
#      CI's build, build_scripts/build_cpp.sh, keeps them as errors): GPU_CHECK_STRICT=1 makes
#      them errors here too;
#   2. runs every CUDA kernel against its C++ CPU reference on random inputs
#      (cpp/build-gpucheck/redrafter_gpu_check, the program build_scripts/gpu_kernel_check.sh runs)
#      and prints each call's achieved bandwidth as a fraction of the device's peak;
#   3. the cpp/ kernels through the torch backend's dispatch against the PyTorch references
#      (tests/test_trtllm_cuda_ops.py; skipped without pytest);
#   4. the torch backend on CUDA (python -m redrafter_trt.bench.gpu_check torch): which operators
#      ran, greedy parity with the CPU on a tiny random model, then on random bf16 models shaped
#      like a 1B and a 7B Llama the verify cost curve t(k)/t(1), k = 1..64, and the draft cost per
#      beam step; one summary table.
#
# Environment: PYTHON (default python3), GPU_CHECK_QUICK=1 (the kernel check's --quick shapes and
# the torch part's --quick models: a smoke run), GPU_CHECK_STRICT=1 (warnings and spills are
# errors, as in CI), GPU_CHECK_BUILD_DIR (default cpp/build-gpucheck), GPU_CHECK_NVCC_DIRS (where
# to look for nvcc when it is not on PATH; default $CUDA_HOME/bin /usr/local/cuda/bin
# /usr/local/cuda-*/bin), REDRAFTER_BUILD_JOBS. Exit status: 0 every check passed, 1 a check
# failed, 2 a prerequisite is missing or unusable (the message names it), 77 no NVIDIA GPU here
# (nothing was built or run). tests/test_trtllm_gpu_check.py runs every exit before the build.
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
strict="${GPU_CHECK_STRICT:-0}"
build="${GPU_CHECK_BUILD_DIR:-$root/cpp/build-gpucheck}"
jobs="${REDRAFTER_BUILD_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[gpu_check] $*" >&2; }
t0=$SECONDS
CMAKE_MIN=3.21
# "a.b" -> a * 1000 + b (for comparing versions)
vnum() { local a="${1%%.*}" b="${1#*.}"; b="${b%%.*}"; echo $((10#$a * 1000 + 10#${b:-0})); }

# 0. Prerequisites, before anything is built.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  log "no NVIDIA GPU visible (nvidia-smi missing or lists none): nothing built or run"
  exit 77
fi
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader >&2
if ! command -v "$py" >/dev/null 2>&1; then
  log "Python not found ($py): set PYTHON to a Python with numpy and torch"
  exit 2
fi
missing="$("$py" -c 'import importlib.util as u; print(" ".join(m for m in ("numpy", "torch") if u.find_spec(m) is None))')" || {
  log "$py does not run"
  exit 2
}
if [ -n "$missing" ]; then
  log "$py has no $missing: the check needs numpy and torch (a CUDA build of PyTorch) and nothing else; install them (pip install numpy torch) or set PYTHON"
  exit 2
fi
if ! command -v nvcc >/dev/null 2>&1; then
  for d in ${GPU_CHECK_NVCC_DIRS:-${CUDA_HOME:+$CUDA_HOME/bin} /usr/local/cuda/bin /usr/local/cuda-*/bin}; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
command -v nvcc >/dev/null 2>&1 || {
  log "nvcc not found (PATH, ${GPU_CHECK_NVCC_DIRS:-\$CUDA_HOME/bin, /usr/local/cuda*/bin}): install the CUDA toolkit or put its bin/ on PATH"
  exit 2
}
command -v cmake >/dev/null 2>&1 || { log "cmake not found: install CMake >= $CMAKE_MIN"; exit 2; }
cmake_v="$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)"
if [ -z "$cmake_v" ]; then
  log "cmake --version did not report a version: install CMake >= $CMAKE_MIN"
  exit 2
fi
if [ "$(vnum "$cmake_v")" -lt "$(vnum $CMAKE_MIN)" ]; then
  log "CMake $cmake_v is older than $CMAKE_MIN, which cpp/CMakeLists.txt needs: install CMake >= $CMAKE_MIN"
  exit 2
fi
[ -n "$cap" ] || { log "nvidia-smi did not report the compute capability"; exit 2; }
# The driver runs code from a toolkit of its CUDA major version or older (a newer minor version of
# the same major runs through CUDA's minor-version compatibility, for the SASS built here).
nvcc_cuda="$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)"
drv_cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)"
if [ -z "$nvcc_cuda" ] || [ -z "$drv_cuda" ]; then
  log "cannot compare CUDA versions (nvcc: ${nvcc_cuda:-unknown}, driver: ${drv_cuda:-unknown}); going on"
elif [ "${nvcc_cuda%%.*}" -gt "${drv_cuda%%.*}" ]; then
  log "nvcc is CUDA $nvcc_cuda but the driver supports CUDA $drv_cuda at most: kernels built with it would not load. Use a CUDA ${drv_cuda%%.*}.x toolkit (PATH=/usr/local/cuda-${drv_cuda}/bin:\$PATH, or GPU_CHECK_NVCC_DIRS), or install a driver for CUDA $nvcc_cuda"
  exit 2
elif [ "$(vnum "$nvcc_cuda")" -gt "$(vnum "$drv_cuda")" ]; then
  log "nvcc is CUDA $nvcc_cuda, the driver CUDA $drv_cuda: same major version, so the kernels built for sm_$cap run (minor-version compatibility); a CUDA $drv_cuda toolkit or a newer driver avoids relying on it"
else
  log "CUDA: nvcc $nvcc_cuda, driver $drv_cuda"
fi
"$py" -c "import torch, sys; print('PyTorch', torch.__version__, 'CUDA', torch.version.cuda, file=sys.stderr); sys.exit(0 if torch.cuda.is_available() else 77)"
rc=$?
if [ $rc -ne 0 ]; then
  if [ $rc -eq 77 ]; then
    log "PyTorch sees no CUDA device (a CPU-only build, or a driver it cannot use): nothing built or run"
    exit 77
  fi
  log "$py cannot import torch"
  exit 2
fi

# 1. Build cpp/ for this GPU only.
log "1/4 building cpp/ for sm_$cap in $build"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
werror=OFF
[ "$strict" = "1" ] && werror=ON
log "nvcc warnings and ptxas spills as errors: $werror (GPU_CHECK_STRICT=1 for ON, as in CI)"
if ! cmake -S cpp -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DREDRAFTER_BUILD_CUDA=ON \
     -DCMAKE_CUDA_ARCHITECTURES="$cap" -DREDRAFTER_CUDA_WERROR="$werror" >/dev/null \
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
