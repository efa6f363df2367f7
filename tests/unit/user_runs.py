"""Running the package's commands the way a user does (a fresh process, the venv's scripts on PATH),
for the tests of the README, the examples and the start-up (the shared run is the
`tiny_preset_run` fixture of tests/unit/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: dirmoe-pretrain, dirmoe-preprocess, python
TINY_ITERS = 3


def tiny_overrides(work: Path) -> list[str]:
    """Appended to a training command from the README (the last value of a flag wins): a few
    iterations, everything written under `work`, TensorBoard logs with per-layer values."""
    return ["--train-iters", str(TINY_ITERS), "--eval-interval", str(TINY_ITERS),
            "--eval-iters", "1", "--log-interval", "1",
            "--save", str(work / "ckpt"), "--load", str(work / "ckpt"),
            "--tensorboard-dir", str(work / "tb"), "--moe-per-layer-logging"]


def user_env() -> dict:
    """The environment of a user's shell: the venv's scripts on PATH, no test-only settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DIRMOE_STARTUP_WARNINGS", "PYTHONWARNINGS", "RANK", "WORLD_SIZE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class PretrainRun:
    argv: list[str]  # the user's arguments, before tiny_overrides
    work: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def tensorboard_dir(self) -> Path:
        return self.work / "tb"

    @property
    def checkpoint_dir(self) -> Path:
        return self.work / "ckpt"


def run_pretrain(argv: list[str], work: Path, timeout: int = 300) -> PretrainRun:
    """`dirmoe-pretrain <argv> <tiny overrides>` in a fresh process (the console script)."""
    exe = BIN / "dirmoe-pretrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "megatron_dirmoe.pretrain"]
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([*cmd, *argv, *tiny_overrides(work)], cwd=work, env=user_env(),
                          capture_output=True, text=True, timeout=timeout)
    return PretrainRun(list(argv), work, done.returncode, done.stdout, done.stderr)
