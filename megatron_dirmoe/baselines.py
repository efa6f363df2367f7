"""Megatron's own routers made device-agnostic, for baselines on the same pipeline.

Megatron's `Router.gating` moves CPU weights to `torch.cuda.current_device()` on first use, so
`TopKRouter` cannot run on a CPU-only machine. `DeviceAgnosticTopKRouter` changes only that:
routing, aux losses and expert bias are Megatron's. On a GPU it behaves exactly like
`TopKRouter` (the weights are already on the GPU).
"""

from __future__ import annotations

import torch

from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter

__all__ = ["DeviceAgnosticTopKRouter"]


class DeviceAgnosticTopKRouter(TopKRouter):
    """`TopKRouter` whose gating runs where its weights are (CPU or CUDA)."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        super().__init__(
            config=config,
            pg_collection=pg_collection or get_default_pg_collection(),
            is_mtp_layer=is_mtp_layer,
        )

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits in the configured router dtype, without moving weights."""
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        return router_gating_linear(input, self.weight, self.bias, router_dtype)
