"""The CPU training loop: what `megatron.training.pretrain` does on GPUs, for one CPU process.

Same arguments, same model, same data (Megatron's `GPTDataset` through
:mod:`megatron_dirmoe.datasets`), same schedules (Megatron's `OptimizerParamScheduler` with the
args' warm-up/decay, DirMoE's tau_z/lambda_p by iteration), AdamW with Megatron's weight-decay
rule (no decay for biases and 1-D parameters), gradient clipping, gradient accumulation over
micro-batches (aux losses scaled by 1/num_microbatches like Megatron's schedules), the DirMoE
metrics through :class:`megatron_dirmoe.metrics.DirMoEMetricsTracker`, periodic validation and
checkpoints in `megatron.training`'s layout (:mod:`megatron_dirmoe.training.checkpointing`).

Resume is exact: the data position is the number of consumed samples (sample ``i`` of the
training set is always the same sequence), the LR scheduler and optimizer states, the
iteration (the router schedules are functions of it) and the RNG states are all in the
checkpoint. Validation always uses the first ``eval_iters`` global batches of the validation set,
so successive validation losses are comparable.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = ["TrainResult", "train_on_cpu", "batch_from_dataset"]


@dataclass
class TrainResult:
    iteration: int
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> training loss
    valid_losses: dict[int, float] = field(default_factory=dict)
    routing: list = field(default_factory=list)  # per MoE layer rows (metrics.routing_summary)
    # One row per iteration: loss, lr, step seconds, and each DirMoE metric per MoE layer.
    history: list = field(default_factory=list)
    checkpoint: Optional[str] = None
    model: Optional[torch.nn.Module] = field(default=None, repr=False)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _adamw(model, args) -> torch.optim.Optimizer:
    """AdamW with Megatron's default grouping: no weight decay for biases and 1-D params."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 else decay).append(param)
    groups = [
        {"params": decay, "wd_mult": 1.0},
        {"params": no_decay, "wd_mult": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)


def _scheduler(optimizer, args):
    """Megatron's `OptimizerParamScheduler` with the arguments
    `megatron.training.training.get_optimizer_param_scheduler` gives it (iteration-based)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    decay_iters = args.lr_decay_iters or args.train_iters
    decay_steps = decay_iters * gbs
    if args.lr_warmup_fraction is not None:
        warmup_steps = args.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = args.lr_warmup_iters * gbs
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=(args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None),
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def batch_from_dataset(dataset, start: int, size: int,
                       device="cpu") -> dict[str, torch.Tensor]:
    """Samples start .. start+size-1 (wrapping) of a GPT dataset as a batch on `device`."""
    samples = [dataset[i % len(dataset)] for i in range(start, start + size)]
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)
            for key in ("tokens", "labels", "loss_mask", "position_ids")}


def _micro_batch_loss(model, batch) -> torch.Tensor:
    # loss_mask reaches the multi-token-prediction heads (--mtp-num-layers), as in pretrain_gpt.
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    mask = batch["loss_mask"].float()
    return (losses.float() * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def _evaluate(model, dataset, args, device="cpu") -> float:
    model.eval()
    total, count = 0.0, 0
    mbs = args.eval_micro_batch_size or args.micro_batch_size
    gbs = args.eval_global_batch_size or args.global_batch_size
    for start in range(0, args.eval_iters * gbs, mbs):
        batch = batch_from_dataset(dataset, start, mbs, device)
        total += _micro_batch_loss(model, batch).item()
        count += 1
    model.train()
    return total / max(count, 1)


def _init_mtp_tracker(num_layers: int, device) -> None:
    """Megatron's MTP loss tracker allocates its sums on ``torch.cuda.current_device()`` at the
    first record; start them on this loop's device instead (zeros, as Megatron's)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    tracker.clear()
    for key in ("loss_values", "correct_values", "total_values"):
        tracker[key] = torch.zeros(num_layers, device=device)


