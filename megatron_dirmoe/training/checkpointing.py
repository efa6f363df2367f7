"""Checkpoints of the CPU loop, in the layout `megatron.training` writes with
``--ckpt-format torch_dist`` (its default), so one reader serves checkpoints from either path.

Layout (``<save>`` is ``--save``)::

    <save>/latest_checkpointed_iteration.txt     the last complete iteration, e.g. "300"
    <save>/iter_0000300/                         a Megatron-Core distributed checkpoint
        metadata.json, .metadata, __*.distcp, common state

Contents of ``iter_NNNNNNN`` (``megatron.core.dist_checkpointing``):

* sharded: the model's ``sharded_state_dict()`` tensors, under the keys Megatron-Core gives them
  (``embedding.word_embeddings.weight``, ``decoder.layers.*``, ``output_layer.weight``; DirMoE
  routers add ``decoder.layers.N.mlp.router.weight`` [2E, h] and ``...router.spike_bias`` [E]).
* common (``dist_checkpointing.load_common_state_dict(dir)``): ``args`` (the full parsed
  Namespace, including every ``dirmoe_*`` flag and ``args.dirmoe_config``, the resolved
  `DirMoEConfig` as a dict), ``checkpoint_version`` (3.0), ``iteration``,
  ``opt_param_scheduler``, ``num_floating_point_operations_so_far`` -- the same keys
  `megatron.training` writes -- plus, for the CPU loop, ``optimizer`` (a ``torch.optim.AdamW``
  state dict), ``rng_state`` (torch / Python / NumPy generator states), ``consumed_train_samples``
  (the data position) and ``dirmoe_trainer`` = "cpu_loop". The GPU path stores its optimizer
  and RNG as sharded objects instead (Megatron's own format).

Reading the model back, from either path::

    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    model = <build from common["args"]>
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
    model.load_state_dict(state["model"])  # `load` also returns the common keys
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_dirmoe.config import IMPLICIT_IN_OLDER_CHECKPOINTS

__all__ = [
    "CHECKPOINT_VERSION",
    "tracker_file",
    "checkpoint_dir",
    "latest_iteration",
    "read_tracker",
    "latest_checkpoint_dir",
    "write_tracker",
    "save_cpu_checkpoint",
    "load_cpu_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "dist_save",
]

CHECKPOINT_VERSION = 3.0


# The names come from megatron.training's own helpers (pure path arithmetic, no CUDA), so both
# paths and the converter agree with whatever megatron.training writes.
def tracker_file(root: str | os.PathLike) -> Path:
    """``<root>/latest_checkpointed_iteration.txt``."""
    from megatron.training.checkpointing import get_checkpoint_tracker_filename

    return Path(get_checkpoint_tracker_filename(str(root)))


def checkpoint_dir(root: str | os.PathLike, iteration: int, release: bool = False) -> Path:
    """``<root>/iter_0000NNN``, the distributed-checkpoint directory of `iteration`
    (``<root>/release`` for a release checkpoint)."""
    from megatron.training.checkpointing import get_checkpoint_name

    return Path(get_checkpoint_name(str(root), iteration, release, return_base_dir=True))


def write_tracker(root: str | os.PathLike, iteration: int) -> None:
    """Point the tracker file at `iteration` atomically: it only ever names a complete
    checkpoint, even if the job is killed while writing it."""
    tracker = tracker_file(root)
    tmp = tracker.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, tracker)


def read_tracker(root: Optional[str | os.PathLike]) -> Optional[tuple[int, bool]]:
    """``(iteration, release)`` from ``<root>/latest_checkpointed_iteration.txt``, as
    megatron.training reads it: a number, or ``release`` (a released model in
    ``<root>/release``, loaded as iteration 0 without optimizer state); None without a tracker."""
    if root is None:
        return None
    tracker = tracker_file(root)
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return 0, True
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    return int(text), False


def latest_iteration(root: Optional[str | os.PathLike]) -> Optional[int]:
    """The iteration in ``<root>/latest_checkpointed_iteration.txt`` (0 for ``release``), or
    None."""
    found = read_tracker(root)
    return None if found is None else found[0]


def latest_checkpoint_dir(root: Optional[str | os.PathLike]) -> Optional[Path]:
    """The checkpoint directory the tracker names (``iter_NNNNNNN`` or ``release``), or None."""
    found = read_tracker(root)
    return None if found is None else checkpoint_dir(root, *found)


def capture_rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


@contextlib.contextmanager
def _cpu_device_without_cuda():
    """Megatron-Core's torch_dist writer stages tensors with ``.to("cpu", non_blocking=True)``
    and then calls ``torch.cuda.synchronize()``, and it allocates its all-reduced error flag on
    ``torch.cuda.current_device()``; both raise on a machine without a GPU. With no GPU every
    tensor already is on the CPU: for the duration of the save (and only then) the sync is a
    no-op and the current device is the CPU (gloo reduces CPU tensors)."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = lambda: torch.device("cpu")  # where it stages its flags
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def dist_save(state: dict, directory: str | os.PathLike) -> None:
    """`megatron.core.dist_checkpointing.save`, also on machines without a GPU."""
    from megatron.core import dist_checkpointing

    with _cpu_device_without_cuda():
        dist_checkpointing.save(state, str(directory))


