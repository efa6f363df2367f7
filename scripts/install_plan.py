#!/usr/bin/env python3
"""Which torch build to install, and which pins to install with: the decisions behind
``scripts/setup_venv.sh`` and ``scripts/install_into_env.sh`` (standard library only: it runs
before anything is installed).

    python scripts/install_plan.py torch-index      # PyTorch index for this driver, or nothing
    python scripts/install_plan.py constraints --python ENV_PYTHON > pins.txt

``constraints.txt`` (the lock) pins torch with the CUDA runtime wheels it was frozen with
(nvidia-*, cuda-*, triton), which need a driver for that CUDA version. ``torch-index`` compares
the driver's CUDA version (``nvidia-smi``) with the lock's: when the driver is older it prints the
PyTorch wheel index of the newest CUDA build the driver runs. ``constraints`` prints the lock
without that CUDA stack, pinning instead whatever torch / CUDA wheels / Transformer Engine /
apex the target environment already has, so an install into it keeps them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dirmoe.training.world import driver_cuda_version  # noqa: E402  (stdlib only)

# CUDA builds PyTorch publishes wheels for; a driver runs builds of its major version up to its
# own minor version (and, by CUDA's minor-version compatibility, older minors).
TORCH_CUDA_BUILDS = ((12, 6), (12, 8), (12, 9), (13, 0))
TORCH_INDEX = "https://download.pytorch.org/whl/cu{major}{minor}"


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def is_cuda_stack(name: str) -> bool:
    """The packages a CUDA PyTorch environment brings, which an install must not replace:
    torch and its CUDA runtime wheels, Transformer Engine, NVIDIA apex, flash-attention."""
    name = name.lower().replace("_", "-")
    return (name in ("torch", "triton", "torchvision", "torchaudio", "apex", "pytorch-triton")
            or name.startswith(("nvidia-", "cuda-", "transformer-engine", "flash-attn")))


def read_lock(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def lock_cuda(lock: list[str]) -> Optional[tuple[int, int]]:
    """The CUDA version the locked torch runs on (from its runtime wheel), or None."""
    for line in lock:
        if _name(line) in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "cuda-toolkit"):
            match = re.search(r"==(\d+)\.(\d+)", line)
            if match:
                return int(match.group(1)), int(match.group(2))
    return None


def torch_build_for(driver: Optional[tuple[int, int]],
                    locked: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    """The CUDA build of torch to install instead of the lock's, or None to keep the lock's
    (no driver here, or one new enough). Raises `SystemExit` for drivers older than CUDA 12."""
    if driver is None or locked is None or driver >= locked:
        return None
    same_major = [b for b in TORCH_CUDA_BUILDS if b[0] == driver[0]]
    if not same_major:
        raise SystemExit(
            f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]}; PyTorch builds need "
            f"CUDA >= {TORCH_CUDA_BUILDS[0][0]}.{TORCH_CUDA_BUILDS[0][1]}: update the driver, or "
            "install into a container that matches it (scripts/install_into_env.sh)")
    fitting = [b for b in same_major if b <= driver]
    return max(fitting) if fitting else min(same_major)


def installed_versions(python: str) -> dict[str, str]:
    """{normalised name: version} of every distribution `python`'s environment has."""
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() "
            "if d.metadata['Name']}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.lower().replace("_", "-"): version for name, version in json.loads(out).items()}


def constraints_keeping(lock: list[str], installed: dict[str, str]) -> list[str]:
    """The lock without its CUDA stack, plus ``name==version`` for each CUDA-stack package the
    environment already has (so pip keeps it, or stops if something needs another one)."""
    kept = [f"{name}=={version}" for name, version in sorted(installed.items())
            if is_cuda_stack(name)]
    return [line for line in lock if not is_cuda_stack(_name(line))] + kept


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("torch-index", help="PyTorch index URL for this driver (empty: the "
                                               "lock's torch fits)")
    index.add_argument("--lock", type=Path, default=REPO / "constraints.txt")
    index.add_argument("--nvidia-smi", default=None, help="nvidia-smi to ask (default: PATH)")
    pins = sub.add_parser("constraints", help="the lock, keeping the environment's CUDA stack")
    pins.add_argument("--lock", type=Path, default=REPO / "constraints.txt")
    pins.add_argument("--python", default=sys.executable, help="the target environment")
    opts = parser.parse_args(argv)

    lock = read_lock(opts.lock)
    if opts.command == "torch-index":
        build = torch_build_for(driver_cuda_version(opts.nvidia_smi), lock_cuda(lock))
        print("" if build is None else TORCH_INDEX.format(major=build[0], minor=build[1]))
        return 0
    print("\n".join(constraints_keeping(lock, installed_versions(opts.python))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
