#!/usr/bin/env bash
# The whole test suite (the full tier; CI runs exactly this via .ci/run): set up .venv, lint, build
# the C++/CUDA parts, run their ctest checks, then every pytest test (--full).
#   bash build_scripts/test.sh [PYTEST ARGS...]   # e.g. -x, -k NAME
# A plain `pytest` is the fast tier (tests marked full or smollm2 deselected; tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash build_scripts/setup_env.sh
venv="${REDRAFTER_VENV:-$root/.venv}"
# ruff (lint + format) and clang-format: fails on any finding (build_scripts/lint.sh --fix fixes layout).
REDRAFTER_VENV="$venv" bash build_scripts/lint.sh
# C++/CUDA: CPU references, every kernel for sm_80/86/89/90 (warnings as errors, no spills),
# the kernel emulator, the ASan/UBSan build; then the plugins' CPU-testable logic (the TensorRT
# adapters only where TensorRT headers exist; the script says when it skips them).
bash build_scripts/build_cpp.sh
bash build_scripts/build_plugins.sh
# The C++ checks registered with ctest (cpp/CMakeLists.txt): emulator, fuzz, ptxas report, and the
# GPU kernel check (reported as skipped where there is no GPU); the fuzz run again under ASan + UBSan.
ctest --test-dir cpp/build --output-on-failure
ctest --test-dir cpp/build-asan --output-on-failure
exec "$venv/bin/python" -m pytest --full -q -p no:cacheprovider "$@" tests
