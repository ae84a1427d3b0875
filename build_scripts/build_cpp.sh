#!/usr/bin/env bash
# Build the C++/CUDA operators in cpp/. Idempotent and incremental.
#
#   bash build_scripts/build_cpp.sh              # everything (what CI builds)
#   bash build_scripts/build_cpp.sh --cpu-only   # only cpp/build/libredrafter_cpu.so (tests' fallback)
#
# Full run:
#   1. cpp/build: CPU references + C ABI (host compiler, -Werror), the fuzz driver, the kernel
#      emulator check (cpp/tests/emu), and, when nvcc exists, every kernel for sm_80/86/89/90 with
#      warnings as errors and -Xptxas -v,-warn-spills,-warn-lmem-usage, plus the GPU self-test;
#   2. cpp/build-asan: CPU references + fuzz driver with ASan/UBSan.
# The checks are ctest tests of those two builds (cpp/CMakeLists.txt); build_scripts/test.sh runs
#   ctest --test-dir cpp/build --output-on-failure       # emu_check, fuzz_cpu, ptxas_check, gpu_kernel_check
#   ctest --test-dir cpp/build-asan --output-on-failure  # fuzz_cpu under ASan + UBSan
# (REDRAFTER_FUZZ_ITERATIONS, default 4000, sets the fuzz runs' iterations at configure time.)
# Needs cmake (>= 3.21) and g++; nvcc is found on PATH or in /usr/local/cuda*/bin. With CI set,
# a missing nvcc is an error (set REDRAFTER_ALLOW_NO_CUDA=1 to build the CPU parts only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cpu_only=0
for a in "$@"; do
  case "$a" in
    --cpu-only) cpu_only=1 ;;
    *) echo "build_cpp.sh: unknown option $a (use --cpu-only)" >&2; exit 2 ;;
  esac
done
jobs="${REDRAFTER_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
fuzz_iterations="${REDRAFTER_FUZZ_ITERATIONS:-4000}"
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
log() { echo "[build_cpp] $*" >&2; }
t0=$SECONDS

if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda-13.0/bin /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
have_cuda=0
if command -v nvcc >/dev/null 2>&1; then have_cuda=1; fi
if [ $cpu_only -eq 0 ] && [ $have_cuda -eq 0 ]; then
  if [ -n "${CI:-}" ] && [ "${REDRAFTER_ALLOW_NO_CUDA:-0}" != "1" ]; then
    log "nvcc not found (looked on PATH and in /usr/local/cuda*/bin): CI must build the CUDA kernels"
    exit 1
  fi
  log "nvcc not found: building the CPU references only"
fi

# 1. Main build.
build="$root/cpp/build"
if [ ! -f "$build/CMakeCache.txt" ]; then
  log "configuring $build"
  cmake -S "$root/cpp" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DREDRAFTER_BUILD_CUDA=$([ $have_cuda -eq 1 ] && echo ON || echo OFF) -DREDRAFTER_CUDA_WERROR=ON \
    -DREDRAFTER_FUZZ_ITERATIONS="$fuzz_iterations" >/dev/null
elif [ -n "${REDRAFTER_FUZZ_ITERATIONS:-}" ]; then
  cmake -S "$root/cpp" -B "$build" -DREDRAFTER_FUZZ_ITERATIONS="$fuzz_iterations" >/dev/null
fi
# CI's build keeps CUDA warnings and ptxas spills as errors (only gpu_check.sh relaxes them, in its
# own build directory): a cache configured otherwise is switched back.
if grep -q '^REDRAFTER_CUDA_WERROR:BOOL=OFF' "$build/CMakeCache.txt"; then
  log "turning REDRAFTER_CUDA_WERROR back on in $build"
  cmake -S "$root/cpp" -B "$build" -DREDRAFTER_CUDA_WERROR=ON >/dev/null
fi
if [ $have_cuda -eq 1 ] && [ $cpu_only -eq 0 ] && grep -q '^REDRAFTER_BUILD_CUDA:BOOL=OFF' "$build/CMakeCache.txt"; then
  log "enabling the CUDA kernels in $build"
  cmake -S "$root/cpp" -B "$build" -DREDRAFTER_BUILD_CUDA=ON >/dev/null
fi
if [ $cpu_only -eq 1 ]; then
  cmake --build "$build" --target redrafter_cpu -j "$jobs"
  log "CPU library ready: $build/libredrafter_cpu.so ($((SECONDS - t0)) s)"
  exit 0
fi
cmake --build "$build" -j "$jobs"
log "main build done ($((SECONDS - t0)) s)"

# 2. Sanitizers: ASan + UBSan build of the CPU references and the fuzz driver.
asan="$root/cpp/build-asan"
if [ ! -f "$asan/CMakeCache.txt" ]; then
  log "configuring $asan (ASan + UBSan)"
  cmake -S "$root/cpp" -B "$asan" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREDRAFTER_BUILD_CUDA=OFF \
    -DREDRAFTER_SANITIZE=ON -DREDRAFTER_FUZZ_ITERATIONS="$fuzz_iterations" >/dev/null
elif [ -n "${REDRAFTER_FUZZ_ITERATIONS:-}" ]; then
  cmake -S "$root/cpp" -B "$asan" -DREDRAFTER_FUZZ_ITERATIONS="$fuzz_iterations" >/dev/null
fi
cmake --build "$asan" -j "$jobs"
log "all built ($((SECONDS - t0)) s); the checks: ctest --test-dir cpp/build, ctest --test-dir cpp/build-asan"
