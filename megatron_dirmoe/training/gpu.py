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

from megatron_dirmoe.training.loss import loss_func

__all__ = ["model_provider", "forward_step", "get_batch", "loss_func", "pretrain_on_cuda",
           "check_resume"]

_ROUTERS_BY_MODEL: dict[int, list] = {}


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    from megatron.training import get_args, print_rank_0

    from megatron_dirmoe.training.builders import build_model_from_args

    args = get_args()
    if args.record_memory_history:  # as Megatron-LM's model_provider
        _record_memory_history(args.memory_snapshot_path)
    print_rank_0(f"building DirMoE GPT model ({args.dirmoe_router} router) ...")
    return build_model_from_args(args, config, pre_process=pre_process,
                                 post_process=post_process, vp_stage=vp_stage,
                                 pg_collection=pg_collection)


def _record_memory_history(snapshot_path: str) -> None:
    """``--record-memory-history``: keep the last 100k allocation events with stacks and dump
    them to ``oom_rank-<r>_<--memory-snapshot-path>`` when CUDA runs out of memory."""
    torch.cuda.memory._record_memory_history(True, trace_alloc_max_entries=100000,
                                             trace_alloc_record_context=True)

    def on_oom(device, alloc, device_alloc, device_free):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.cuda.memory._dump_snapshot(f"oom_rank-{rank}_{snapshot_path}")

    torch._C._cuda_attach_out_of_memory_observer(on_oom)


def _routers(model) -> list:
    from megatron_dirmoe.router import iter_dirichlet_routers

    key = id(model)
    if key not in _ROUTERS_BY_MODEL:
        _ROUTERS_BY_MODEL[key] = list(iter_dirichlet_routers(model))
    return _ROUTERS_BY_MODEL[key]


# What `forward_step` feeds the model; a key a pipeline stage does not need is None there.
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def get_batch(data_iterator, vp_stage=None, config=None) -> dict:
    """This rank's micro-batch, read the way Megatron-LM's ``pretrain_gpt.py`` reads it with
    megatron-core 0.19.2.

    `megatron.training` builds data loaders on tensor-parallel rank 0 only, and the dataset
    provider builds datasets on the first and last pipeline stages only (plus a stage holding
    MTP layers), so ``data_iterator`` is None everywhere else. TP rank 0 of a first/last stage
    reads the micro-batch and broadcasts what its stage needs to the other TP ranks
    (`get_batch_on_this_tp_rank`: first stage tokens + position ids, last stage labels + loss
    mask, both the attention mask when ``--create-attention-mask-in-dataloader``, everything
    without PP), then the sequence is split over context-parallel ranks
    (`get_batch_on_this_cp_rank`). Middle stages read nothing: their input is the previous
    stage's activations.
    """
    from megatron.core import mpu
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    args = get_args()
    for flag in ("sft", "dataloader_inter_document_masking", "hybrid_context_parallel"):
        if getattr(args, flag, False):
            raise ValueError(f"--{flag.replace('_', '-')} (variable-length batches with "
                             "cu_seqlens) is not supported by the DirMoE pretraining entry point")
    mtp_here = config is not None and mtp_on_this_rank(
        layout=getattr(config, "pipeline_model_parallel_layout", None),
        mtp_num_layers=getattr(config, "mtp_num_layers", None),
        ignore_virtual=False,
        vp_stage=vp_stage,
    )
    if not is_first_or_last_pipeline_stage(vp_stage) and not mtp_here:
        return dict.fromkeys(BATCH_KEYS)

    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        data = next(data_iterator)
        device = torch.cuda.current_device()
        # Only the model's inputs travel: a blended dataset adds e.g. "dataset_id".
        batch = {key: None if data.get(key) is None else data[key].to(device, non_blocking=True)
                 for key in BATCH_KEYS}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                      cp_group=mpu.get_context_parallel_group())
    return {key: batch.get(key) for key in BATCH_KEYS}


