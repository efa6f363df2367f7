"""Read and write Megatron distributed checkpoints in `megatron.training`'s layout.

Layout: ``<save>/latest_checkpointed_iteration.txt`` and ``<save>/iter_<7 digits>/`` (a
`megatron.core.dist_checkpointing` directory whose common state holds ``args``, the Megatron
argparse namespace incl. ``--dirmoe-*``, and ``iteration``; the model under key ``model``).

Loading rebuilds the model on one CPU rank (TP = PP = EP = 1, local spec, sequential experts) and
lets `dist_checkpointing.load` reshard whatever TP/PP/EP layout (and local or TE spec, grouped or
sequential experts) the checkpoint was saved with.
"""

from __future__ import annotations

import contextlib
import copy
import os
from argparse import Namespace
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_dirmoe.config import dirmoe_config_from_args

__all__ = [
    "resolve_checkpoint_dir",
    "read_common_state",
    "cpu_args",
    "dirmoe_config_from_args",
    "build_cpu_model",
    "load_megatron_model",
    "save_megatron_checkpoint",
    "ensure_single_rank_world",
    "parse_megatron_args",
    "match_checkpoint_keys",
    "CHECKPOINT_KEY_ALIASES",
]

# Overrides that rebuild a training run's architecture on one CPU rank in fp32. None of them
# changes a parameter's name or global shape.
_SINGLE_RANK_ARGS = dict(
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    expert_model_parallel_size=1,
    expert_tensor_parallel_size=1,
    context_parallel_size=1,
    virtual_pipeline_model_parallel_size=None,
    num_layers_per_virtual_pipeline_stage=None,
    decoder_first_pipeline_num_layers=None,
    decoder_last_pipeline_num_layers=None,
    account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False,
    pipeline_model_parallel_layout=None,
    sequence_parallel=False,
)
_CPU_FP32_ARGS = dict(
    use_cpu_initialization=True,
    perform_initialization=False,
    params_dtype=torch.float32,
    fp16=False,
    bf16=False,
    fp8=None,
    moe_grouped_gemm=False,
    moe_token_dispatcher_type="allgather",
    moe_permute_fusion=False,
    moe_router_fusion=False,
    apply_rope_fusion=False,
    bias_swiglu_fusion=False,
    bias_gelu_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    gradient_accumulation_fusion=False,
    cross_entropy_loss_fusion=False,
    recompute_granularity=None,
    recompute_method=None,
    recompute_num_layers=None,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    transformer_impl="local",
)


def parse_megatron_args(argv: list[str], world_size: int = 1) -> Namespace:
    """Megatron's training arguments plus ``--dirmoe-*`` flags from `argv`, validated by
    Megatron (`validate_args` fills derived fields) as the training entry would see them on
    `world_size` ranks."""
    import io
    import sys

    from megatron.training.arguments import parse_args, validate_args

    from megatron_dirmoe.config import add_dirmoe_args

    saved_argv, saved_ws = sys.argv, os.environ.get("WORLD_SIZE")
    sys.argv = ["megatron_dirmoe"] + list(argv)
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        args = parse_args(extra_args_provider=add_dirmoe_args)
        with contextlib.redirect_stdout(io.StringIO()):  # validate_args prints every argument
            validate_args(args)
    finally:
        sys.argv = saved_argv
        if saved_ws is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved_ws
    return args


def resolve_checkpoint_dir(path: Union[str, Path], iteration: Optional[int] = None) -> Path:
    """The `iter_XXXXXXX` directory to read: `path` itself if it is one, else the iteration
    named by `iteration` or by `path/latest_checkpointed_iteration.txt`."""
    from megatron_dirmoe.training.checkpointing import (checkpoint_dir, latest_checkpoint_dir,
                                                        tracker_file)

    path = Path(path)
    if (path / "metadata.json").exists() and iteration is None:
        return path
    if iteration is None:
        ckpt = latest_checkpoint_dir(path)  # iter_NNNNNNN, or release
        if ckpt is None:
            raise FileNotFoundError(
                f"{path} is neither a distributed checkpoint directory (no metadata.json) nor a "
                f"save directory (no {tracker_file(path).name}); pass --iteration or the iter_* "
                "directory"
            )
    else:
        ckpt = checkpoint_dir(path, iteration)
    if not (ckpt / "metadata.json").exists():
        raise FileNotFoundError(f"{ckpt} is not a distributed checkpoint (no metadata.json)")
    return ckpt


