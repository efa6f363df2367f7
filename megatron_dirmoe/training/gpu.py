"""The CUDA path: `megatron.training.pretrain` with the DirMoE model, data and metrics.

TP/PP/EP/CP, bf16, the distributed optimizer, checkpoint save/resume (``--save``/``--load``),
TensorBoard (``--tensorboard-dir``) and W&B (``--wandb-project``) are Megatron's own; this module
supplies the model provider, the forward step (which also sets the router schedules to the
current iteration) and the dataset provider, and installs
:class:`megatron_dirmoe.metrics.DirMoEMetricsTracker` so the DirMoE metrics reach the logs.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch

__all__ = ["model_provider", "forward_step", "pretrain_on_cuda"]

_ROUTERS_BY_MODEL: dict[int, list] = {}


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    from megatron.training import get_args, print_rank_0

    from megatron_dirmoe.training.builders import build_model_from_args

    args = get_args()
    print_rank_0(f"building DirMoE GPT model ({args.dirmoe_router} router) ...")
    return build_model_from_args(args, config, pre_process=pre_process,
                                 post_process=post_process, vp_stage=vp_stage,
                                 pg_collection=pg_collection)


def _routers(model) -> list:
    from megatron_dirmoe.router import iter_dirichlet_routers

    key = id(model)
    if key not in _ROUTERS_BY_MODEL:
        _ROUTERS_BY_MODEL[key] = list(iter_dirichlet_routers(model))
    return _ROUTERS_BY_MODEL[key]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of token losses, token count and the 'lm loss' report (Megatron's per-token form:
    its schedule divides by the tokens and micro-batches)."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.training import get_args, get_timers

    args = get_args()
    # tau_z and lambda_p are functions of the iteration: set them on every micro-batch (cheap).
    iteration = getattr(args, "curr_iteration", args.iteration)
    for router in _routers(model):
        router.set_iteration(iteration)
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = next(data_iterator)
    device = torch.cuda.current_device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, non_blocking=True)
    timers("batch-generator").stop()
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, partial(loss_func, loss_mask)


def _use_prebuilt_dataset_helpers() -> None:
    """`megatron.training`'s initialisation runs ``make`` in ``megatron/core/datasets`` to build
    the C++ dataset helpers. The megatron-core wheel ships them prebuilt and without the
    Makefile, so that ``make`` fails and the job exits; skip the build when the prebuilt module
    imports."""
    import megatron.core.datasets.utils as dataset_utils

    folder = os.path.dirname(dataset_utils.__file__)
    if os.path.exists(os.path.join(folder, "Makefile")):
        return
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError:
        return
    dataset_utils.compile_helpers = lambda: None


def pretrain_on_cuda(args: argparse.Namespace) -> None:
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import pretrain

    from megatron_dirmoe.datasets import train_valid_test_datasets_provider
    from megatron_dirmoe.metrics import install_metrics_tracker

    if args.context_parallel_size > 1:
        raise ValueError("--context-parallel-size > 1 is not supported by the DirMoE launcher yet")
    from megatron_dirmoe.training.checkpointing import check_resume_config, read_checkpoint_args

    # Before megatron.training loads the weights: a changed router config or schedule horizon
    # would otherwise resume silently.
    check_resume_config(read_checkpoint_args(args.load), args, args.load)
    _use_prebuilt_dataset_helpers()
    set_global_variables(args)
    tracker = install_metrics_tracker()
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)
    _print_summary(args, tracker)


def _print_summary(args, tracker) -> None:
    import torch.distributed as dist

    from megatron_dirmoe.metrics import format_routing_summary, routing_summary
    from megatron_dirmoe.training.builders import dirmoe_config_of, moe_layer_numbers

    if args.dirmoe_router != "dirichlet" or not tracker.last_per_layer:
        return
    if dist.is_initialized() and dist.get_rank() != dist.get_world_size() - 1:
        return
    rows = routing_summary(tracker.last_per_layer, moe_layer_numbers(args))
    print(format_routing_summary(rows, dirmoe_config_of(args).target_k, args.num_experts),
          flush=True)
