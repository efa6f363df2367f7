"""`python -m megatron_dirmoe.pretrain` on CPU: end to end on the embedded corpus (falling loss,
routing metrics, a checkpoint in megatron.training's layout that loads back), and exact resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "128", "--num-experts", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "4", "--global-batch-size", "8",  # 2 micro-batches per step
    "--lr", "3e-3", "--min-lr", "3e-4", "--log-interval", "5",
    "--dirmoe-device", "cpu", "--dirmoe-target-k", "1",
]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embedded_corpus"))


def run(tmp, data_cache, *extra):
    from megatron_dirmoe.pretrain import main

    ckpt = str(tmp)
    return main([*TINY, "--save", ckpt, "--load", ckpt, "--dirmoe-data-cache", data_cache,
                 *extra])


def test_cpu_run_end_to_end(tmp_path, data_cache, capsys):
    from megatron.core import dist_checkpointing

    from megatron_dirmoe.training.builders import build_model_from_args
    from megatron_dirmoe.training.checkpointing import checkpoint_dir, latest_iteration

    iters = 40
    result = run(tmp_path, data_cache, "--train-iters", str(iters), "--eval-interval", "20",
                 "--eval-iters", "2", "--save-interval", "20")
    losses = [result.losses[i] for i in range(1, iters + 1)]
    assert all(map(lambda x: torch.isfinite(torch.tensor(x)), losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 7.5  # ~ln(4096) at initialisation
    assert last < first - 1.0, (first, last)
    assert set(result.valid_losses) == {20, 40}
    assert result.valid_losses[40] < result.valid_losses[20] < first

    # Routing summary: both MoE layers, the realised k within 10% of the target (k = 1; 1.00
    # measured), routed as the deterministic path would (train = eval), tau annealed.
    assert [row["layer"] for row in result.routing] == [1, 2]
    for row in result.routing:
        assert row["active_experts"] == pytest.approx(1.0, rel=0.1)
        assert row["eval_active_experts"] == pytest.approx(row["active_experts"])
        assert row["tau"] == pytest.approx(0.3, abs=0.01)  # last step: t = T - 1
    out = capsys.readouterr().out
    assert "tokens/s" in out and "ETA" in out and "dirmoe/active_experts" in out
    assert "final validation loss" in out and "routing summary" in out

    # Megatron's layout; the common state carries the args (incl. dirmoe) and the iteration.
    assert latest_iteration(tmp_path) == iters
    ckpt = checkpoint_dir(tmp_path, iters)
    assert ckpt.name == "iter_0000040" and (tmp_path / "iter_0000020").is_dir()
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    assert common["iteration"] == iters and common["checkpoint_version"] == 3.0
    args = common["args"]
    assert args.dirmoe_config["target_k"] == 1 and args.dirmoe_target_k == 1
    assert args.num_experts == 4 and args.padded_vocab_size == 4096

    # The model tensors load into a fresh model built from the saved args.
    fresh = build_model_from_args(args)
    state = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, str(ckpt))
    fresh.load_state_dict(state["model"])
    trained = result.model.state_dict()
    for name, tensor in fresh.state_dict().items():
        if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state"):
            torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    assert any("router.spike_bias" in name for name in trained)


def test_resume_equivalence(tmp_path, data_cache, capsys):
    """N steps straight == N/2 steps, stop, rerun the same command (resumes) for N/2 more; a
    third rerun has nothing left to train and says so instead of printing an empty summary."""
    n = 8
    common = ["--train-iters", str(n), "--eval-interval", "100", "--eval-iters", "1",
              "--save-interval", "100"]
    straight = run(tmp_path / "straight", data_cache, *common)
    first = run(tmp_path / "resumed", data_cache, *common, "--exit-interval", str(n // 2))
    assert first.iteration == n // 2 and sorted(first.losses) == list(range(1, n // 2 + 1))
    second = run(tmp_path / "resumed", data_cache, *common)
    assert sorted(second.losses) == list(range(n // 2 + 1, n + 1))
    resumed = {**first.losses, **second.losses}
    for it in range(1, n + 1):
        assert resumed[it] == pytest.approx(straight.losses[it], abs=1e-6, rel=0), it
    # Same final weights too.
    for (name, a), b in zip(straight.model.state_dict().items(),
                            second.model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    capsys.readouterr()
    third = run(tmp_path / "resumed", data_cache, *common)
    assert third.iteration == n and third.losses == {} and third.routing == []
    out = capsys.readouterr().out
    assert f"nothing to train: the checkpoint is at iteration {n} of --train-iters {n}" in out
    assert "routing summary (target k" not in out


def test_resume_with_a_changed_schedule_names_the_flags(tmp_path, data_cache):
    """A rerun whose LR schedule differs from the checkpoint's fails with a clear message."""
    # The router schedules keep their horizon: only the LR schedule changes.
    common = ["--eval-interval", "100", "--eval-iters", "1", "--save-interval", "100",
              "--lr-warmup-fraction", "0.5", "--dirmoe-schedule-iters", "2"]
    run(tmp_path, data_cache, "--train-iters", "2", *common)
    with pytest.raises(ValueError, match="--override-opt_param-scheduler"):
        run(tmp_path, data_cache, "--train-iters", "4", *common)


