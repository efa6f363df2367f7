"""Token dispatch for a variable number of experts per token, and capacity-based dropping.

Why this exists: DirMoE's spike gates route each token to 1..max_active experts (padded tokens to
none), but Megatron-Core 0.19.2's dropless all-to-all dispatcher sizes its permutation buffer as
``num_out_tokens = num_tokens * moe_router_topk`` ("output size is static"). With fewer routed
(token, expert) pairs than that, the argsort-based permutation fills the buffer with unrouted
pairs, the expert compute sees rows it must not, and with EP/TP > 1 the buffer no longer matches
the all-to-all split sizes; with more pairs, tokens are silently dropped. The flex (DeepEP /
HybridEP) path converts probabilities with ``torch.topk(probs, moe_router_topk)`` and cannot carry
variable k at all. Megatron's all-gather dispatcher already counts routed pairs from the map and
is used unchanged.

`VariableKAlltoAllTokenDispatcher` takes the size from the routing map instead. The count is a
device tensor; it joins the device-to-host copy Megatron already makes for the all-to-all split
sizes (on its side stream). There is still exactly one host synchronisation per layer, as in
Megatron's dropless path; it moves to just before the first permutation, where Megatron's own
capacity-factor path puts it too. ``moe_router_topk`` keeps meaning "upper bound" (DirMoE sets it
to ``max_active``) for anything else in Megatron that sizes buffers from it.

Tensor name suffixes: T tokens (this rank), E experts.
"""

from __future__ import annotations

import math

import torch

from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

__all__ = ["VariableKAlltoAllTokenDispatcher", "expert_capacity", "drop_over_capacity"]


class VariableKAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's all-to-all dispatcher with the dropless output size taken from the routing
    map (any number of experts per token, including none for padded or dropped tokens).

    Everything else (split sizes, the all-to-all itself, TP/EP/SP handling, fused permutation,
    shared-expert overlap) is Megatron's.
    """

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Compute split sizes as Megatron does, then size the permutation from the map."""
        num_tokens_per_local_expert = super().preprocess(routing_map)
        if not self.drop_and_pad:
            # The real number of routed (token, expert) pairs, not num_tokens * topk. Copied to
            # the host with the split sizes at Megatron's device-to-host point; the permutation
            # needs it, so the one synchronisation happens before it.
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return num_tokens_per_local_expert


def expert_capacity(
    num_tokens: int, num_experts: int, target_k: int, capacity_factor: float
) -> int:
    """Tokens an expert may take: ``ceil(T * k / E * capacity_factor)``.

    Measured against DirMoE's *target* k (the expected number of active experts), not against
    ``max_active``: a capacity factor of 1.0 then means "the average load at the target sparsity",
    as it does for top-k routers.
    """
    return math.ceil(num_tokens * target_k / num_experts * capacity_factor)


def drop_over_capacity(
    probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` tokens per expert, dropping the lowest routing probabilities.

    Returns ``(probs_TE, routing_map_TE)`` with dropped (token, expert) pairs removed from the map
    and zeroed in the probabilities. The kept probabilities are not renormalised (a token that
    loses an expert loses that share of its output, as in Megatron's token dropping), and a token
    may end with no expert at all (its MoE output is zero; the residual carries it). Shapes stay
    static, so this adds no host synchronisation.
    """
    num_tokens = routing_map_TE.shape[0]
    if capacity >= num_tokens:
        return probs_TE, routing_map_TE
    # Unrouted pairs score -1 (< any probability) so they are never "kept" over routed ones.
    scores_TE = probs_TE.detach().masked_fill(~routing_map_TE, -1.0)
    kept_CE = scores_TE.topk(capacity, dim=0, sorted=False).indices
    keep_TE = torch.zeros_like(routing_map_TE).scatter_(0, kept_CE, True) & routing_map_TE
    # Multiply rather than index so that losses attached to `probs_TE` keep their backward.
    return probs_TE * keep_TE, keep_TE