def _hook_count_control(config) -> None:
    """Step the routers' count and load controllers where Megatron steps its own expert bias: in
    ``config.finalize_model_grads_func``, once per optimizer step after the last micro-batch's
    backward, on every rank. Megatron's `train()` sets that function before its first forward
    step, so the first forward step wraps it (once)."""
    from megatron_dirmoe.router import update_count_control

    finalize = getattr(config, "finalize_model_grads_func", None)
    if finalize is None or getattr(finalize, "dirmoe_count_control", False):
        return

    def finalize_then_control(model, *args, **kwargs):
        result = finalize(model, *args, **kwargs)
        update_count_control(model)
        return result

    finalize_then_control.dirmoe_count_control = True
    config.finalize_model_grads_func = finalize_then_control


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron's forward step. ``return_schedule_plan`` (--overlap-moe-expert-parallel-comm)
    is refused at start-up (`megatron_dirmoe.training.model_flags`); never silently ignored."""
    if return_schedule_plan:
        raise ValueError("--overlap-moe-expert-parallel-comm is not supported by DirMoE's MoE "
                         "layer; drop the flag")
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, get_timers

    from megatron_dirmoe.router import seed_routing_noise

    args = get_args()
    # tau_z and lambda_p are functions of the iteration: set them on every micro-batch (cheap).
    iteration = getattr(args, "curr_iteration", args.iteration)
    for router in _routers(model):
        router.set_iteration(iteration)
    _hook_count_control(get_attr_wrapped_model(model, "config"))
    seed_routing_noise(args.seed)  # no-op after the first call with the same seed
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"),
                      get_attr_wrapped_model(model, "config"))
    timers("batch-generator").stop()
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])


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
    from megatron.training.training import pretrain

    from megatron_dirmoe.datasets import train_valid_test_datasets_provider
    from megatron_dirmoe.metrics import install_metrics_tracker
    from megatron_dirmoe.training.inputs import set_megatron_globals

    _use_prebuilt_dataset_helpers()
    set_megatron_globals(args)  # builds the tokenizer (padded vocabulary) first
    # Before megatron.training loads the weights: a damaged checkpoint, another model, a changed
    # router config / schedule horizon, or a layout Megatron cannot reshard the optimizer state
    # to stops here, naming the file or the flags. --context-parallel-size > 1 is refused at
    # start-up by megatron_dirmoe.layout.
    check_resume(args)
    # num_experts: pipeline stages without a DirMoE layer join the routing metrics' all-reduce.
    tracker = install_metrics_tracker(
        num_experts=args.num_experts if args.dirmoe_router == "dirichlet" else None)
    _log_throughput_at_realised_k(args, tracker)
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)
    _print_summary(args, tracker)


def check_resume(args) -> None:
    """What `pretrain_on_cuda` checks before megatron.training loads ``--load``: the checkpoint
    is intact and holds this model with these router settings
    (`megatron_dirmoe.training.resume.check_resume`), and a resumed run's layout is one whose
    optimizer state Megatron can load (`checkpointing.check_resume_layout`; a release checkpoint
    starts a new run with a fresh optimizer)."""
    from megatron_dirmoe.training import resume
    from megatron_dirmoe.training.checkpointing import check_resume_layout

    point = resume.check_resume(args)
    if point is not None and point.iteration is not None:
        check_resume_layout(point.saved_args, args, args.load)


def _log_throughput_at_realised_k(args, tracker) -> None:
    """Replace Megatron's TFLOP/s, which charges ``--moe-router-topk`` experts per token (for
    DirMoE the cap, 4k by default), by tokens/s, TFLOP/s and MFU at the realised k."""
    from megatron.training.global_vars import get_timers

    from megatron_dirmoe.throughput import meter_for_run

    args.log_throughput = False
    meter = meter_for_run(args, devices=args.world_size,
                          device_name=torch.cuda.get_device_name())
    # megatron.training's interval timer runs from one log line to the next (it is read and
    # reset after the MoE report of the logging iteration).
    tracker.enable_throughput(
        meter, args.log_interval,
        lambda: get_timers()("interval-time").elapsed(barrier=False, reset=False))


def _print_summary(args, tracker) -> None:
    import torch.distributed as dist

    from megatron_dirmoe.metrics import format_routing_summary, routing_summary
    from megatron_dirmoe.config import dirmoe_config_from_args
    from megatron_dirmoe.layout import moe_layer_numbers

    if args.dirmoe_router != "dirichlet" or not tracker.last_per_layer:
        return
    if dist.is_initialized() and dist.get_rank() != dist.get_world_size() - 1:
        return
    rows = routing_summary(tracker.last_per_layer,
                           moe_layer_numbers(args.moe_layer_freq, args.num_layers))
    print(format_routing_summary(rows, dirmoe_config_from_args(args).target_k, args.num_experts),
          flush=True)
