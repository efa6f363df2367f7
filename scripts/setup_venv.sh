#!/usr/bin/env bash
# Create ./.venv with Python 3.12 and install megatron_dirmoe into it (editable).
#   bash scripts/setup_venv.sh        # runtime dependencies
#   bash scripts/setup_venv.sh dev    # + test tools
# Versions come from constraints.txt (the ones the tests passed with); DIRMOE_UNPINNED=1 resolves
# the newest releases instead, to see the next break before users do.
# Python 3.12 is found on PATH or among pyenv's versions (megatron-core 0.19 needs >= 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for candidate in "$root"/versions/3.12*/bin/python3.12 "$root"/versions/3.13*/bin/python3.13; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
  echo "setup_venv.sh: no Python >= 3.12 found (PATH or pyenv); install one first" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
extra=""
if [ "${1:-}" = "dev" ]; then
  extra="[dev]"
fi
.venv/bin/python -m pip install --quiet --upgrade pip
constraints=(-c constraints.txt)
if [ "${DIRMOE_UNPINNED:-0}" = "1" ]; then
  constraints=()
  echo "setup_venv.sh: DIRMOE_UNPINNED=1, resolving the newest releases (not constraints.txt)"
fi
.venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".${extra}"
.venv/bin/python -c 'import megatron.core, megatron_dirmoe; print("megatron-core", megatron.core.__version__, "| megatron_dirmoe", megatron_dirmoe.__version__)'
