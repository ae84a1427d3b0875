#!/usr/bin/env bash
# The whole test suite: set up .venv, build the C++/CUDA parts, run pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash build_scripts/setup_env.sh
venv="${REDRAFTER_VENV:-$root/.venv}"
# C++/CUDA: CPU references, every kernel for sm_80/86/89/90 (warnings as errors, no spills),
# the kernel emulator run, the ASan/UBSan fuzz run; then the plugins' CPU-testable logic (the
# TensorRT adapters only where TensorRT headers exist; the script says when it skips them).
bash build_scripts/build_cpp.sh
bash build_scripts/build_plugins.sh
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
