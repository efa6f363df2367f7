"""The Slurm scripts' launch logic on two nodes, without a cluster: the Slurm environment of a
two-node allocation is faked around the batch script, and a stand-in `srun` starts each node's
tasks as a separate local launch (one process group per node, with that node's SLURM_NODEID,
SLURM_LOCALID, SLURM_PROCID, SLURMD_NODENAME), as slurmstepd does on each node.

Every rank gets its torch.distributed rank, world size and rendezvous (MASTER_ADDR = the first
host of the node list, MASTER_PORT from the job id) from the script alone, and the ranks meet in
one gloo world: an all-gather across the two "nodes" proves it. In place of training, each rank
runs a probe (the script's PYTHON) that reads exactly the arguments a rank of the job gets; rank
0 also puts them through the entry point's own start-up parse at the job's world size.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from slurm_paths import REPO, SLURM_DIR

# srun as Slurm runs a step over an allocation: `--nodes` x `--ntasks-per-node` tasks, one local
# launch per node (each a process that starts its node's tasks), Slurm's task variables set.
FAKE_SRUN = r'''#!PYTHON
import os, subprocess, sys
args = sys.argv[1:]
opts = {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
hosts = os.environ["FAKE_SLURM_HOSTS"].split()
if os.environ.get("FAKE_SRUN_NODE") is None:  # the step: one launch per node
    launches = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:]],
                                 env=dict(os.environ, FAKE_SRUN_NODE=str(n)))
                for n in range(nodes)]
    sys.exit(max(p.wait() for p in launches))
node = int(os.environ.pop("FAKE_SRUN_NODE"))  # slurmstepd on this node: its tasks
tasks = []
for local in range(per_node):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURMD_NODENAME=hosts[node],
               SLURM_LOCALID=str(local), SLURM_PROCID=str(node * per_node + local),
               SLURM_NTASKS=str(nodes * per_node), SLURM_STEP_NUM_TASKS=str(nodes * per_node),
               SLURM_STEP_NUM_NODES=str(nodes))
    tasks.append(subprocess.Popen(args, env=env))
sys.exit(max(t.wait() for t in tasks))
'''

FAKE_SCONTROL = r'''#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") for h in $FAKE_SLURM_HOSTS; do echo "$h"; done ;;
  "show job") echo "   Command=$FAKE_SLURM_SCRIPT" ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
'''

# What each rank runs in place of `python -m megatron_dirmoe.pretrain ARGS`.
PROBE = r'''#!PYTHON
import json, os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
assert sys.argv[1:3] == ["-m", "megatron_dirmoe.pretrain"], sys.argv
argv = sys.argv[3:]
dist.init_process_group("gloo", timeout=timedelta(minutes=2))  # env:// as megatron.training
me = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                     "MASTER_PORT", "SLURM_NODEID", "SLURMD_NODENAME")}
me["dist_rank"], me["dist_world"] = dist.get_rank(), dist.get_world_size()
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, me)
if dist.get_rank() == 0:
    from megatron_dirmoe.training.arguments import parse_pretrain_args
    args = parse_pretrain_args(argv, validate=False, this_machine=False,
                               world_size=dist.get_world_size())
    save = argv[argv.index("--save") + 1]
    with open(os.environ["FAKE_PROBE_OUT"], "w") as f:
        json.dump({"ranks": everyone, "argv": argv, "dp": dist.get_world_size() // (
            args.tensor_model_parallel_size * args.pipeline_model_parallel_size),
            "ep": args.expert_model_parallel_size, "train_iters": args.train_iters}, f)
    # Stand in for a finished run, so the batch script reports success.
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{args.train_iters}\n")
dist.barrier()
dist.destroy_process_group()
'''


def _write(path: Path, text: str) -> Path:
    path.write_text(text.replace("#!PYTHON", f"#!{sys.executable}"))
    path.chmod(0o755)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_rendezvous_from_the_slurm_environment(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write(bin_dir / "srun", FAKE_SRUN)
    _write(bin_dir / "scontrol", FAKE_SCONTROL)
    _write(bin_dir / "squeue", "#!/bin/sh\necho 2:00:00\n")  # time left in the allocation
    probe = _write(tmp_path / "rank_python", PROBE)
    port = _free_port()
    while not 20000 <= port < 40000:  # the scripts derive MASTER_PORT = 20000 + job id % 20000
        port = _free_port()
    job_id = 100000 + port - 20000
    out = tmp_path / "probe.json"
    script = SLURM_DIR / "medium.sh"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MASTER_", "RANK", "WORLD_SIZE",
                                "LOCAL_RANK"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(REPO),
        # The allocation: 2 nodes x 2 tasks (one per GPU), as sbatch sets it on the batch host.
        SLURM_JOB_ID=str(job_id), SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="node[1-2]",
        SLURM_SUBMIT_DIR=str(REPO), FAKE_SLURM_HOSTS="127.0.0.1 127.0.0.2",
        FAKE_SLURM_SCRIPT=str(script), FAKE_PROBE_OUT=str(out),
        # The job: medium.sh's model on this 4-rank world (TP 1, EP 2 -> DP 4), few steps.
        TP="1", EP="2", TRAIN_ITERS="5", GLOBAL_BATCH_SIZE="64", MICRO_BATCH_SIZE="4",
        RUN_ROOT=str(tmp_path / "runs"), PYTHON=str(probe), CHECK_PYTHON=sys.executable,
        REQUEUE="0",
    )
    res = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world: 2 node(s) x 2 GPU(s) = 4 rank(s)" in res.stdout
    assert "done: 5 iterations trained" in res.stdout

    probe_out = json.loads(out.read_text())
    ranks = sorted(probe_out["ranks"], key=lambda r: r["dist_rank"])
    assert [r["dist_rank"] for r in ranks] == [0, 1, 2, 3]
    for r in ranks:  # every rank: one world, rendezvous at the first node, ranks from Slurm
        assert r["dist_world"] == 4 and r["WORLD_SIZE"] == "4"
        assert r["RANK"] == str(r["dist_rank"])
        assert r["MASTER_ADDR"] == "127.0.0.1" and r["MASTER_PORT"] == str(port)
        node, local = divmod(r["dist_rank"], 2)
        assert (r["SLURM_NODEID"], r["LOCAL_RANK"]) == (str(node), str(local))
        assert r["SLURMD_NODENAME"] == ("127.0.0.1", "127.0.0.2")[node]
    assert probe_out["dp"] == 4 and probe_out["ep"] == 2 and probe_out["train_iters"] == 5
    argv = probe_out["argv"]
    assert argv[argv.index("--dirmoe-device") + 1] == "cuda"
    assert "--exit-duration-in-mins" in argv  # from the fake allocation's time left
