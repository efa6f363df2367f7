"""Start-up layout validation: impossible layouts fail with the flag to change."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.layout import megatron_topk_for, validate_layout

CFG = DirMoEConfig(target_k=2)  # max_active = min(E, 4k) = 8 for E = 8


def _args(**overrides):
    """A Megatron-args-like namespace of a valid layout (8 ranks: TP2 x EP2 x DP2, SP)."""
    args = dict(
        num_experts=8,
        moe_router_topk=8,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        expert_model_parallel_size=2,
        expert_tensor_parallel_size=1,
        sequence_parallel=True,
        moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=None,
        moe_pad_expert_input_to_capacity=False,
        cuda_graph_impl="none",
        cuda_graph_modules=[],
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def test_valid_layouts_pass():
    validate_layout(_args(), CFG, world_size=8)
    validate_layout(_args(moe_token_dispatcher_type="allgather"), CFG, world_size=8)
    validate_layout(_args(tensor_model_parallel_size=1, sequence_parallel=False), CFG)
    # Attention-only CUDA graphs leave the MoE layer alone.
    validate_layout(_args(cuda_graph_impl="local", cuda_graph_modules=["attn"]), CFG)


def test_topk_is_max_active():
    assert megatron_topk_for(CFG, 8) == 8
    assert megatron_topk_for(DirMoEConfig(target_k=1), 8) == 4
    assert megatron_topk_for(DirMoEConfig(target_k=1, max_active=2), 8) == 2


@pytest.mark.parametrize(
    "overrides, cfg, world_size, flag",
    [
        (dict(expert_model_parallel_size=3), CFG, None, "--expert-model-parallel-size"),
        (dict(), DirMoEConfig(target_k=2, max_active=9), None, "--dirmoe-max-active"),
        (dict(), DirMoEConfig(target_k=9), None, "--dirmoe-target-k"),
        (dict(num_experts=1), CFG, None, "--num-experts"),
        (dict(moe_token_dispatcher_type="flex"), CFG, None, "--moe-token-dispatcher-type"),
        (dict(moe_router_topk=2), CFG, None, "--moe-router-topk"),
        (dict(sequence_parallel=False), CFG, None, "--sequence-parallel"),
        (dict(moe_expert_capacity_factor=1.0), CFG, None, "--dirmoe-capacity-factor"),
        (dict(moe_pad_expert_input_to_capacity=True), CFG, None,
         "--moe-pad-expert-input-to-capacity"),
        (dict(cuda_graph_impl="local", cuda_graph_modules=[]), CFG, None, "--cuda-graph-impl"),
        (dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=["attn", "moe_router"]),
         CFG, None, "--cuda-graph-modules"),
        (dict(), CFG, 3, "--tensor-model-parallel-size"),
        (dict(expert_model_parallel_size=8), CFG, 4, "--expert-model-parallel-size"),
    ],
)
def test_impossible_layouts_name_the_flag(overrides, cfg, world_size, flag):
    with pytest.raises(ValueError, match=flag):
        validate_layout(_args(**overrides), cfg, world_size=world_size)


def test_accepts_a_transformer_config():
    from tiny_config import tiny_transformer_config

    config = tiny_transformer_config(moe_router_topk=8, moe_token_dispatcher_type="alltoall")
    validate_layout(config, CFG, world_size=1)
    with pytest.raises(ValueError, match="--moe-router-topk"):
        validate_layout(tiny_transformer_config(moe_router_topk=2), CFG)


def test_moe_layer_numbers_int_list_and_pattern():
    from megatron_dirmoe.layout import LayoutError, moe_layer_numbers

    assert moe_layer_numbers(1, 3) == [1, 2, 3]
    assert moe_layer_numbers(2, 5) == [1, 3, 5]
    assert moe_layer_numbers("2", 4) == [1, 3]
    assert moe_layer_numbers([0, 1, 1, 0], 4) == [2, 3]
    assert moe_layer_numbers("([1]*3+[0]*1)*2", 8) == [1, 2, 3, 5, 6, 7]
    with pytest.raises(LayoutError, match="--moe-layer-freq has 2 entries"):
        moe_layer_numbers([1, 0], 4)
    with pytest.raises(LayoutError, match="--moe-layer-freq"):
        moe_layer_numbers("__import__('os')", 4)
