"""`DirMoELayer`: Megatron's `MoELayer` with a dispatcher that carries variable k.

`MoELayer.__init__` picks the token dispatcher from `config.moe_token_dispatcher_type`, so the
only way to use another dispatcher from a spec is a small subclass. See
:mod:`megatron_dirmoe.dispatcher` for why the stock all-to-all path cannot be used as is.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_dirmoe.dispatcher import VariableKAlltoAllTokenDispatcher

__all__ = ["DirMoELayer", "VARIABLE_K_DISPATCHERS"]

# Dispatcher types that can carry a variable number of experts per token.
VARIABLE_K_DISPATCHERS = ("alltoall", "allgather")


class DirMoELayer(MoELayer):
    """MoE layer for routers that pick a variable number of experts per token.

    ``alltoall`` uses :class:`VariableKAlltoAllTokenDispatcher`; ``allgather`` uses Megatron's
    all-gather dispatcher (it already sizes from the routing map); ``flex`` (DeepEP / HybridEP)
    is rejected because it re-derives a fixed top-k from the probabilities.
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