def _pop_mtp_losses(loss_scale: float) -> list[float]:
    """This step's MTP losses (mean over micro-batches, one per MTP depth), then clear the
    tracker (one process: nothing to reduce)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    values = [float(v) * loss_scale for v in tracker["loss_values"]]
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    return values


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _exit_reason(args, iteration: int, t_start: float) -> Optional[str]:
    """Why the loop stops after this step (then it saves and returns normally), as
    megatron.training does: --exit-interval, the --exit-signal-handler signal (SIGTERM by
    default; the Slurm scripts forward their deadline signal as SIGTERM), or
    --exit-duration-in-mins of training time."""
    if args.exit_interval and iteration % args.exit_interval == 0:
        return "--exit-interval"
    if args.exit_signal_handler:
        from megatron.training.global_vars import get_signal_handler

        if any(get_signal_handler().signals_received()):
            return f"received {args.exit_signal!s}"
    minutes = args.exit_duration_in_mins
    if minutes and (time.time() - t_start) / 60.0 > minutes:
        return f"--exit-duration-in-mins {minutes}"
    return None


def train_on_cpu(args: argparse.Namespace, device: str = "cpu",
                 follow_load: bool = False) -> TrainResult:
    """Train (or resume) per ``args``; returns losses, validation losses and routing.

    ``device="cuda"`` runs the same single-process loop on one GPU (fp32, local spec: what the
    router comparison uses so every router trains in one identical loop). ``follow_load``: every
    history row also holds ``router/effective_experts``, the effective experts of each MoE layer
    over that step's training tokens, for any router (`routing_analysis.TrainingLoad`)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
    from torch.distributed.checkpoint.api import CheckpointException
    from megatron.training.global_vars import get_tensorboard_writer, get_tokenizer, get_wandb_writer

    from megatron_dirmoe.baselines import update_expert_biases
    from megatron_dirmoe.datasets import build_gpt_datasets, num_samples_per_split
    from megatron_dirmoe.metrics import format_routing_summary, install_metrics_tracker, routing_summary
    from megatron_dirmoe.router import set_router_iteration, update_count_control
    from megatron_dirmoe.single_rank import init_single_rank
    from megatron_dirmoe.config import dirmoe_config_from_args
    from megatron_dirmoe.layout import moe_layer_numbers
    from megatron_dirmoe.throughput import log_throughput, meter_for_run
    from megatron_dirmoe.training.builders import build_model_from_args
    from megatron_dirmoe.errors import UserError
    from megatron_dirmoe.training.checkpointing import load_cpu_checkpoint, save_cpu_checkpoint
    from megatron_dirmoe.training.loss import LossChecks
    from megatron_dirmoe.training.resume import check_resume, load_error

    if args.dirmoe_router == "dirichlet" and args.moe_router_topk is None:
        raise ValueError("moe_router_topk unset")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 loop: TF32 tensor cores for GEMMs
    init_single_rank("nccl" if device.type == "cuda" else "gloo")
    _seed(args.seed)
    # A fresh tracker per run: entries keep the layer count of the model that first recorded
    # them, and an earlier model in this process may have had another.
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()
    tracker = install_metrics_tracker(
        num_experts=args.num_experts if args.dirmoe_router == "dirichlet" else None)

    # Before any weight is built or loaded: the checkpoint to resume from is intact and holds
    # this model with these router settings (else one message naming the file or flags).
    resume = check_resume(args)
    model = build_model_from_args(args).to(device)
    model.train()
    if follow_load:
        from megatron_dirmoe.routing_analysis import TrainingLoad

        training_load = TrainingLoad(model)
    optimizer = _adamw(model, args)
    scheduler = _scheduler(optimizer, args)
    train_ds, valid_ds, _ = build_gpt_datasets(
        args, get_tokenizer(), num_samples_per_split(args), create_attention_mask=False
    )

    num_micro = args.global_batch_size // args.micro_batch_size
    if num_micro * args.micro_batch_size != args.global_batch_size:
        raise ValueError(f"--global-batch-size ({args.global_batch_size}) must be a multiple of "
                         f"--micro-batch-size ({args.micro_batch_size}) on one CPU process")
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_micro))
    mtp_layers = args.mtp_num_layers or 0
    if mtp_layers:
        _init_mtp_tracker(mtp_layers, device)
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_micro))
    loss_checks = LossChecks(args)

    iteration, consumed = 0, 0
    load_root = args.load
    if resume is not None:
        try:
            common = load_cpu_checkpoint(load_root, model, optimizer, scheduler,
                                         iteration=resume.iteration,
                                         load_rng=not args.no_load_rng)
        except UserError:
            raise  # the checkpoint loaded; its settings were refused, naming the flags
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - files passed the check
            raise load_error(resume, exc) from exc
        iteration = int(common["iteration"])
        consumed = int(common["consumed_train_samples"])
        if common.get("dirmoe_release"):
            _log(f"[dirmoe] loaded the release checkpoint of {load_root}: weights only, "
                 "starting at iteration 0")
        else:
            _log(f"[dirmoe] resumed from {load_root} at iteration {iteration} "
                 f"({consumed} samples consumed)")

    writer, wandb_writer = get_tensorboard_writer(), get_wandb_writer()
    num_params = sum(p.numel() for p in model.parameters())
    tokens_per_iter = args.global_batch_size * args.seq_length
    cfg = dirmoe_config_from_args(args)
    moe_layers = moe_layer_numbers(args.moe_layer_freq, args.num_layers)
    meter = meter_for_run(args, device_name=torch.cuda.get_device_name(device)
                          if device.type == "cuda" else None)
    train_seconds = 0.0  # steps only: evaluation and checkpoints are not training throughput
    _log(f"[dirmoe] CPU training: {num_params / 1e6:.2f}M parameters, {len(moe_layers)} MoE "
         f"layers x {args.num_experts} experts ({args.dirmoe_router} router, target k "
         f"{cfg.target_k}), {args.train_iters} iterations x {tokens_per_iter} tokens, "
         f"{num_micro} micro-batch(es)/step, {torch.get_num_threads()} threads")

    result = TrainResult(iteration=iteration)
    params = [p for p in model.parameters() if p.requires_grad]
    t_start, it_start = time.time(), iteration
    window_loss, window_n = 0.0, 0
    mtp_window: list = []
    while iteration < args.train_iters:
        t_step = time.time()
        set_router_iteration(model, iteration)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in range(num_micro):
            batch = batch_from_dataset(train_ds, consumed + m * args.micro_batch_size,
                                       args.micro_batch_size, device)
            loss = _micro_batch_loss(model, batch) / num_micro
            spiky = loss_checks.check(loss.item() * num_micro, iteration + 1)
            if spiky:
                _log(f"[dirmoe] warning: {spiky}")
            loss.backward()
            step_loss += loss.item()
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, args.clip_grad).item()
                     if args.clip_grad > 0 else float("nan"))
        optimizer.step()
        update_expert_biases(model)
        update_count_control(model)
        scheduler.step(increment=args.global_batch_size)
        consumed += args.global_batch_size
        iteration += 1
        result.losses[iteration] = step_loss
        moe_string = tracker.report(loss_scale=1.0 / num_micro, iteration=iteration,
                                    writer=writer, wandb_writer=wandb_writer,
                                    per_layer_logging=args.moe_per_layer_logging,
                                    num_layers=args.num_layers,
                                    moe_layer_freq=args.moe_layer_freq,
                                    mtp_num_layers=args.mtp_num_layers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = time.time() - t_step
        train_seconds += step_seconds
        active = tracker.last_per_layer.get("dirmoe/active_experts")
        meter.add_step(active)
        row = {"iteration": iteration, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"],
               "step_seconds": step_seconds}
        if mtp_layers:
            row["mtp_losses"] = _pop_mtp_losses(1.0 / num_micro)
            mtp_window.append(row["mtp_losses"])
            for i, value in enumerate(row["mtp_losses"]):
                if writer is not None:
                    writer.add_scalar(f"mtp_{i + 1} loss", value, iteration)
                if wandb_writer is not None:
                    wandb_writer.log({f"mtp_{i + 1} loss": value}, iteration)
        row.update({name: [float(v) for v in tracker.last_per_layer[name][[n - 1 for n in
                                                                           moe_layers]]]
                    for name in tracker.last_per_layer})
        if follow_load:
            row["router/effective_experts"] = training_load.pop()
        result.history.append(row)
        if writer is not None:
            writer.add_scalar("lm loss", step_loss, iteration)
            writer.add_scalar("learning-rate", optimizer.param_groups[0]["lr"], iteration)
            writer.add_scalar("grad-norm", grad_norm, iteration)
        if wandb_writer is not None:
            wandb_writer.log({"lm loss": step_loss, "learning-rate":
                              optimizer.param_groups[0]["lr"], "grad-norm": grad_norm}, iteration)
        window_loss += step_loss
        window_n += 1
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            elapsed = time.time() - t_start
            done = iteration - it_start
            eta = elapsed / max(done, 1) * (args.train_iters - iteration)
            per_layer = ("" if active is None else " active/layer: "
                         + ",".join(f"{active[n - 1]:.2f}" for n in moe_layers) + " |")
            speed = meter.report(train_seconds)
            train_seconds = 0.0
            mtp = "".join(f" mtp_{i + 1} loss {sum(r[i] for r in mtp_window) / len(mtp_window):.4f} |"
                          for i in range(mtp_layers)) if mtp_window else ""
            mtp_window = []
            _log(f" iteration {iteration:>6d}/{args.train_iters} | lm loss "
                 f"{window_loss / window_n:.4f} |{mtp} lr {optimizer.param_groups[0]['lr']:.3e} | "
                 f"grad norm {grad_norm:.3f} |{speed.format() if speed else ''} ETA {_fmt_time(eta)} |"
                 f"{moe_string}{per_layer}")
            log_throughput(speed, iteration, writer, wandb_writer)
            window_loss, window_n = 0.0, 0
        if valid_ds is not None and args.eval_interval and args.eval_iters and (
            iteration % args.eval_interval == 0 or iteration == args.train_iters
        ):
            val = _evaluate(model, valid_ds, args, device)
            tracker.clear()  # whatever else ran during evaluation is not this step's metrics
            result.valid_losses[iteration] = val
            _log(f" validation loss at iteration {iteration}: {val:.4f} | ppl "
                 f"{math.exp(min(val, 20)):.2f}")
            if writer is not None:
                writer.add_scalar("lm loss validation", val, iteration)
            if wandb_writer is not None:
                wandb_writer.log({"lm loss validation": val}, iteration)
        exiting = _exit_reason(args, iteration, t_start)
        if args.save and (
            (args.save_interval and iteration % args.save_interval == 0)
            or iteration == args.train_iters or exiting
        ):
            path = save_cpu_checkpoint(args.save, iteration, model, optimizer, scheduler, args,
                                       consumed_train_samples=consumed)
            result.checkpoint = str(path)
            _log(f" saved checkpoint {path}")
        if exiting:
            _log(f"[dirmoe] exiting at iteration {iteration} ({exiting})")
            break

    result.iteration = iteration
    train_rows = routing_summary(tracker.last_per_layer, moe_layers)
    result.routing = train_rows
    if follow_load:
        training_load.remove()
    result.model = model
    if result.valid_losses:
        last = max(result.valid_losses)
        _log(f"[dirmoe] final validation loss (iteration {last}): {result.valid_losses[last]:.4f}")
    if not result.losses and iteration >= args.train_iters:
        # Resumed at --train-iters: without this line the rerun ends with an empty summary.
        # (A run stopped before its first step is not "nothing to train"; the exit line says why.)
        _log(f"[dirmoe] nothing to train: the checkpoint is at iteration {iteration} of "
             f"--train-iters {args.train_iters}; raise --train-iters to train on (the routing "
             "summary is in the log of the run that trained it)")
    if train_rows and args.dirmoe_router == "dirichlet":
        _log(format_routing_summary(train_rows, cfg.target_k, args.num_experts))
        _log("  last training step; active = realised experts per token, eval_active = the "
             "same tokens under deterministic (eval) routing, E[k] = sum of gate probabilities")
    if writer is not None:
        writer.flush()
    if wandb_writer is not None:
        wandb_writer.finish()  # as megatron.training.pretrain ends its W&B run
    return result
