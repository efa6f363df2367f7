"""The parallel-layout rules of DirMoE training, in one place.

Megatron discovers most impossible MoE layouts late (an assertion deep in a dispatcher on the
first step, a hang in an all-to-all) or not at all (a dispatcher that silently assumes a fixed
top-k). These checks run before a model is built and raise `LayoutError` (a `ValueError`) naming
the flag to change. The pretraining entry point calls :func:`check_layout` at start-up and
``python -m megatron_dirmoe.launch check`` (the Slurm scripts, ``DRY_RUN=1``) calls the same
function, so a layout the dry run accepts is one the job accepts.

* :func:`check_layout` -- a whole command line (Megatron's ``args``) on a world size: the dense
  and expert grids, the batch arithmetic, layers and heads per rank, and (for the DirMoE router)
  :func:`validate_layout`.
* :func:`validate_layout` -- what DirMoE adds to Megatron's rules; takes Megatron's ``args`` or a
  `TransformerConfig` (the same attribute names except ``num_experts`` / ``num_moe_experts``), for
  users who build their own models::

      args.moe_router_topk = megatron_topk_for(dirmoe_config, args.num_experts)
      validate_layout(args, dirmoe_config, world_size=args.world_size)

Rules (Megatron-Core 0.19 ``parallel_state.initialize_model_parallel`` and
``megatron.training.arguments.validate_args``):

* dense grid: world = TP x PP x CP x DP, so world % (TP x PP x CP) == 0;
* expert grid: world = ETP x EP x EDP x PP (ETP defaults to TP), so world % (ETP x EP x PP) == 0;
* experts split evenly: num_experts % EP == 0;
* batch: global % (micro x DP) == 0; the quotient is the number of micro-batches per step;
* num_layers % PP == 0 (unless uneven first/last stages are given), heads and query groups % TP;
* no context parallelism (CP = 1) yet;
* DirMoE: a variable-k token dispatcher, ``--moe-router-topk`` equal to DirMoE's ``max_active``,
  sequence parallelism when TP > 1, no Megatron capacity factor, no CUDA graphs over the MoE
  layer.

Pure Python (no torch, no Megatron): it runs on a login node.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from typing import Any, Optional

from megatron_dirmoe.config import DirMoEConfig, dirmoe_config_from_args, flag_name

__all__ = ["Layout", "LayoutError", "check_layout", "validate_layout", "megatron_topk_for",
           "moe_layer_numbers", "VARIABLE_K_DISPATCHERS"]


class LayoutError(ValueError):
    """A parallel layout or batch size Megatron or DirMoE cannot run."""


@dataclass(frozen=True)
class Layout:
    """A resolved parallel layout and the batch arithmetic of one training step."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    etp: int
    expert_dp: int
    num_experts: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    seq_length: int

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

# Token dispatchers that can carry a variable number of experts per token (kept free of Megatron
# imports so the CLI can validate before importing megatron.core; `moe_layer` re-exports it).
VARIABLE_K_DISPATCHERS = ("alltoall", "allgather")


