"""Start-up validation of a parallel layout for DirMoE training.

Megatron discovers most impossible MoE layouts late (an assertion deep in a dispatcher on the
first step, a hang in an all-to-all) or not at all (a dispatcher that silently assumes a fixed
top-k). :func:`validate_layout` checks everything DirMoE adds to Megatron's own rules before a
model is built and raises `ValueError` naming the flag to change.

Accepts either a `TransformerConfig` or Megatron's parsed ``args`` namespace: both use the same
attribute names except the number of experts (``num_moe_experts`` vs ``num_experts``). In a
pretrain entry::

    args.moe_router_topk = megatron_topk_for(dirmoe_config, args.num_experts)
    validate_layout(args, dirmoe_config, world_size=args.world_size)
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_dirmoe.config import DirMoEConfig, flag_name

__all__ = ["validate_layout", "megatron_topk_for", "VARIABLE_K_DISPATCHERS"]

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
        raise ValueError(f"--num-experts = {num_experts!r}: DirMoE needs at least 2 experts")
    dirmoe_config.validate_for(num_experts)  # target k and max_active vs E, with flag names
    max_active = dirmoe_config.max_active_for(num_experts)

    tp = _get(config, "tensor_model_parallel_size", default=1)
    pp = _get(config, "pipeline_model_parallel_size", default=1)
    cp = _get(config, "context_parallel_size", default=1)
    ep = _get(config, "expert_model_parallel_size", default=1)
    etp = _get(config, "expert_tensor_parallel_size", default=tp)

    if num_experts % ep != 0:
        raise ValueError(
            f"--num-experts ({num_experts}) is not divisible by --expert-model-parallel-size "
            f"({ep}): every expert-parallel rank must hold the same number of experts"
        )
    if world_size is not None:
        if world_size % (tp * pp * cp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
                f"--pipeline-model-parallel-size x --context-parallel-size ({tp} x {pp} x {cp})"
            )
        if (world_size // pp) % (ep * etp) != 0:
            raise ValueError(
                f"world size / --pipeline-model-parallel-size ({world_size // pp}) is not "
                f"divisible by --expert-model-parallel-size x --expert-tensor-parallel-size "
                f"({ep} x {etp})"
            )

    dispatcher = _get(config, "moe_token_dispatcher_type", default="allgather")
    if dispatcher not in VARIABLE_K_DISPATCHERS:
        raise ValueError(
            f"--moe-token-dispatcher-type {dispatcher!r} cannot carry a variable number of "
            f"experts per token (it re-derives a fixed top-k); use one of {VARIABLE_K_DISPATCHERS}"
        )
    topk = _get(config, "moe_router_topk")
    if topk != max_active:
        raise ValueError(
            f"--moe-router-topk = {topk!r} must equal DirMoE's max_active ({max_active}; "
            f"{flag_name('max_active')} or min(E, 4k)): Megatron sizes buffers from it as the "
            "per-token upper bound"
        )
    if tp > 1 and not _get(config, "sequence_parallel", default=False):
        raise ValueError(
            f"--tensor-model-parallel-size {tp} with MoE layers needs --sequence-parallel "
            "(Megatron's MoE layer refuses TP > 1 without it in training)"
        )
    if _get(config, "moe_expert_capacity_factor") is not None:
        raise ValueError(
            "--moe-expert-capacity-factor is measured against --moe-router-topk (DirMoE's "
            f"max_active) and applied only by Megatron's TopKRouter; use "
            f"{flag_name('capacity_factor')}, which is measured against the target k"
        )
    if _get(config, "moe_pad_expert_input_to_capacity", default=False):
        raise ValueError(
            "--moe-pad-expert-input-to-capacity is not supported with DirMoE (it needs Megatron's "
            f"capacity factor); use {flag_name('capacity_factor')} for token dropping"
        )
    captured = _cuda_graph_moe_modules(config)
    if captured:
        raise ValueError(
            f"--cuda-graph-impl {_get(config, 'cuda_graph_impl')!r} would capture {captured}: "
            "DirMoE's variable-k dispatch has data-dependent shapes and one host sync per MoE "
            "layer; restrict --cuda-graph-modules to attn/mlp or use --cuda-graph-impl none"
        )


def _cuda_graph_moe_modules(config: Any) -> list:
    """What part of the MoE layer CUDA graphs would capture (empty: none)."""
    impl = _get(config, "cuda_graph_impl", default="none")
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
