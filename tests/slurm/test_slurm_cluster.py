"""The shipped sbatch scripts through a real Slurm (a private single-node cluster on localhost).

* `sbatch --test-only` accepts every script's #SBATCH header (multi-node ones against the
  cluster's powered-down cloud nodes).
* End to end with the tiny CPU preset through ``slurm/small.sh``: the first submission trains,
  gets the deadline signal (what ``#SBATCH --signal=B:USR1@600`` sends) *between* two periodic
  checkpoints, finishes its step, checkpoints it and stops; a second submission resumes at
  exactly that iteration, is signalled again between checkpoints, requeues itself with
  ``scontrol requeue``, resumes at the signalled iteration and finishes. No step is lost or
  trained twice.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from slurm_paths import REPO, SCRIPTS

pytestmark = pytest.mark.slurm

# Long enough that a signal always lands before the end, even on an idle machine (~0.05 s per
# iteration there); periodic checkpoints far enough apart that it lands between two of them.
TRAIN_ITERS = 60
SAVE_INTERVAL = 40
# A model small enough that an iteration takes well under a second on a CI core.
TINY_OVERRIDES = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 2 --ffn-hidden-size 128 "
    "--moe-ffn-hidden-size 128 --seq-length 64 --max-position-embeddings 64 "
    "--micro-batch-size 4 --global-batch-size 4"
)
ITERATION = re.compile(r"^ iteration\s+(\d+)/\s*(\d+) \| lm loss ([0-9.]+)", re.M)
JOB_TIMEOUT = 900  # seconds; a loaded 2-core machine is slow to import torch and Megatron


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_test_only_accepts_header(slurm_cluster, script):
    res = slurm_cluster.run(
        "sbatch", "--test-only", f"--partition={slurm_cluster.multinode_partition}",
        f"slurm/{script}", cwd=REPO, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "to start at" in res.stderr


# ---------------------------------------------------------------------- helpers
def _job_field(cluster, job: str, field: str) -> str:
    out = cluster.run("scontrol", "show", "job", job).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    assert match, out
    return match.group(1)


def _wait(predicate, what: str, cluster, timeout: float = JOB_TIMEOUT, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}\n{cluster.logs()}")


def _finished(cluster, job: str, out: Path) -> str:
    def done():
        state = _job_field(cluster, job, "JobState")
        return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    state = _wait(done, f"job {job} to finish", cluster)
    assert state == "COMPLETED", (
        f"job {job}: {state}\n{out.read_text() if out.exists() else ''}\n"
        + cluster.run("scontrol", "show", "job", job).stdout + cluster.logs())
    return out.read_text()


def _signal_after_iteration(cluster, job: str, out: Path, after: int) -> None:
    """Send the deadline signal once the job has logged an iteration past ``after``."""
    def trained():
        return any(int(n) > after for n, _, _ in ITERATION.findall(
            out.read_text() if out.exists() else ""))

    _wait(trained, f"job {job} to train past iteration {after}", cluster, poll=0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", job)


def _latest(checkpoints: Path) -> int:
    return int((checkpoints / "latest_checkpointed_iteration.txt").read_text().strip())


def _losses(text: str) -> dict[int, float]:
    return {int(it): float(loss) for it, _, loss in ITERATION.findall(text)}


# ---------------------------------------------------------------------- end to end
def test_tiny_job_trains_checkpoints_resumes_and_requeues(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    checkpoints = tmp_path / "run" / "checkpoints"
    env = dict(
        cluster.env, DEVICE="cpu", PRESET="tiny", PYTHON=sys.executable,
        RUN_DIR=str(tmp_path / "run"), TRAIN_ITERS=str(TRAIN_ITERS),
        SAVE_INTERVAL=str(SAVE_INTERVAL), LOG_INTERVAL="1", EVAL_INTERVAL="1000",
        EXTRA_ARGS=TINY_OVERRIDES,
    )

    def submit(out: Path, **overrides) -> str:
        # Relative script path and a trailing pretrain flag, as users submit.
        res = cluster.run("sbatch", "--parsable", f"--output={out}", "slurm/small.sh",
                          "--eval-iters", "1", cwd=REPO, env=dict(env, **overrides))
        return res.stdout.strip().split(";")[0]

    # 1. Train a few steps, then the deadline signal between two periodic checkpoints: the
    # ranks finish the step, checkpoint it and stop.
    out_a = tmp_path / "first.out"
    job_a = submit(out_a, REQUEUE="0")
    _signal_after_iteration(cluster, job_a, out_a, after=2)
    text_a = _finished(cluster, job_a, out_a)
    losses_a = _losses(text_a)
    stop_a = _latest(checkpoints)
    assert "none yet: starts from scratch" in text_a
    assert "got SIGUSR1" in text_a and "REQUEUE=0: resubmit to resume" in text_a
    assert 2 < stop_a < SAVE_INTERVAL, "the signal did not land between two checkpoints"
    assert f"exiting at iteration {stop_a} (received" in text_a
    assert (checkpoints / f"iter_{stop_a:07d}").is_dir()
    assert sorted(losses_a) == list(range(1, stop_a + 1))  # the last step trained is saved
    first = losses_a[1]
    assert losses_a[stop_a] < first, f"loss did not fall: {losses_a}"

    # 2. Submit again: resumes at the signalled iteration. Signal it once more, again between
    # checkpoints; it requeues itself.
    out_b = tmp_path / "second.out"
    job_b = submit(out_b)
    _signal_after_iteration(cluster, job_b, out_b, after=stop_a + 2)

    def requeued():
        state = _job_field(cluster, job_b, "JobState")
        assert state not in ("COMPLETED", "FAILED"), (
            f"job {job_b} ended without requeueing:\n{out_b.read_text()}\n"
            + cluster.run("scontrol", "show", "job", job_b).stdout + cluster.logs())
        return _job_field(cluster, job_b, "Restarts") == "1" and state == "PENDING"

    _wait(requeued, f"job {job_b} to requeue itself", cluster)
    # Slurm holds a requeued job (~2 minutes) before it is eligible again. Releasing it early
    # with StartTime=now before the controller has logged the first run's batch step as ended
    # let that late completion mark the new run FAILED (measured, 2 of ~10 runs); waiting for
    # the log line in practice waits out most of the hold (this test takes ~2.5-3 min).
    ctld_log = cluster.log_dir / "slurmctld.log"
    _wait(lambda: f"_job_complete: JobId={job_b} " in ctld_log.read_text(),
          "the first run's batch step to end", cluster)
    _wait(cluster.node_idle, "the node to be idle", cluster)
    cluster.run("scontrol", "update", f"JobId={job_b}", "StartTime=now", check=False)
    text_b = _finished(cluster, job_b, out_b)

    run1, run2 = re.split(r"^\[dirmoe-slurm\] script: .*restart 1\)$", text_b, flags=re.M)
    assert f"resumes from iteration {stop_a}" in run1
    assert re.search(rf"\[dirmoe\] resumed from \S+ at iteration {stop_a}\b", run1)
    losses_b1 = _losses(run1)
    stop_b = max(losses_b1)
    # Continues exactly where the first job stopped, with trained weights, and checkpoints the
    # step it was signalled in.
    assert sorted(losses_b1) == list(range(stop_a + 1, stop_b + 1))
    assert losses_b1[stop_a + 1] < first
    assert "got SIGUSR1" in run1 and f"requeueing job {job_b}" in run1
    assert f"exiting at iteration {stop_b} (received" in run1
    assert stop_a + 2 < stop_b < TRAIN_ITERS

    assert f"resumes from iteration {stop_b}" in run2
    assert re.search(rf"\[dirmoe\] resumed from \S+ at iteration {stop_b}\b", run2)
    losses_b2 = _losses(run2)
    assert sorted(losses_b2) == list(range(stop_b + 1, TRAIN_ITERS + 1))  # none lost or redone
    assert losses_b2[TRAIN_ITERS] < first - 0.5, "loss did not fall over the three runs"
    assert f"done: {TRAIN_ITERS} iterations trained" in run2
    assert _latest(checkpoints) == TRAIN_ITERS
    assert (checkpoints / f"iter_{TRAIN_ITERS:07d}").is_dir()