def test_resume_with_changed_router_settings_names_the_flags(tmp_path, data_cache):
    """A rerun with different DirMoE settings or schedule horizon stops before training and
    names the flags; --dirmoe-allow-config-change continues with the new settings."""
    common = ["--train-iters", "2", "--eval-interval", "100", "--eval-iters", "1",
              "--save-interval", "100"]
    run(tmp_path, data_cache, *common)
    with pytest.raises(ValueError, match=r"--dirmoe-count-weight 0\.1 -> 0\.3"):
        run(tmp_path, data_cache, *common, "--dirmoe-count-weight", "0.3")
    with pytest.raises(ValueError, match=r"--dirmoe-schedule-iters 2 -> 5"):
        run(tmp_path, data_cache, *common, "--dirmoe-schedule-iters", "5")
    with pytest.raises(ValueError, match=r"--dirmoe-recipe 'calibrated' -> 'paper'"):
        run(tmp_path, data_cache, *common, "--dirmoe-recipe", "paper")
    # Speed-only settings may change.
    run(tmp_path, data_cache, *common, "--dirmoe-no-torch-compile")
    resumed = run(tmp_path, data_cache, "--train-iters", "3", "--eval-interval", "100",
                  "--eval-iters", "1", "--save-interval", "100",
                  "--dirmoe-schedule-iters", "2", "--dirmoe-count-weight", "0.3",
                  "--dirmoe-allow-config-change", "--override-opt_param-scheduler")
    assert sorted(resumed.losses) == [3]


def test_resume_check_treats_checkpoints_without_a_recipe_as_the_paper_recipe():
    from megatron_dirmoe.training.checkpointing import dirmoe_config_changes

    older = {"target_k": 1, "tau_start": 2.0, "torch_compile": True}  # written before `recipe`
    assert dirmoe_config_changes(older, {"target_k": 1, "tau_start": 2.0, "recipe": "paper",
                                         "torch_compile": False}) == []
    assert dirmoe_config_changes(older, {"target_k": 2, "tau_start": 2.0,
                                         "recipe": "calibrated", "count_weight": 0.1}) == [
        "--dirmoe-target-k 1 -> 2", "--dirmoe-recipe 'paper' -> 'calibrated'"]


