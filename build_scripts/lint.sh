#!/usr/bin/env bash
# Lint the repository: Python with ruff (rules and layout: pyproject.toml [tool.ruff]) and the
# package's types with mypy (pyproject.toml [tool.mypy]), C++/CUDA in cpp/ and plugins/ with
# clang-format (.clang-format). Runs every check, then exits 1 if any failed.
#
#   bash build_scripts/lint.sh         # check only (build_scripts/test.sh runs this first; CI)
#   bash build_scripts/lint.sh --fix   # apply ruff's safe fixes and both formatters, then check
#
# The tools are the venv's pinned ruff, mypy and clang-format (build_scripts/requirements-test.txt):
# REDRAFTER_VENV, default .venv (bash build_scripts/setup_env.sh creates it). The same checks run
# at commit time through .pre-commit-config.yaml (`.venv/bin/pre-commit install` once).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fix=0
for a in "$@"; do
  case "$a" in
    --fix) fix=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "lint.sh: unknown option $a (expected --fix or --help)" >&2; exit 2 ;;
  esac
done
venv="${REDRAFTER_VENV:-$root/.venv}"
ruff="$venv/bin/ruff"
clang_format="$venv/bin/clang-format"
python="$venv/bin/python"
for tool in "$ruff" "$clang_format"; do
  if [ ! -x "$tool" ]; then
    echo "lint.sh: $tool not found (REDRAFTER_VENV=$venv; bash build_scripts/setup_env.sh installs the pinned tools)" >&2
    exit 2
  fi
done
if ! "$python" -m mypy --version >/dev/null 2>&1; then
  echo "lint.sh: mypy not installed in $venv (bash build_scripts/setup_env.sh installs the pinned tools)" >&2
  exit 2
fi
log() { echo "[lint] $*" >&2; }

# C++/CUDA sources: the tracked ones (a fresh clone, as in CI), else everything under cpp/ and plugins/.
cxx=()
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  while IFS= read -r f; do [ -f "$f" ] && cxx+=("$f"); done < <(git ls-files -- \
    'cpp/*.cpp' 'cpp/*.h' 'cpp/*.cu' 'cpp/*.cuh' 'plugins/*.cpp' 'plugins/*.h' 'plugins/*.cu' 'plugins/*.cuh')
else
  while IFS= read -r f; do cxx+=("$f"); done < <(find cpp plugins -path '*/build*' -prune -o -type f \
    \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print | sort)
fi

if [ $fix -eq 1 ]; then
  log "fixing: ruff check --fix, ruff format, clang-format -i (${#cxx[@]} files)"
  "$ruff" check --fix --quiet . || true   # what is left is reported below
  "$ruff" format --quiet .
  "$clang_format" -i "${cxx[@]}"
fi

status=0
log "ruff check ($("$ruff" --version))"
if ! "$ruff" check --output-format concise .; then status=1; fi
log "ruff format --check"
if ! "$ruff" format --check .; then
  status=1
  log "  layout differs in the files above: bash build_scripts/lint.sh --fix (or ruff format FILE)"
fi
log "mypy ($("$python" -m mypy --version))"
if ! "$python" -m mypy; then
  status=1
  log "  type errors above: fix them (settings: pyproject.toml [tool.mypy])"
fi
log "clang-format --dry-run on ${#cxx[@]} files ($("$clang_format" --version | head -1))"
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
bad=()
for f in "${cxx[@]}"; do
  if ! "$clang_format" --dry-run -Werror "$f" >/dev/null 2>"$report"; then
    bad+=("$f")
    echo "$f: $(grep -c 'error: code should be clang-formatted' "$report") lines to reformat" >&2
  fi
done
if [ ${#bad[@]} -gt 0 ]; then
  status=1
  log "  ${#bad[@]} C++/CUDA files differ from .clang-format: bash build_scripts/lint.sh --fix (or clang-format -i FILE)"
fi
if [ $status -eq 0 ]; then log "clean"; else log "FAILED (see above)"; fi
exit $status