def megatron_topk_for(dirmoe_config: DirMoEConfig, num_experts: int) -> int:
    """The value for Megatron's ``--moe-router-topk``: DirMoE's ``max_active``.

    Megatron sizes buffers and capacities from ``moe_router_topk``; for a variable-k router it
    must be the per-token upper bound.
    """
    return dirmoe_config.max_active_for(num_experts)


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def validate_layout(
    config: Any,
    dirmoe_config: DirMoEConfig,
    *,
    world_size: Optional[int] = None,
) -> None:
    """Raise `ValueError` (naming the flag) if DirMoE cannot train with this layout.

    Args:
        config: a Megatron `TransformerConfig` or the parsed Megatron ``args``; the parallel sizes
            (``tensor_model_parallel_size``, ``pipeline_model_parallel_size``,
            ``expert_model_parallel_size``, ``expert_tensor_parallel_size``,
            ``context_parallel_size``) are read from it.
        dirmoe_config: the DirMoE hyperparameters.
        world_size: number of ranks; when given, the sizes must tile it.

    Checks: at least two experts; target k and ``max_active`` within the number of experts; the
    experts divide evenly over expert-parallel ranks; a token dispatcher that carries variable k
    (``alltoall`` or ``allgather``, not ``flex``); ``--moe-router-topk`` equal to ``max_active``;
    sequence parallelism whenever TP > 1 (Megatron's MoE layer refuses TP without it in
    training); no Megatron capacity factor or pad-to-capacity (DirMoE's own
    ``--dirmoe-capacity-factor`` is measured against the target k); no CUDA graphs over the MoE
    layer (variable-k dispatch has data-dependent shapes).
    """
    num_experts = _get(config, "num_moe_experts", "num_experts")
    if not isinstance(num_experts, int) or num_experts < 2:
        raise LayoutError(f"--num-experts = {num_experts!r}: DirMoE needs at least 2 experts")
    try:
        dirmoe_config.validate_for(num_experts)  # target k and max_active vs E, with flag names
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc
    max_active = dirmoe_config.max_active_for(num_experts)

    tp = _get(config, "tensor_model_parallel_size", default=1)
    pp = _get(config, "pipeline_model_parallel_size", default=1)
    cp = _get(config, "context_parallel_size", default=1)
    ep = _get(config, "expert_model_parallel_size", default=1)
    etp = _get(config, "expert_tensor_parallel_size", default=tp)

    _check_grid(num_experts, world_size, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp)

    dispatcher = _get(config, "moe_token_dispatcher_type", default="allgather")
    if dispatcher not in VARIABLE_K_DISPATCHERS:
        raise LayoutError(
            f"--moe-token-dispatcher-type {dispatcher!r} cannot carry a variable number of "
            f"experts per token (it re-derives a fixed top-k); use one of {VARIABLE_K_DISPATCHERS}"
        )
    topk = _get(config, "moe_router_topk")
    if topk != max_active:
        raise LayoutError(
            f"--moe-router-topk = {topk!r} must equal DirMoE's max_active ({max_active}; "
            f"{flag_name('max_active')} or min(E, 4k)): Megatron sizes buffers from it as the "
            "per-token upper bound. Leave --moe-router-topk unset (the entry point sets it) and "
            f"change {flag_name('max_active')} instead"
        )
    if tp > 1 and not _get(config, "sequence_parallel", default=False):
        raise LayoutError(
            f"--tensor-model-parallel-size {tp} with MoE layers needs --sequence-parallel "
            "(Megatron's MoE layer refuses TP > 1 without it in training)"
        )
    if _get(config, "moe_expert_capacity_factor") is not None:
        raise LayoutError(
            "--moe-expert-capacity-factor is measured against --moe-router-topk (DirMoE's "
            f"max_active) and applied only by Megatron's TopKRouter; use "
            f"{flag_name('capacity_factor')}, which is measured against the target k"
        )
    if _get(config, "moe_pad_expert_input_to_capacity", default=False):
        raise LayoutError(
            "--moe-pad-expert-input-to-capacity is not supported with DirMoE (it needs Megatron's "
            f"capacity factor); use {flag_name('capacity_factor')} for token dropping"
        )
    captured = _cuda_graph_moe_modules(config)
    if captured:
        raise LayoutError(
            f"{_cuda_graph_flag(config)} would capture {captured}: "
            "DirMoE's variable-k dispatch has data-dependent shapes and one host sync per MoE "
            "layer; restrict --cuda-graph-modules to attn/mlp or use --cuda-graph-impl none"
        )


def _cuda_graph_impl(config: Any) -> str:
    """``--cuda-graph-impl``, or what Megatron's validate_args makes of the deprecated
    ``--enable-cuda-graph`` (local) / ``--external-cuda-graph`` (transformer_engine): this check
    runs before that conversion."""
    impl = _get(config, "cuda_graph_impl", default="none")
    if impl == "none":
        if _get(config, "enable_cuda_graph", default=False):
            return "local"
        if _get(config, "external_cuda_graph", default=False):
            return "transformer_engine"
    return impl


def _cuda_graph_flag(config: Any) -> str:
    impl = _cuda_graph_impl(config)
    if impl != _get(config, "cuda_graph_impl", default="none"):
        old = "--enable-cuda-graph" if impl == "local" else "--external-cuda-graph"
        return f"{old} (--cuda-graph-impl {impl!r})"
    return f"--cuda-graph-impl {impl!r}"


def _cuda_graph_moe_modules(config: Any) -> list:
    """What part of the MoE layer CUDA graphs would capture (empty: none)."""
    impl = _cuda_graph_impl(config)
    if impl == "none":
        return []
    if impl == "full_iteration":
        return ["the whole iteration"]
    modules = _get(config, "cuda_graph_modules", default=[])
    if isinstance(modules, (str, bytes)) or not isinstance(modules, (list, tuple)):
        modules = [modules]
    names = [getattr(m, "name", str(m)) for m in modules]
    if not names or names == ["full"]:  # empty scope = whole layer
        return ["whole layers"]
    return [n for n in names if n in ("moe", "moe_router", "moe_preprocess")]


def _check_grid(num_experts: int, world_size: Optional[int], *, tp: int, pp: int, cp: int,
                ep: int, etp: int) -> None:
    """The dense grid TP x PP x CP x DP and the expert grid ETP x EP x EDP x PP must both tile
    the world, and the experts split evenly over EP."""
    if num_experts % ep:
        raise LayoutError(
            f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep}: "
            "every expert-parallel rank must hold the same number of experts"
        )
    if world_size is None:
        return
    if world_size % (tp * pp * cp):
        raise LayoutError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size x --context-parallel-size ({tp} x {pp} x {cp} = "
            f"{tp * pp * cp})"
        )
    if world_size % (etp * ep * pp):
        raise LayoutError(
            f"world size {world_size} is not divisible by --expert-tensor-parallel-size x "
            f"--expert-model-parallel-size x --pipeline-model-parallel-size ({etp} x {ep} x {pp}"
            f" = {etp * ep * pp}): Megatron lays the experts out as ETP x EP x expert-DP x PP "
            f"over the same {world_size} ranks"
        )


