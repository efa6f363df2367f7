"""Installing on GPU clusters: into an existing CUDA PyTorch environment (NGC container) the
torch that is there stays (scripts/install_into_env.sh), and a fresh venv gets a torch build its
driver can run (scripts/install_plan.py, used by scripts/setup_venv.sh)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import install_plan  # noqa: E402


def _fake_nvidia_smi(tmp_path: Path, cuda: str) -> str:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 999.99  Driver Version: 999.99  "
                   f"CUDA Version: {cuda}  |'\n")
    smi.chmod(0o755)
    return str(smi)


LOCK = ["numpy==2.5.5", "torch==2.14.1", "triton==3.8.0", "nvidia-cuda-runtime==13.0.96",
        "nvidia-cublas==13.1.1.3", "cuda-toolkit==13.0.3.0", "transformers==5.20.0"]


@pytest.mark.parametrize("driver, build", [
    ("13.0", None), ("13.2", None),       # the lock's CUDA 13.0 torch runs
    ("12.8", (12, 8)), ("12.9", (12, 9)),  # newest build the driver runs
    ("12.4", (12, 6)),                     # minor-version compatibility within CUDA 12
])
def test_torch_build_is_chosen_by_driver(tmp_path, driver, build):
    smi = _fake_nvidia_smi(tmp_path, driver)
    found = install_plan.torch_build_for(
        install_plan.driver_cuda_version(smi), install_plan.lock_cuda(LOCK))
    assert found == build
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "install_plan.py"),
                          "torch-index", "--nvidia-smi", smi], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ("" if build is None else f"https://download.pytorch.org/whl/cu{build[0]}{build[1]}")


def test_no_driver_keeps_the_lock_and_an_ancient_driver_stops(tmp_path):
    assert install_plan.torch_build_for(None, (13, 0)) is None  # CPU machine: lock as is
    with pytest.raises(SystemExit, match="supports CUDA 11.8"):
        install_plan.torch_build_for((11, 8), (13, 0))


def test_constraints_keep_the_environments_cuda_stack():
    installed = {"torch": "2.9.0a0+50eac811a6.nv25.10", "transformer-engine": "2.8.0",
                 "apex": "0.1", "numpy": "1.26.4", "triton": "3.4.0"}
    pins = install_plan.constraints_keeping(LOCK, installed)
    assert "numpy==2.5.5" in pins and "transformers==5.20.0" in pins  # the lock, elsewhere
    assert "torch==2.9.0a0+50eac811a6.nv25.10" in pins and "torch==2.14.1" not in pins
    assert "transformer-engine==2.8.0" in pins and "apex==0.1" in pins
    assert "triton==3.4.0" in pins
    assert not any(p.startswith(("nvidia-", "cuda-")) for p in pins)  # the lock's CUDA 13 wheels


def _other_patch(version: str) -> str:
    major, minor, patch = (int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", version).groups())
    return f"{major}.{minor}.{patch - 1 if patch else patch + 1}"


@pytest.mark.slow
def test_install_into_env_keeps_an_installed_torch_of_another_patch_version(tmp_path):
    """A venv that already has a torch at another patch version than the lock still has that
    torch after scripts/install_into_env.sh. The venv sees this test environment's packages
    (torch, megatron-core, ...) through a .pth file instead of copying gigabytes of CUDA wheels,
    and pip runs offline (--no-index), so nothing is downloaded; the lock is rewritten to pin the
    other patch version. The plain lock install (setup_venv.sh's) would replace that torch."""
    torch_version = importlib.metadata.version("torch")
    locked = _other_patch(torch_version)
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "megatron_dirmoe", repo / "megatron_dirmoe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "scripts").mkdir()
    for name in ("install_into_env.sh", "install_plan.py"):
        shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
    lock = (REPO / "constraints.txt").read_text()
    assert f"\ntorch==" in lock
    (repo / "constraints.txt").write_text(re.sub(r"\ntorch==\S+", f"\ntorch=={locked}", lock))

    venv = tmp_path / "env"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    env.update(PYTHON=str(python), PIP_ARGS="--no-index --no-build-isolation",
               PYTHONNOUSERSITE="1")

    def torch_in_env() -> str:
        return subprocess.run([python, "-c", "import importlib.metadata as m; "
                               "print(m.version('torch'))"], capture_output=True, text=True,
                              check=True, env=env).stdout.strip()

    assert torch_in_env() == torch_version != locked
    # What setup_venv.sh does (-c constraints.txt) would swap torch for the locked one: offline,
    # pip stops on it.
    naive = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-index",
                            "--no-build-isolation", "-c", "constraints.txt", "-e", "."],
                           cwd=repo, capture_output=True, text=True, env=env, timeout=600)
    assert naive.returncode != 0
    assert re.search(rf"torch\S*=={re.escape(locked)}", naive.stdout + naive.stderr)

    res = subprocess.run(["bash", "scripts/install_into_env.sh"], cwd=repo, capture_output=True,
                         text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert torch_in_env() == torch_version
    assert f"torch {torch_version}" in res.stdout and "megatron_dirmoe 0.1.0" in res.stdout
    # megatron_dirmoe is installed in the venv itself (editable, from the copy).
    where = subprocess.run([python, "-c", "import megatron_dirmoe; print(megatron_dirmoe.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True,
                           env=env).stdout.strip()
    assert where.startswith(str(repo))


def test_install_into_env_needs_a_torch(tmp_path):
    venv = tmp_path / "bare"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    res = subprocess.run(["bash", str(REPO / "scripts" / "install_into_env.sh")],
                         env={**os.environ, "PYTHON": str(venv / "bin" / "python")},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "has no torch" in res.stderr
    assert "scripts/setup_venv.sh" in res.stderr
