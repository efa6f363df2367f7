#!/usr/bin/env bash
# Install megatron_dirmoe into an existing CUDA PyTorch environment (an NGC PyTorch container, a
# cluster's conda or module environment) without replacing its torch, CUDA libraries,
# Transformer Engine or NVIDIA apex.
#   bash scripts/install_into_env.sh [dev]          # PYTHON=python3 by default
#   PYTHON=/opt/conda/bin/python bash scripts/install_into_env.sh
# Everything else is pinned to constraints.txt (the versions the tests passed with); the
# environment's torch, triton, nvidia-*/cuda-* wheels, transformer-engine*, apex and flash-attn
# are pinned to what it already has (scripts/install_plan.py constraints), so pip keeps them or
# stops with a conflict instead of swapping them. Extra pip arguments: PIP_ARGS="...".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extra=""
if [ "${1:-}" = "dev" ]; then
  extra="[dev]"
fi
die() { echo "install_into_env.sh: $*" >&2; exit 1; }

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))' ||
  die "$python is Python $("$python" -c 'import platform; print(platform.python_version())'); megatron-core 0.19 needs >= 3.12"
torch_before=$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null) ||
  die "$python has no torch: this installs next to an existing CUDA PyTorch; for a fresh environment run bash scripts/setup_venv.sh"

pins=$(mktemp "${TMPDIR:-/tmp}/dirmoe_pins.XXXXXX")
trap 'rm -f "$pins"' EXIT
"$python" scripts/install_plan.py constraints --python "$python" > "$pins"
kept=$(grep -cE '^(torch|triton|nvidia-|cuda-|transformer-engine|apex|flash-attn)' "$pins" || true)
echo "install_into_env.sh: keeping $kept CUDA-stack packages of $python as they are (torch $torch_before)"
read -r -a pip_args <<<"${PIP_ARGS:-}"
"$python" -m pip install --quiet "${pip_args[@]}" -c "$pins" -e ".${extra}"

torch_after=$("$python" -c 'import torch; print(torch.__version__)')
[ "$torch_after" = "$torch_before" ] || die "torch changed from $torch_before to $torch_after"
"$python" - <<'PY'
import importlib.util

import megatron.core
import torch

import megatron_dirmoe

te = importlib.util.find_spec("transformer_engine") is not None
apex = importlib.util.find_spec("apex") is not None
print(f"megatron-core {megatron.core.__version__} | megatron_dirmoe {megatron_dirmoe.__version__} "
      f"| torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"{'GPU' if torch.cuda.is_available() else 'no GPU visible'}) | Transformer Engine "
      f"{'yes' if te else 'no'} | apex {'yes' if apex else 'no'}")
PY