def _require(flag: str, value) -> int:
    if value is None:
        raise LayoutError(f"{flag} is required (no preset or default sets it)")
    if value < 1:
        raise LayoutError(f"{flag} = {value} must be >= 1")
    return value


def check_layout(args: Any, world_size: int) -> Layout:
    """Resolve the layout of a pretraining command line (Megatron's ``args``, or the launcher's
    view of one) on `world_size` ranks; raise `LayoutError` naming the flag to change when
    Megatron or DirMoE cannot run it. ``moe_router_topk`` unset means the entry point's value,
    DirMoE's ``max_active``."""
    if world_size < 1:
        raise LayoutError(f"world size {world_size} must be >= 1")
    tp = _require("--tensor-model-parallel-size", args.tensor_model_parallel_size)
    pp = _require("--pipeline-model-parallel-size", args.pipeline_model_parallel_size)
    cp = _require("--context-parallel-size", args.context_parallel_size)
    ep = _require("--expert-model-parallel-size", args.expert_model_parallel_size)
    etp = _require("--expert-tensor-parallel-size", args.expert_tensor_parallel_size or tp)
    num_experts = _require("--num-experts", args.num_experts)
    mbs = _require("--micro-batch-size", args.micro_batch_size)
    num_layers = _require("--num-layers", args.num_layers)
    heads = _require("--num-attention-heads", args.num_attention_heads)
    seq = _require("--seq-length", args.seq_length)

    if cp > 1:
        # SDPAttention (local spec) has no context parallelism, and the CUDA path's batch and
        # metric code has not been run with CP: refuse it here, before any rank starts.
        raise LayoutError(
            f"--context-parallel-size {cp}: context parallelism is not supported by the DirMoE "
            "entry point yet; use --context-parallel-size 1 (shard long sequences with TP+SP)"
        )
    _check_grid(num_experts, world_size, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp)
    dp = world_size // (tp * pp * cp)
    expert_dp = world_size // (etp * ep * pp)
    gbs = args.global_batch_size if args.global_batch_size is not None else mbs * dp
    if gbs % (mbs * dp):
        raise LayoutError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size x data-parallel "
            f"size ({mbs} x {dp} = {mbs * dp}; DP = world {world_size} / (TP {tp} x PP {pp} x "
            f"CP {cp}))"
        )
    uneven = (getattr(args, "decoder_first_pipeline_num_layers", None) is not None
              or getattr(args, "decoder_last_pipeline_num_layers", None) is not None)
    if not uneven and num_layers % pp:
        raise LayoutError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
        )
    if heads % tp:
        raise LayoutError(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}"
        )
    groups = getattr(args, "num_query_groups", None)
    if groups is not None and getattr(args, "group_query_attention", False) and groups % tp:
        raise LayoutError(
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if getattr(args, "dirmoe_router", "dirichlet") == "dirichlet":
        try:
            cfg = dirmoe_config_from_args(args, num_experts)
        except ValueError as exc:
            raise LayoutError(str(exc)) from exc
        view = argparse.Namespace(**vars(args))
        if view.moe_router_topk is None:  # the entry point sets it to max_active
            view.moe_router_topk = megatron_topk_for(cfg, num_experts)
        view.sequence_parallel = bool(view.sequence_parallel)
        validate_layout(view, cfg, world_size=world_size)
    return Layout(
        world_size=world_size, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp, expert_dp=expert_dp,
        num_experts=num_experts, micro_batch_size=mbs, global_batch_size=gbs,
        num_microbatches=gbs // (mbs * dp), seq_length=seq,
    )


def moe_layer_numbers(moe_layer_freq: Any, num_layers: int) -> list[int]:
    """1-based numbers of the MoE layers under ``--moe-layer-freq``: an int (every n-th layer,
    from the first), a 0/1 list, or Megatron's pattern string such as ``"([1]*3+[0]*1)*3"``."""
    if isinstance(moe_layer_freq, str) and moe_layer_freq.strip().isdigit():
        moe_layer_freq = int(moe_layer_freq)
    if isinstance(moe_layer_freq, int):
        return [i + 1 for i in range(num_layers) if i % moe_layer_freq == 0]
    if isinstance(moe_layer_freq, str):
        moe_layer_freq = _eval_pattern(ast.parse(moe_layer_freq, mode="eval").body)
    if len(moe_layer_freq) != num_layers:
        raise LayoutError(f"--moe-layer-freq has {len(moe_layer_freq)} entries for "
                          f"--num-layers {num_layers}")
    return [i + 1 for i, is_moe in enumerate(moe_layer_freq) if is_moe]


def _eval_pattern(node: ast.AST):
    """Evaluate a list/int expression built from literals, ``+`` and ``*`` only."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_eval_pattern(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_pattern(node.left), _eval_pattern(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise LayoutError(f"--moe-layer-freq: cannot read {ast.dump(node)}")
