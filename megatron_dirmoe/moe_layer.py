"""`DirMoELayer`: Megatron's `MoELayer` with a dispatcher that carries variable k.

`MoELayer.__init__` picks the token dispatcher from `config.moe_token_dispatcher_type`, so the
only way to use another dispatcher from a spec is a small subclass. See
:mod:`megatron_dirmoe.dispatcher` for why the stock all-to-all path cannot be used as is. The
layer also applies DirMoE's optional capacity factor (`DirMoEConfig.capacity_factor`) between
routing and dispatch, so the router stays a pure routing module.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_dirmoe.dispatcher import (
    VariableKAlltoAllTokenDispatcher,
    drop_over_capacity,
    expert_capacity,
)
from megatron_dirmoe.layout import VARIABLE_K_DISPATCHERS

__all__ = ["DirMoELayer", "VARIABLE_K_DISPATCHERS"]


class DirMoELayer(MoELayer):
    """MoE layer for routers that pick a variable number of experts per token.

    ``alltoall`` uses :class:`~megatron_dirmoe.dispatcher.VariableKAlltoAllTokenDispatcher`;
    ``allgather`` uses Megatron's all-gather dispatcher (it already sizes from the routing map);
    ``flex`` (DeepEP / HybridEP) is rejected because it re-derives a fixed top-k from the
    probabilities.

    If the router carries a `DirMoEConfig` with ``capacity_factor`` set, each expert takes at
    most ``ceil(T * target_k / E * capacity_factor)`` of this rank's T tokens (padded tokens
    included in T, as in Megatron, so the capacity needs no host sync) and the pairs with the
    lowest probabilities are dropped before dispatch. Like Megatron's token dropping, capacity
    is per source rank: with EP each rank drops before the all-to-all.
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 is_mtp_layer=False, name=None):
        if config.moe_token_dispatcher_type not in VARIABLE_K_DISPATCHERS:
            raise ValueError(
                f"--moe-token-dispatcher-type {config.moe_token_dispatcher_type!r} cannot carry a "
                f"variable number of experts per token; use one of {VARIABLE_K_DISPATCHERS}"
            )
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
            name=name,
        )
        if config.moe_token_dispatcher_type == "alltoall":
            self.token_dispatcher = VariableKAlltoAllTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection or get_default_pg_collection(),
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
        dirmoe_config = getattr(self.router, "dirmoe_config", None)
        self.capacity_factor = getattr(dirmoe_config, "capacity_factor", None)
        self.target_k = getattr(dirmoe_config, "target_k", None)

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route with the router, then drop pairs over the expert capacity (if configured)."""
        probs_TE, routing_map_TE = super().route(hidden_states, padding_mask)
        if self.capacity_factor is not None:
            capacity = expert_capacity(
                routing_map_TE.shape[0], self.config.num_moe_experts, self.target_k,
                self.capacity_factor,
            )
            probs_TE, routing_map_TE = drop_over_capacity(probs_TE, routing_map_TE, capacity)
        return probs_TE, routing_map_TE