def save_cpu_checkpoint(root, iteration: int, model, optimizer, scheduler, args, *,
                        consumed_train_samples: int, num_flops: float = 0.0) -> Path:
    """Write ``<root>/iter_NNNNNNN`` and then point the tracker file at it."""
    directory = checkpoint_dir(root, iteration)
    if directory.exists():  # a re-run of the same iteration (e.g. after a crash mid-save)
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    args.consumed_train_samples = consumed_train_samples
    args.iteration = iteration
    state = {
        "model": model.sharded_state_dict(),
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "opt_param_scheduler": scheduler.state_dict(),
        "rng_state": capture_rng_state(),
        "consumed_train_samples": consumed_train_samples,
        "num_floating_point_operations_so_far": num_flops,
        "dirmoe_trainer": "cpu_loop",
    }
    dist_save(state, directory)
    write_tracker(root, iteration)
    return directory


def load_cpu_checkpoint(root, model, optimizer=None, scheduler=None, *, iteration=None,
                        load_rng: bool = True) -> dict:
    """Load model (and optimizer, scheduler, RNG when given) from ``root``'s latest (or
    ``iteration``'s) checkpoint; returns the common state (``iteration``, ``args``, ...)."""
    from megatron.core import dist_checkpointing

    release = False
    if iteration is None:
        found = read_tracker(root)
        if found is None:
            raise FileNotFoundError(f"no {tracker_file(root).name} under {root}")
        iteration, release = found
    directory = checkpoint_dir(root, iteration, release)
    with _cpu_device_without_cuda():
        common = dist_checkpointing.load_common_state_dict(str(directory))
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    model.load_state_dict(loaded["model"])
    if release:
        # As megatron.training: a released model starts a new run (iteration 0, fresh
        # optimizer, schedule and data position).
        common = {key: value for key, value in common.items()
                  if key not in ("optimizer", "opt_param_scheduler", "rng_state")}
        common.update(iteration=0, consumed_train_samples=0, dirmoe_release=True)
        return common
    if optimizer is not None and "optimizer" in common:
        optimizer.load_state_dict(common["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in common:
        try:
            scheduler.load_state_dict(common["opt_param_scheduler"])
        except AssertionError as err:  # Megatron asserts that the LR schedule is unchanged
            from megatron_dirmoe.errors import UserError

            raise UserError(
                f"checkpoint {directory}: the learning-rate schedule differs from the saved one "
                f"({err})",
                "resume with the same --train-iters / --lr* / warm-up flags, or pass "
                "--override-opt_param-scheduler to take the new schedule"
            ) from None
    if load_rng and "rng_state" in common:
        restore_rng_state(common["rng_state"])
    return common


# DirMoE settings that change only speed, not what is trained: free to change on resume.
_RESUME_NEUTRAL_FIELDS = ("torch_compile",)
# Fields added after checkpoints were first written, with the value that older runs used (as
# `config.IMPLICIT_IN_OLDER_CHECKPOINTS` has them; "paper" is the recipe's name in those runs).
_IMPLICIT_IN_OLDER_CHECKPOINTS = {
    "recipe": "paper",
    **{name: IMPLICIT_IN_OLDER_CHECKPOINTS[name]
       for name in ("count_control_rate", "load_control_rate", "unnormalized_weight",
                    "count_control_on", "aux_loss_scores", "aux_loss_coeff",
                    "count_control_gain", "load_control_floor")},
}
# Routing controllers and the buffer that holds their state in the checkpoint.
_CONTROLLER_BUFFERS = {"count_control_rate": "count_bias", "load_control_rate": "load_bias"}


def dirmoe_config_changes(saved: dict, current: dict, scores_read: bool = True) -> list[str]:
    """``--dirmoe-<flag> saved -> current`` for every router setting that differs between a
    checkpoint's resolved `DirMoEConfig` (``args.dirmoe_config``) and the current one.
    `scores_read`: whether an aux loss read `aux_loss_scores` in either run."""
    from megatron_dirmoe.config import flag_name

    changes = []
    for name, value in current.items():
        if name in _RESUME_NEUTRAL_FIELDS:
            continue
        if name == "unnormalized_weight" and current.get("renormalize"):
            continue  # renormalised weights do not read it
        if name == "aux_loss_scores" and not scores_read:
            continue  # no aux loss read them
        if name in saved:
            old = saved[name]
        elif name in _IMPLICIT_IN_OLDER_CHECKPOINTS:
            old = _IMPLICIT_IN_OLDER_CHECKPOINTS[name]
        else:
            continue  # a setting the checkpoint's version did not have and that it never used
        if old != value:
            changes.append(f"{flag_name(name)} {old!r} -> {value!r}")
    return changes


def check_resume_config(saved_args, args, where) -> None:
    """Stop a resume whose DirMoE router settings or schedule horizon differ from the
    checkpoint's (the schedules are functions of the iteration and the horizon, so a changed
    ``--train-iters`` silently stretches tau and lambda_p), unless
    ``--dirmoe-allow-config-change`` is given."""
    saved = getattr(saved_args, "dirmoe_config", None)
    current = getattr(args, "dirmoe_config", None)
    if not saved or not current:
        return
    if getattr(saved_args, "dirmoe_router", "dirichlet") != "dirichlet" or getattr(
            args, "dirmoe_router", "dirichlet") != "dirichlet":
        return  # TopK baselines have no DirMoE state to protect
    _check_controller_state(saved, current, where)
    if getattr(args, "dirmoe_allow_config_change", False):
        return
    scores_read = any(_aux_loss_on(run_args, config)
                      for run_args, config in ((saved_args, saved), (args, current)))
    changes = dirmoe_config_changes(saved, current, scores_read)
    if changes:
        from megatron_dirmoe.errors import UserError

        raise UserError(
            f"--load {where}: the DirMoE router settings differ from the checkpoint's: "
            f"{'; '.join(changes)} (--dirmoe-schedule-iters defaults to --train-iters)",
            "resume with the checkpoint's values, or pass --dirmoe-allow-config-change to "
            "continue with the new ones"
        )


def _aux_loss_on(run_args, config: dict) -> bool:
    """Whether a run had an aux loss on its router: its own or Megatron's."""
    from megatron_dirmoe.config import megatron_aux_loss_on

    return (config.get("aux_loss_coeff") or 0.0) > 0 or bool(megatron_aux_loss_on(run_args))


def _controller_on(config: dict, name: str) -> bool:
    rate = config.get(name, _IMPLICIT_IN_OLDER_CHECKPOINTS[name])
    return config.get("recipe", "paper") == "calibrated" and (rate or 0.0) > 0


def _check_controller_state(saved: dict, current: dict, where) -> None:
    """A routing controller that the checkpoint's run did not have has no state (c, b) in it to
    load: stop with the flags to use, even under --dirmoe-allow-config-change, instead of a
    missing-tensor error from the checkpoint loader."""
    from megatron_dirmoe.config import flag_name
    from megatron_dirmoe.errors import UserError

    missing = [name for name in _CONTROLLER_BUFFERS
               if _controller_on(current, name) and not _controller_on(saved, name)]
    if missing:
        flags = " ".join(f"{flag_name(name)} 0" for name in missing)
        raise UserError(
            f"--load {where}: the checkpoint was trained without "
            f"{' and '.join(_CONTROLLER_BUFFERS[name] for name in missing)} (the "
            f"{', '.join(flag_name(name) for name in missing)} controller, on by default in "
            "this release), so it holds no state for it",
            f"resume with {flags} (and the checkpoint's other settings), or start a new run")


def _has_expert_optimizer(args) -> bool:
    """Whether Megatron-Core 0.19 keeps the expert weights in an optimizer of their own: when
    they use the expert process groups (`ColumnParallelLinear`'s ``use_expert_pgs``), i.e. with
    expert parallelism or an expert TP size other than the TP size."""
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    return (getattr(args, "expert_model_parallel_size", 1) or 1) > 1 or etp != tp


def check_resume_layout(saved_args, args, where) -> None:
    """Stop a GPU-path resume at a parallel layout whose optimizer state Megatron cannot load,
    naming the flags, before Megatron fails deep inside its loader.

    TP, PP, EP, ETP and DP may all change between a save and a resume (the model and the
    optimizer state are stored per parameter, and Megatron reshards them), except:

    * expert parallelism switched on or off (EP 1 <-> EP > 1, or ETP = TP <-> ETP != TP):
      Megatron then keeps the expert weights in a separate optimizer or not, and its loader
      cannot map one structure onto the other ("Could not find parameter group ...");
    * TP or PP changed with ``--use-distributed-optimizer`` when the checkpoint was not saved
      with ``--dist-ckpt-optim-fully-reshardable`` (its default format only reshards over DP).

    ``--no-load-optim`` (fresh optimizer state) and ``--finetune`` skip the optimizer and pass.
    """
    if saved_args is None or getattr(args, "no_load_optim", False) or getattr(
            args, "finetune", False) or getattr(saved_args, "no_save_optim", False):
        return

    def layout(a):
        return (f"TP {getattr(a, 'tensor_model_parallel_size', 1)}, "
                f"PP {getattr(a, 'pipeline_model_parallel_size', 1)}, "
                f"EP {getattr(a, 'expert_model_parallel_size', 1)}, "
                f"ETP {getattr(a, 'expert_tensor_parallel_size', None)}")

    if _has_expert_optimizer(saved_args) != _has_expert_optimizer(args):
        raise ValueError(
            f"{where}: the checkpoint was saved at {layout(saved_args)} and this run is "
            f"{layout(args)}: expert parallelism is switched "
            f"{'off' if _has_expert_optimizer(saved_args) else 'on'}, and Megatron-Core "
            "cannot load optimizer state across that change (it keeps expert weights in an "
            "optimizer of their own only with --expert-model-parallel-size > 1 or "
            "--expert-tensor-parallel-size != --tensor-model-parallel-size). Resume with "
            "expert parallelism "
            f"{'on' if _has_expert_optimizer(saved_args) else 'off'} (any other TP/PP/EP/DP "
            "layout works), or pass --no-load-optim to load the model, schedules and data "
            "position with a fresh optimizer state")
    tp_pp = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    changed = any(getattr(saved_args, n, 1) != getattr(args, n, 1) for n in tp_pp)
    if (changed and getattr(args, "use_distributed_optimizer", False)
            and getattr(saved_args, "use_distributed_optimizer", False)
            and not getattr(saved_args, "dist_ckpt_optim_fully_reshardable", False)):
        raise ValueError(
            f"{where}: the checkpoint was saved at {layout(saved_args)} with "
            "--use-distributed-optimizer in its default format, which can be resumed at "
            f"another data-parallel size only, not at {layout(args)}. Save with "
            "--dist-ckpt-optim-fully-reshardable to change TP/PP on resume, resume at the saved "
            "TP and PP, or pass --no-load-optim")


def read_checkpoint_args(root) -> Optional["argparse.Namespace"]:
    """The ``args`` saved in ``root``'s latest checkpoint (torch_dist format), or None when
    there is none or it cannot be read this way."""
    from megatron.core import dist_checkpointing

    directory = latest_checkpoint_dir(root)
    if directory is None:
        return None
    try:
        with _cpu_device_without_cuda():
            return dist_checkpointing.load_common_state_dict(str(directory)).get("args")
    except Exception:  # e.g. a legacy (non-distributed) checkpoint: Megatron checks it itself
        return None

