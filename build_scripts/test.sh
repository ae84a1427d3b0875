#!/usr/bin/env bash
# The whole test suite: set up .venv, build the C++/CUDA parts (when build_cpp.sh exists), run pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash build_scripts/setup_env.sh
venv="${REDRAFTER_VENV:-$root/.venv}"
if [ -f build_scripts/build_cpp.sh ]; then
  bash build_scripts/build_cpp.sh
fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
