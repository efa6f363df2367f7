"""Shared fixtures: a one-process gloo world with Megatron's parallel state, tiny configs."""

from __future__ import annotations

import os
import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Initialise torch.distributed (gloo, world size 1) and Megatron's model-parallel state once
    per test session; CPU tests build Megatron modules inside it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    yield
    # Leave the world up: several test modules share it within one session.


def tiny_transformer_config(**overrides):
    """A 2-layer, hidden-64 MoE TransformerConfig that runs on CPU in fp32."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=4,
        moe_ffn_hidden_size=128,
        ffn_hidden_size=128,
        use_cpu_initialization=True,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
