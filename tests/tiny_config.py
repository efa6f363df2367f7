"""Tiny Megatron configs shared by the CPU and GPU tests."""

from __future__ import annotations

import torch


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
