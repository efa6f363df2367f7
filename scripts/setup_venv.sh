#!/usr/bin/env bash
# Create ./.venv with Python 3.12 and install megatron_dirmoe into it (editable).
#   bash scripts/setup_venv.sh        # runtime dependencies
#   bash scripts/setup_venv.sh dev    # + test tools
# Versions come from constraints.txt (the ones the tests passed with); DIRMOE_UNPINNED=1 resolves
# the newest releases instead, to see the next break before users do.
# Python 3.12 is found on PATH or among pyenv's versions (megatron-core 0.19 needs >= 3.12).
# A GPU driver older than the lock's CUDA 13 torch gets the same torch version built for a CUDA
# it runs (DIRMOE_TORCH_INDEX_URL overrides the index). Inside a container or environment that
# already has a CUDA torch (NGC), use scripts/install_into_env.sh instead.
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
else
  # The lock's torch is a CUDA 13 build. On a GPU whose driver supports an older CUDA, install
  # the locked torch version built for the newest CUDA that driver runs (PyTorch's index), then
  # pin that torch and its CUDA wheels instead of the lock's (scripts/install_plan.py).
  torch_index=${DIRMOE_TORCH_INDEX_URL:-$(.venv/bin/python scripts/install_plan.py torch-index)}
  if [ -n "$torch_index" ]; then
    torch_pin=$(grep -E '^torch==' constraints.txt)
    echo "setup_venv.sh: installing $torch_pin from $torch_index (CUDA build chosen for this driver)"
    .venv/bin/python -m pip install --quiet --index-url "$torch_index" "$torch_pin"
    pins=.venv/dirmoe_constraints.txt
    .venv/bin/python scripts/install_plan.py constraints --python .venv/bin/python > "$pins"
    constraints=(-c "$pins")
  fi
fi
.venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".${extra}"
.venv/bin/python -c 'import megatron.core, megatron_dirmoe; print("megatron-core", megatron.core.__version__, "| megatron_dirmoe", megatron_dirmoe.__version__)'
