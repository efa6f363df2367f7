"""Megatron's own routers made device-agnostic, for baselines on the same pipeline.

Megatron's `Router.gating` moves CPU weights to `torch.cuda.current_device()` on first use, and
`TopKRouter` allocates its aux-loss-free expert-bias buffers on the current CUDA device, so neither
runs on a CPU-only machine. `DeviceAgnosticTopKRouter` changes only where tensors live: the gating
GEMM (Megatron's `router_gating_linear`, which saves the input in its own dtype), routing, aux
losses and the expert-bias rule are Megatron's. On a GPU it computes and saves exactly what
`TopKRouter` does, so benchmarks compare against stock Megatron.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core.transformer.moe.moe_utils import (
    get_default_pg_collection,
    get_updated_expert_bias,
    router_gating_linear,
)
from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["DeviceAgnosticTopKRouter", "update_expert_biases"]


class DeviceAgnosticTopKRouter(TopKRouter):
    """`TopKRouter` whose gating and expert-bias buffers live where its weights are."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        expert_bias = config.moe_router_enable_expert_bias
        if expert_bias:
            # TopKRouter would allocate these on torch.cuda.current_device(); build them here.
            config = dataclasses.replace(config, moe_router_enable_expert_bias=False)
        super().__init__(
            config=config,
            pg_collection=pg_collection or get_default_pg_collection(),
            is_mtp_layer=is_mtp_layer,
        )
        if expert_bias:
            self.config = dataclasses.replace(config, moe_router_enable_expert_bias=True)
            self.enable_expert_bias = True
            num_experts = config.num_moe_experts
            del self.local_tokens_per_expert, self.expert_bias  # TopKRouter set them to None
            self.register_buffer(
                "local_tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32),
                persistent=False,
            )
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """`Router.gating` without moving the weights to CUDA: Megatron's
        `router_gating_linear` in the configured router dtype."""
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        return router_gating_linear(input, self.weight, self.bias, router_dtype)


def update_expert_biases(model) -> int:
    """Aux-loss-free balancing step (DeepSeek-V3) for every router with an expert bias in
    `model` (a module or list of chunks): what Megatron's `finalize_model_grads` does once per
    global batch, for training loops that do not call it. Returns the number of routers."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if getattr(module, "expert_bias", None) is None or not module.training:
                continue
            rate = module.config.moe_router_bias_update_rate
            module.expert_bias.data = get_updated_expert_bias(
                module.local_tokens_per_expert, module.expert_bias, rate, module.tp_dp_cp_group
            )
            module.local_tokens_per_expert.zero_()
            count += 1
    return count