def read_common_state(ckpt_dir: Union[str, Path]) -> tuple[Namespace, int]:
    """(args, iteration) from the checkpoint's common state."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    args = common.get("args")
    if args is None:
        raise ValueError(
            f"{ckpt_dir}: the common state has no 'args' (not saved by megatron.training / "
            "megatron_dirmoe's entry point)"
        )
    return args, int(common.get("iteration", 0) or 0)


def _check_supported(args: Namespace) -> None:
    """Refuse architectures the HF model does not implement, naming the flag."""
    problems = []
    if getattr(args, "position_embedding_type", "rope") != "rope":
        problems.append(f"--position-embedding-type {args.position_embedding_type} (only rope)")
    if getattr(args, "rotary_percent", 1.0) != 1.0:
        problems.append(f"--rotary-percent {args.rotary_percent} (only 1.0)")
    if getattr(args, "add_bias_linear", False):
        problems.append("linear-layer biases (the run did not pass --disable-bias-linear)")
    for flag in ("rotary_interleaved", "use_rope_scaling", "add_qkv_bias",
                 "multi_latent_attention", "apply_layernorm_1p", "squared_relu", "quick_geglu"):
        if getattr(args, flag, False):
            problems.append(f"--{flag.replace('_', '-')} (not implemented by the HF model)")
    if getattr(args, "rotary_seq_len_interpolation_factor", None) not in (None, 1, 1.0):
        problems.append("--rotary-seq-len-interpolation-factor")
    if getattr(args, "mtp_num_layers", None):
        problems.append("--mtp-num-layers (multi-token prediction heads)")
    if getattr(args, "heterogeneous_layers_config_path", None):
        problems.append("--heterogeneous-layers-config-path")
    if not getattr(args, "num_experts", None):
        problems.append("--num-experts unset: not a MoE model")
    if getattr(args, "dirmoe_router", "dirichlet") != "dirichlet":
        problems.append(
            f"--dirmoe-router {args.dirmoe_router} (the HF model implements DirMoE routing)"
        )
    if problems:
        raise ValueError("cannot convert this checkpoint: unsupported " + "; ".join(problems))


def cpu_args(args: Namespace, *, single_rank: bool = True) -> Namespace:
    """A copy of a run's `args` that rebuilds its architecture on CPU in fp32 (local modules,
    sequential experts, no fusions), with TP = PP = EP = 1 unless `single_rank=False` (the saved
    layout is kept; used to build the multi-rank models of the tests). Refuses architectures
    the HF model does not implement."""
    _check_supported(args)
    local = copy.copy(args)
    overrides = dict(_CPU_FP32_ARGS, **(_SINGLE_RANK_ARGS if single_rank else {}))
    for key, value in overrides.items():
        setattr(local, key, value)
    local.dirmoe_use_cuda = False
    local.dirmoe_router = "dirichlet"  # `_check_supported` refused anything else
    if dirmoe_config_from_args(local).schedule_iters is None:
        raise ValueError(
            "the checkpoint's args set neither --dirmoe-schedule-iters nor --train-iters; "
            "the router temperature at the checkpoint's iteration is undefined"
        )
    return local


def ensure_single_rank_world() -> None:
    """A gloo world of one rank with Megatron's parallel state at size 1 (if none exists)."""
    import torch.distributed as dist

    from megatron_dirmoe.single_rank import init_single_rank

    init_single_rank("gloo")
    if dist.get_world_size() != 1:
        raise RuntimeError("the converter runs on one rank; launch it without torchrun")


def _vocab_size(args: Namespace, ckpt_dir: Optional[Path]) -> int:
    vocab = getattr(args, "padded_vocab_size", None)
    if vocab:
        return int(vocab)
    if ckpt_dir is not None:
        from megatron.core import dist_checkpointing

        meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
        key = "embedding.word_embeddings.weight"
        if key in meta:
            return int(meta[key].global_shape[0])
    raise ValueError("cannot tell the vocabulary size: args.padded_vocab_size is unset")


def build_cpu_model(args: Namespace, ckpt_dir: Optional[Path] = None, *,
                    single_rank: bool = True, pre_process: bool = True,
                    post_process: bool = True):
    """The run's GPT with DirMoE routers on CPU in fp32 (see `cpu_args`), built by the same
    builder as training: on one rank, or (``single_rank=False``) in the run's own TP/PP/EP
    layout (Megatron's parallel state must match; give the pipeline stage with `pre_process` /
    `post_process`)."""
    from megatron_dirmoe.training.builders import build_model_from_args

    local = cpu_args(args, single_rank=single_rank)
    local.padded_vocab_size = _vocab_size(args, ckpt_dir)
    local.max_position_embeddings = args.max_position_embeddings or args.seq_length
    return build_model_from_args(local, pre_process=pre_process, post_process=post_process)


