#!/usr/bin/env bash
# Build the C++/CUDA operators in cpp/ and check them. Idempotent and incremental.
#
#   bash build_scripts/build_cpp.sh              # everything (what CI runs)
#   bash build_scripts/build_cpp.sh --cpu-only   # only cpp/build/libredrafter_cpu.so (tests' fallback)
#
# Full run:
#   1. cpp/build: CPU references + C ABI (host compiler, -Werror), and, when nvcc exists, every
#      kernel for sm_80/86/89/90 with warnings as errors and -Xptxas -v,-warn-spills,-warn-lmem-usage;
#   2. build_scripts/check_ptxas.py: register/shared-memory table, fails on any spill or stack frame;
#   3. redrafter_emu_check --quick: the kernels' own code run on a CPU emulator of the CUDA
#      execution model (cpp/tests/emu) against the CPU references, on small shapes;
#   4. cpp/build-asan: CPU references + fuzz driver with ASan/UBSan, and a run of the fuzz driver.
# Needs cmake (>= 3.24) and g++; nvcc is found on PATH or in /usr/local/cuda*/bin. With CI set,
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
    -DREDRAFTER_BUILD_CUDA=$([ $have_cuda -eq 1 ] && echo ON || echo OFF) >/dev/null
elif [ $have_cuda -eq 1 ] && [ $cpu_only -eq 0 ] && grep -q '^REDRAFTER_BUILD_CUDA:BOOL=OFF' "$build/CMakeCache.txt"; then
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

# 2. ptxas: no spills, no stack frames; print the table.
if grep -q '^REDRAFTER_BUILD_CUDA:BOOL=ON' "$build/CMakeCache.txt"; then
  python3 "$root/build_scripts/check_ptxas.py" "$build"
fi

# 3. The kernels' own code on the CPU emulator (cpp/tests/emu) against the CPU references.
if [ -x "$build/redrafter_emu_check" ]; then
  emu_stamp="$build/.emu-check-passed"
  if [ ! -f "$emu_stamp" ] || [ "$build/redrafter_emu_check" -nt "$emu_stamp" ] || [ "$build/libredrafter_cpu.so" -nt "$emu_stamp" ]; then
    log "running the kernels on the CPU emulator (redrafter_emu_check --quick)"
    "$build/redrafter_emu_check" --quick
    touch "$emu_stamp"
  else
    log "emulated kernel check already passed on these binaries"
  fi
fi

# 4. Sanitizers: ASan + UBSan build of the CPU references and a fuzz run (skipped when nothing changed).
asan="$root/cpp/build-asan"
if [ ! -f "$asan/CMakeCache.txt" ]; then
  log "configuring $asan (ASan + UBSan)"
  cmake -S "$root/cpp" -B "$asan" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREDRAFTER_BUILD_CUDA=OFF \
    -DREDRAFTER_SANITIZE=ON >/dev/null
fi
cmake --build "$asan" -j "$jobs"
stamp="$asan/.fuzz-passed"
if [ ! -f "$stamp" ] || [ "$asan/redrafter_fuzz" -nt "$stamp" ] || [ "$asan/libredrafter_cpu.so" -nt "$stamp" ]; then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$asan/redrafter_fuzz" --iterations "${REDRAFTER_FUZZ_ITERATIONS:-4000}"
  touch "$stamp"
else
  log "fuzz driver already passed on these binaries"
fi
log "all done ($((SECONDS - t0)) s)"
