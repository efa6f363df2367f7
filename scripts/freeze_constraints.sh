#!/usr/bin/env bash
# Rewrite constraints.txt from ./.venv after the test suite passed in it. Usage (newest releases):
#   DIRMOE_UNPINNED=1 bash scripts/setup_venv.sh dev && .venv/bin/python -m pytest -q \
#     && bash scripts/freeze_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Exact versions the test suite passed with ($(.venv/bin/python -c 'import platform; print(platform.system(), platform.machine(), "Python", platform.python_version())'), $(date +%Y-%m-%d))."
  echo "# scripts/setup_venv.sh installs with these as pip constraints. Regenerate after a green run"
  echo "# against the newest releases:"
  echo "#   DIRMOE_UNPINNED=1 bash scripts/setup_venv.sh dev && .venv/bin/python -m pytest -q \\"
  echo "#     && bash scripts/freeze_constraints.sh"
  .venv/bin/python -m pip freeze --exclude-editable | grep -v -i '^megatron.dirmoe'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
