"""Who trains, and on what: the launcher environment and the CUDA check at start-up.

Every way of starting `dirmoe-pretrain` either works or stops with one message that names the
flag and the fix:

* **No launcher** (``WORLD_SIZE`` unset) on a GPU: one process on ``cuda:LOCAL_RANK`` (0).
  `megatron.training` initialises ``torch.distributed`` with the ``env://`` rendezvous, which
  needs ``MASTER_ADDR``/``MASTER_PORT``; :func:`single_process_rendezvous` sets them (and
  ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``) when no launcher did, as ``torchrun --standalone``
  would for one process.
* **A launcher** (``torchrun``, ``srun`` through ``slurm/*.sh``; ``WORLD_SIZE`` > 1) on a machine
  where CUDA is not usable: every rank would run the one-process CPU loop on its own and write
  the same checkpoint. :func:`check_device_for_world` stops instead, naming ``--dirmoe-device``
  and what is wrong with CUDA (:func:`cuda_problem`: a CPU-only torch, no driver, a driver older
  than the CUDA this torch was built for, hidden devices).
* **srun without the rank variables** (``srun -n 8 dirmoe-pretrain ...``): N tasks that do not
  know of each other; stopped the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from typing import MutableMapping, Optional

__all__ = [
    "LaunchError",
    "cuda_problem",
    "driver_cuda_version",
    "check_device_for_world",
    "single_process_rendezvous",
]


class LaunchError(ValueError):
    """A launch that cannot train as asked (names the flag or variable to change)."""


def driver_cuda_version(nvidia_smi: Optional[str] = None) -> Optional[tuple[int, int]]:
    """The newest CUDA version the installed NVIDIA driver supports, from ``nvidia-smi``'s
    header (``CUDA Version: 12.4``); None without a driver or ``nvidia-smi``."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        text = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_problem() -> Optional[str]:
    """Why CUDA is not usable in this process, in words; None when it is."""
    import warnings

    import torch

    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build "
                "(README: Install on a GPU cluster)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if available:
        return None
    built = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
    reasons = [f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        reasons.append(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    driver = driver_cuda_version()
    if driver is not None and driver < built:
        reasons.append(
            f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]} only: install a torch "
            f"built for CUDA <= {driver[0]}.{driver[1]} (bash scripts/setup_venv.sh picks one "
            "by driver) or update the driver")
    elif driver is None and not os.path.exists("/proc/driver/nvidia/version"):
        reasons.append("no NVIDIA driver found (no nvidia-smi, no /proc/driver/nvidia)")
    reasons += [str(w.message).strip() for w in caught if "CUDA" in str(w.message)]
    return "; ".join(reasons)


def check_device_for_world(device: str, use_cuda: bool, world_size: int,
                           environ: Optional[MutableMapping[str, str]] = None,
                           problem: Optional[str] = None) -> None:
    """Raise `LaunchError` when the processes the launcher started cannot train as one job on
    the device ``--dirmoe-device`` resolves to (``use_cuda``). ``problem`` is
    :func:`cuda_problem` (computed here when None and needed)."""
    env = os.environ if environ is None else environ
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "WORLD_SIZE" not in env and step_tasks > 1:
        raise LaunchError(
            f"srun started {step_tasks} tasks but WORLD_SIZE/RANK are not set, so each would "
            "train alone: launch through slurm/*.sh (sbatch), or export RANK=$SLURM_PROCID "
            "LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS MASTER_ADDR=<first node> "
            "MASTER_PORT=<port> in each task, or use torchrun")
    if use_cuda:
        if device == "cuda":
            problem = problem if problem is not None else cuda_problem()
            if problem:
                raise LaunchError(f"--dirmoe-device cuda, but CUDA is not usable here: {problem}")
        return
    if world_size > 1:
        if device == "cpu":
            raise LaunchError(
                f"--dirmoe-device cpu trains in one process, but the launcher started "
                f"WORLD_SIZE={world_size}: start one process (no torchrun/srun -n), or train "
                "on GPUs with --dirmoe-device cuda")
        problem = problem if problem is not None else cuda_problem()
        raise LaunchError(
            f"a launcher started WORLD_SIZE={world_size} processes, but CUDA is not usable "
            f"here ({problem}); with --dirmoe-device auto each of them would train alone on "
            "CPU. Fix CUDA and pass --dirmoe-device cuda (the Slurm scripts do), or run a "
            "single process with --dirmoe-device cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_rendezvous(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """When no launcher set ``WORLD_SIZE``, make this process a world of one: ``RANK=0``,
    ``LOCAL_RANK=0``, ``WORLD_SIZE=1``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``
    (values already in the environment are kept). Returns whether it set anything."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return False
    env.setdefault("RANK", "0")
    env.setdefault("LOCAL_RANK", "0")
    env["WORLD_SIZE"] = "1"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return True
