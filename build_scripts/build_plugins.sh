#!/usr/bin/env bash
# Builds plugins/: always the TensorRT-free plugin logic (libredrafter_plugin_logic.so, tested by
# pytest on any CPU); the TensorRT plugin library libredrafter_trt_plugins.so only when TensorRT
# headers are found (TensorRT_INCLUDE_DIR, TensorRT_ROOT, or the TensorRT-LLM container's
# install), and then also libredrafter_cuda.so from cpp/ (the kernels it launches; the TensorRT-LLM
# runtime backend loads the same file for the KV-cache relocation).
#
#   bash build_scripts/build_plugins.sh                 # build dir: plugins/build
#   TensorRT_INCLUDE_DIR=/path/to/TensorRT/include bash build_scripts/build_plugins.sh --check-only
#       compiles the IPluginV3 adapters against those headers without CUDA kernels or linking
#       (what a machine without GPU or TensorRT can check).
# Environment: REDRAFTER_PLUGIN_BUILD_DIR (default plugins/build), CMAKE_CUDA_ARCHITECTURES,
# JOBS (default: number of CPUs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${REDRAFTER_PLUGIN_BUILD_DIR:-$root/plugins/build}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
check_only=0
for arg in "$@"; do
  case "$arg" in
    --check-only) check_only=1 ;;
    *) echo "build_plugins.sh: unknown argument $arg (expected --check-only)" >&2; exit 2 ;;
  esac
done

# TensorRT headers: explicit variables first, then the places NVIDIA's containers use.
if [ -z "${TensorRT_INCLUDE_DIR:-}" ] && [ -n "${TensorRT_ROOT:-}" ]; then
  TensorRT_INCLUDE_DIR="$TensorRT_ROOT/include"
fi
if [ -z "${TensorRT_INCLUDE_DIR:-}" ]; then
  for d in /usr/local/tensorrt/include /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu; do
    if [ -f "$d/NvInferRuntime.h" ]; then TensorRT_INCLUDE_DIR="$d"; break; fi
  done
fi
if [ -z "${TensorRT_INCLUDE_DIR:-}" ] && command -v python3 >/dev/null; then
  # pip's tensorrt wheel (as in the TensorRT-LLM container) may ship its headers beside the module.
  TensorRT_INCLUDE_DIR="$(python3 - <<'EOF' 2>/dev/null || true
import glob, os
try:
    import tensorrt
    base = os.path.dirname(tensorrt.__file__)
    hits = glob.glob(os.path.join(base, "..", "tensorrt*", "include", "NvInferRuntime.h"))
    print(os.path.dirname(os.path.realpath(hits[0])) if hits else "")
except Exception:
    print("")
EOF
)"
fi

cmake_args=(-S "$root/plugins" -B "$build" -DCMAKE_BUILD_TYPE=Release)
if command -v ninja >/dev/null; then cmake_args+=(-G Ninja); fi
if [ -n "${TensorRT_INCLUDE_DIR:-}" ] && [ -f "$TensorRT_INCLUDE_DIR/NvInferRuntime.h" ]; then
  cmake_args+=("-DTensorRT_INCLUDE_DIR=$TensorRT_INCLUDE_DIR")
  have_trt=1
else
  cmake_args+=("-DTensorRT_INCLUDE_DIR=")
  have_trt=0
fi
if [ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then
  cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$CMAKE_CUDA_ARCHITECTURES")
fi
if [ "$check_only" = 1 ]; then
  cmake_args+=(-DREDRAFTER_PLUGINS_LINK=OFF)
else
  cmake_args+=(-DREDRAFTER_PLUGINS_LINK=ON)
fi
if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
cmake "${cmake_args[@]}" >/dev/null

cmake --build "$build" -j "$jobs" --target redrafter_plugin_logic
echo "built $build/libredrafter_plugin_logic.so (plugin fields/shapes/launch logic, CPU)"
if [ "$have_trt" = 0 ]; then
  echo "SKIPPED libredrafter_trt_plugins.so: no TensorRT headers (set TensorRT_INCLUDE_DIR or" \
       "TensorRT_ROOT; run inside nvcr.io/nvidia/tensorrt-llm/release:1.2.1 to build it)"
  exit 0
fi
if [ "$check_only" = 1 ]; then
  cmake --build "$build" -j "$jobs" --target redrafter_trt_plugin_objects
  echo "compiled the IPluginV3 adapters against $TensorRT_INCLUDE_DIR (check only: not linked)"
  exit 0
fi
cmake --build "$build" -j "$jobs" --target redrafter_trt_plugins
echo "built $build/libredrafter_trt_plugins.so and $build/cpp/libredrafter_cuda.so"
