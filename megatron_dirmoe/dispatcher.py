"""Token dispatch for a variable number of experts per token.

Why this exists: DirMoE's spike gates route each token to 1..max_active experts, but
Megatron-Core 0.19.2's dropless all-to-all dispatcher sizes its permutation buffer as
``num_out_tokens = num_tokens * moe_router_topk`` ("output size is static"). With fewer routed
pairs than that, the argsort-based permute pads the buffer with unrouted (token, expert) pairs
and the expert compute sees rows it must not; with more, tokens are silently dropped. The
flex/DeepEP path converts probabilities with ``torch.topk(probs, router_topk)`` and cannot carry
variable k at all.

`VariableKAlltoAllTokenDispatcher` takes the size from the routing map instead. The number of
routed pairs is a device tensor, so it joins the device-to-host copy Megatron already makes for
the EP split sizes (on its side stream); the one synchronisation just moves to before the first
permutation, as Megatron itself does when a capacity factor is set. Megatron's all-gather
dispatcher already counts routed pairs from the map and is used unchanged.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

__all__ = ["VariableKAlltoAllTokenDispatcher"]


class VariableKAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's all-to-all dispatcher with the dropless output size taken from the routing
    map (any number of experts per token, including none for padded tokens)."""

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Compute split sizes as Megatron does, then size the permutation from the map."""
        num_tokens_per_local_expert = super().preprocess(routing_map)
        if not self.drop_and_pad:
            # The real number of (token, expert) pairs, not num_tokens * moe_router_topk.
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return num_tokens_per_local_expert