def test_console_script_exits_zero_on_success(tmp_path, data_cache):
    """`dirmoe-pretrain` (pyproject's console script) must exit 0 after a successful run, so
    `&&` chains and batch schedulers see success."""
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "import sys; from megatron_dirmoe.pretrain import cli; "
           "sys.exit(cli())", *TINY, "--train-iters", "2", "--eval-iters", "0",
           "--save-interval", "2", "--save", str(tmp_path), "--load", str(tmp_path),
           "--dirmoe-data-cache", data_cache]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TrainResult(" not in done.stdout + done.stderr


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, data_cache):
    """With --exit-signal-handler a SIGTERM mid-run (between periodic checkpoints) ends the
    current step, saves it and exits 0, as megatron.training does: nothing since the last
    periodic checkpoint is lost."""
    import re
    import signal
    import subprocess
    import sys

    from megatron_dirmoe.training.checkpointing import latest_iteration

    cmd = [sys.executable, "-m", "megatron_dirmoe.pretrain", *TINY, "--train-iters", "500",
           "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
           "--save-interval", "1000", "--save", str(tmp_path), "--load", str(tmp_path),
           "--dirmoe-data-cache", data_cache]
    cmd += ["--exit-signal-handler"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            step = re.search(r"iteration\s+(\d+)/500", line)
            if step and int(step.group(1)) >= 3:
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    out = "".join(lines) + (rest or "")
    assert proc.returncode == 0, out[-3000:]
    stopped = re.search(r"exiting at iteration (\d+) \(received", out)
    assert stopped, out[-3000:]
    iteration = int(stopped.group(1))
    assert 3 <= iteration < 500
    assert latest_iteration(tmp_path) == iteration  # saved at the step where it stopped


def test_exit_reasons_follow_megatron_flags():
    import argparse
    import time

    from megatron_dirmoe.training.cpu_loop import _exit_reason

    args = argparse.Namespace(exit_interval=None, exit_signal_handler=False,
                              exit_duration_in_mins=None)
    assert _exit_reason(args, 7, time.time()) is None
    args.exit_interval = 7
    assert _exit_reason(args, 7, time.time()) == "--exit-interval"
    args.exit_interval, args.exit_duration_in_mins = None, 2
    assert _exit_reason(args, 7, time.time() - 60) is None
    assert _exit_reason(args, 7, time.time() - 121) == "--exit-duration-in-mins 2"


def test_release_checkpoint_loads_like_megatron_training(tmp_path, data_cache, capsys):
    """A tracker that says `release` (a released model in <save>/release) made start-up raise;
    megatron.training loads its weights and starts at iteration 0 with a fresh optimizer."""
    from megatron_dirmoe.training.checkpointing import (latest_checkpoint_dir,
                                                        read_checkpoint_args, read_tracker,
                                                        tracker_file)

    first = run(tmp_path, data_cache, "--train-iters", "2", "--save-interval", "2")
    (tmp_path / "iter_0000002").rename(tmp_path / "release")
    tracker_file(tmp_path).write_text("release\n")
    assert read_tracker(tmp_path) == (0, True)
    assert latest_checkpoint_dir(tmp_path) == tmp_path / "release"
    assert read_checkpoint_args(tmp_path).dirmoe_target_k == 1  # the CUDA path's resume check
    capsys.readouterr()
    other = tmp_path / "finetune"
    from megatron_dirmoe.pretrain import main

    second = main([*TINY, "--load", str(tmp_path), "--save", str(other), "--train-iters", "1",
                   "--dirmoe-data-cache", data_cache, "--save-interval", "1"])
    assert "loaded the release checkpoint" in capsys.readouterr().out
    assert list(second.losses) == [1]  # iteration 0 -> 1: a new run from the released weights
    assert second.losses[1] < first.losses[1] - 0.05  # ... which had trained for 2 steps


def test_resume_check_names_new_defaults_and_refuses_controllers_without_state():
    """A checkpoint written before the routing controllers and the sigmoid single weight: the
    new defaults are changes to name (older runs had no controller and the softmax share), and
    a controller whose state the checkpoint lacks stops the resume even when changes are
    allowed, with the flag that turns it off."""
    import types

    from megatron_dirmoe.config import DirMoEConfig
    from megatron_dirmoe.training.checkpointing import check_resume_config, dirmoe_config_changes

    older = {"recipe": "calibrated", "target_k": 1, "count_weight": 0.1, "balance_weight": 0.1,
             "renormalize": False, "slab_mean": "gate", "tau_schedule": "cosine"}
    now = dict(older, count_control_rate=0.03, load_control_rate=0.0,
               unnormalized_weight="sigmoid")
    assert dirmoe_config_changes(older, now) == [
        "--dirmoe-count-control-rate 0.0 -> 0.03",
        "--dirmoe-unnormalized-weight 'posterior-mean' -> 'sigmoid'"]
    # With renormalised weights (k >= 2) the single-weight setting has no effect: not a change.
    k2 = dict(older, target_k=2, renormalize=True, count_control_rate=0.03)
    assert dirmoe_config_changes(k2, dict(k2, unnormalized_weight="sigmoid")) == []

    def resume(saved, current, allow=False):
        check_resume_config(types.SimpleNamespace(dirmoe_config=saved),
                            types.SimpleNamespace(dirmoe_config=current,
                                                  dirmoe_allow_config_change=allow), "ckpt")

    new_k2 = dataclasses.asdict(DirMoEConfig(target_k=2, schedule_iters=10).calibrated_for(8))
    # A 32-expert k = 4 run from before the router's own aux loss resumes only when told to;
    # an 8-expert one sees no change there.
    fine_k4 = dataclasses.asdict(DirMoEConfig(target_k=4, schedule_iters=10).calibrated_for(32))
    assert {"--dirmoe-aux-loss-coeff 0.0 -> 0.03",
            "--dirmoe-aux-loss-scores 'gates' -> 'posterior-mean'",
            "--dirmoe-count-control-on 'routed' -> 'partial'",
            "--dirmoe-count-control-gain 0.0 -> 4.0"} <= set(
        dirmoe_config_changes(dict(k2, target_k=4), fine_k4))
    # A 32-expert k = 2 run from before the aux loss reached k = 2 (step 11) names both.
    fine_k2 = dataclasses.asdict(DirMoEConfig(target_k=2, schedule_iters=10).calibrated_for(32))
    assert {"--dirmoe-aux-loss-coeff 0.0 -> 0.03",
            "--dirmoe-load-control-rate 0.03 -> 0.01"} <= set(dirmoe_config_changes(
                dict(fine_k2, aux_loss_coeff=0.0, load_control_rate=0.03,
                     count_control_on="routed", count_control_gain=0.0), fine_k2))
    # One from the release that counted a fallback token 0 and stepped c by the sign rule.
    gates_k4 = dict(fine_k4, count_control_on="gates")
    del gates_k4["count_control_gain"]
    assert {c for c in dirmoe_config_changes(gates_k4, fine_k4) if "count-control" in c} == {
        "--dirmoe-count-control-on 'gates' -> 'partial'", "--dirmoe-count-control-gain 0.0 -> 4.0"}
    small_k2 = dataclasses.asdict(DirMoEConfig(target_k=2, schedule_iters=10).calibrated_for(8))
    assert not [c for c in dirmoe_config_changes(k2, small_k2)
                if "aux-loss-coeff" in c or "count-control-on" in c]
    # The scores' new default is a change only where an aux loss reads them.
    assert "--dirmoe-aux-loss-scores 'gates' -> 'posterior-mean'" in dirmoe_config_changes(
        k2, small_k2)
    assert not [c for c in dirmoe_config_changes(k2, small_k2, scores_read=False)
                if "aux-loss-scores" in c]
    with pytest.raises(ValueError, match="--dirmoe-load-control-rate 0"):
        resume(k2, new_k2, allow=True)
    with pytest.raises(ValueError, match="--dirmoe-count-control-rate 0"):
        resume(older, now, allow=True)
    resume(k2, dict(new_k2, load_control_rate=0.0, balance_weight=0.1, count_weight=0.1,
                    schedule_iters=None, tau_schedule="cosine"), allow=True)  # no new state
