"""Every way to start `dirmoe-pretrain` trains or stops with a message naming the fix: one GPU
without a launcher gets a rendezvous; a launcher without usable CUDA never yields N silent
single-process CPU runs (megatron_dirmoe/training/world.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_STEP_NUM_TASKS")

BASE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--train-iters", "3", "--mock-data",
]


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# A process that believes it has one GPU. megatron.training.pretrain is replaced by what its
# _initialize_distributed does first on a fresh process: init_process_group with no store and no
# init_method, i.e. the env:// rendezvous (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE).
FAKE_ONE_GPU = r"""
import json, os, sys
from datetime import timedelta
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_name = lambda *a, **k: "Fake GPU"
import megatron.training.training as megatron_training

def pretrain(cfg, *args, **kwargs):
    from megatron.training import get_args
    a = get_args()
    torch.distributed.init_process_group(backend="gloo", world_size=a.world_size, rank=a.rank,
                                         timeout=timedelta(minutes=1))
    print("RESULT " + json.dumps({
        "world": torch.distributed.get_world_size(), "rank": torch.distributed.get_rank(),
        "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK",
                                               "LOCAL_RANK", "WORLD_SIZE")}}), flush=True)
    torch.distributed.destroy_process_group()

megatron_training.pretrain = pretrain
from megatron_dirmoe.pretrain import main
main(sys.argv[1:])
"""


def test_one_gpu_without_a_launcher_gets_a_rendezvous(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_ONE_GPU, *BASE, "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "128", "--dirmoe-no-torch-compile"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["world"] == 1 and result["rank"] == 0
    assert result["env"]["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(result["env"]["MASTER_PORT"]) < 65536
    assert (result["env"]["RANK"], result["env"]["LOCAL_RANK"], result["env"]["WORLD_SIZE"]) == (
        "0", "0", "1")
    assert "no launcher (WORLD_SIZE unset): one process on cuda:0" in proc.stdout


def test_rendezvous_keeps_what_a_launcher_or_user_set():
    from megatron_dirmoe.training.world import single_process_rendezvous

    env = {"MASTER_PORT": "29123"}
    assert single_process_rendezvous(env)
    assert env == {"MASTER_PORT": "29123", "MASTER_ADDR": "127.0.0.1", "RANK": "0",
                   "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    launched = {"WORLD_SIZE": "8", "RANK": "3"}
    assert not single_process_rendezvous(launched)
    assert launched == {"WORLD_SIZE": "8", "RANK": "3"}


def _parse(*extra):
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    return parse_pretrain_args([*BASE, *extra], validate=False)


def test_launcher_without_cuda_stops_naming_the_flag_and_cuda(no_launcher, capsys):
    """The measured failure: WORLD_SIZE=2 RANK=0 on a machine without usable CUDA trained (and
    checkpointed) as a one-process CPU run on every rank."""
    import torch

    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("RANK", "0")
    assert not torch.cuda.is_available()  # this test is for machines without a usable GPU
    with pytest.raises(SystemExit) as exc:
        _parse()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "--dirmoe-device" in err
    assert "CUDA is not usable" in err and f"torch {torch.__version__}" in err

    with pytest.raises(SystemExit):
        _parse("--dirmoe-device", "cpu")
    assert "--dirmoe-device cpu trains in one process" in capsys.readouterr().err


def test_cuda_requested_without_cuda_names_the_problem(no_launcher, capsys):
    with pytest.raises(SystemExit):
        _parse("--dirmoe-device", "cuda")
    err = capsys.readouterr().err
    assert "--dirmoe-device cuda, but CUDA is not usable here" in err


def test_one_process_on_cpu_still_trains_path(no_launcher):
    args = _parse("--dirmoe-device", "cpu")
    assert not args.dirmoe_use_cuda and args.world_size == 1
    no_launcher.setenv("WORLD_SIZE", "1")
    assert not _parse().dirmoe_use_cuda  # auto, one process: the CPU loop


def test_srun_tasks_without_rank_variables_stop(no_launcher, capsys):
    no_launcher.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(SystemExit):
        _parse("--dirmoe-device", "cpu")
    assert "srun started 4 tasks but WORLD_SIZE/RANK are not set" in capsys.readouterr().err


def test_driver_older_than_torch_cuda_is_named(tmp_path, monkeypatch):
    """A cluster driver older than the CUDA this torch was built for (the lock's torch is a
    CUDA 13 build): the message says which CUDA the driver supports."""
    import torch

    from megatron_dirmoe.training import world

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 550.54.15  Driver Version: 550.54.15  "
                   "CUDA Version: 12.4 |'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert world.driver_cuda_version() == (12, 4)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problem = world.cuda_problem()
    assert "built for CUDA 13.0" in problem
    assert "the NVIDIA driver supports CUDA 12.4 only" in problem
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in world.cuda_problem()