# Where the local and the Transformer Engine specs save the same tensor under different names
# (key fragment in our one-rank local model, key fragment a TE-spec checkpoint may use instead).
# The local spec maps every layer's `pre_mlp_layernorm.` to the fused TE name
# `mlp.linear_fc1.layer_norm_`, but TE MoE layers keep a separate `pre_mlp_layernorm` (TENorm).
CHECKPOINT_KEY_ALIASES = (
    ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
    ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
)


def match_checkpoint_keys(sharded_state_dict: dict, ckpt_tensors: dict) -> None:
    """Point the model's sharded keys at the checkpoint's names (see `CHECKPOINT_KEY_ALIASES`)
    and refuse missing tensors or global shapes that differ, naming the tensor."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    missing, mismatched = [], []
    for sh in nested_values(sharded_state_dict):
        if not isinstance(sh, ShardedTensor):
            continue  # factories (e.g. gated fc1 split for resharding) resolve their own keys
        if sh.key not in ckpt_tensors:
            for ours, theirs in CHECKPOINT_KEY_ALIASES:
                if ours in sh.key and sh.key.replace(ours, theirs) in ckpt_tensors:
                    sh.key = sh.key.replace(ours, theirs)
                    break
            else:
                if sh.key not in missing:  # one entry per tensor, not per shard
                    missing.append(sh.key)
                continue
        saved = tuple(ckpt_tensors[sh.key].global_shape)
        if saved != tuple(sh.global_shape):
            line = f"{sh.key}: checkpoint {saved}, model {tuple(sh.global_shape)}"
            if line not in mismatched:  # one line per tensor, not per expert shard
                mismatched.append(line)
    if missing or mismatched:
        raise ValueError(
            "the checkpoint does not match the architecture in its args: "
            + (f"missing tensors {missing[:8]}; " if missing else "")
            + (f"shape mismatches {mismatched[:8]}" if mismatched else "")
        )


def load_megatron_model(path: Union[str, Path], iteration: Optional[int] = None):
    """Load a checkpoint saved with any layout into a one-rank CPU model in eval mode, its
    routers set to the checkpoint's iteration. Returns (model, args, iteration, ckpt_dir)."""
    from megatron.core import dist_checkpointing

    from megatron_dirmoe.router import set_router_iteration

    ckpt_dir = resolve_checkpoint_dir(path, iteration)
    args, ckpt_iteration = read_common_state(ckpt_dir)
    ensure_single_rank_world()
    model = build_cpu_model(args, ckpt_dir)
    metadata = dist_checkpointing.load_content_metadata(str(ckpt_dir))
    sharded = model.sharded_state_dict(**({"metadata": metadata} if metadata else {}))
    match_checkpoint_keys(sharded, dist_checkpointing.load_tensors_metadata(str(ckpt_dir)))
    loaded = dist_checkpointing.load({"model": sharded}, str(ckpt_dir))
    # strict: every parameter of the rebuilt model must come from the checkpoint.
    model.load_state_dict(loaded["model"], strict=True)
    model.eval()
    set_router_iteration(model, ckpt_iteration)
    return model, args, ckpt_iteration, ckpt_dir


def save_megatron_checkpoint(
    model, args: Namespace, iteration: int, save_dir: Union[str, Path]
) -> Path:
    """Save `model` (any parallel layout; call on every rank) in megatron.training's layout:
    ``save_dir/iter_XXXXXXX`` plus the tracker file. Only the model state is written (no
    optimizer): enough to convert, or to start a new run with --finetune / --no-load-optim."""
    import torch.distributed as dist

    from megatron_dirmoe.training.checkpointing import checkpoint_dir, dist_save, write_tracker

    save_dir = Path(save_dir)
    ckpt_dir = checkpoint_dir(save_dir, iteration)
    if not dist.is_initialized() or dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    state = {
        "args": args,
        "iteration": iteration,
        "checkpoint_version": 3.0,
        "model": model.sharded_state_dict(),
    }
    dist_save(state, ckpt_dir)  # the entry point's writer (also works without a GPU)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_tracker(save_dir, iteration)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir
