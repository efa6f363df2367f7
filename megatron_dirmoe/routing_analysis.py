"""Routing analysis on held-out tokens, for any Megatron router (DirMoE, TopK, Sinkhorn).

`record_routing` runs a model in eval mode over batches and collects, per MoE layer, which
experts every token was routed to (the routing map the router handed to the dispatcher) next to
the token's id. `summarize_layer` turns that into the numbers the router comparison reports:

- **active experts per token**: mean routed experts per token (TopK: exactly k);
- **load**: fraction of routed (token, expert) pairs per expert; its coefficient of variation
  (std / mean over experts; 0 = perfectly balanced), the Simpson index sum_e f_e^2 and its
  inverse, the effective number of experts (E when balanced, 1 when one expert takes all);
- **specialisation**: mutual information I(C; X) in bits between a token's class C and the
  expert X it is routed to, where each token spreads unit mass over its routed experts and the
  classes are the `num_classes - 1` most frequent token ids in the analysed data plus one class
  for all others (a fixed small alphabet keeps the plug-in estimate's upward bias, about
  (|C|-1)(E-1) / (2 N ln 2) bits, small). Also normalised by H(X) (the share of the expert
  choice that the token identity explains; meaningless when H(X) ~ 0, i.e. one expert takes
  every token). Token-independent routing scores 0;
- **routing entropy**: mean entropy (bits) of a token's routing probabilities.

`TrainingLoad` follows the load while a model trains: the effective experts of every MoE layer
per optimizer step, for any router (Megatron logs no load for its own routers).

Pure torch apart from `record_routing` and `TrainingLoad`, which only need the model's routers
to be Megatron `Router` modules (forward returns ``(probs, routing_map)`` with tokens in [s, b]
order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

__all__ = [
    "LayerRouting",
    "TrainingLoad",
    "effective_experts",
    "record_routing",
    "token_classes",
    "mutual_information_bits",
    "summarize_layer",
]


@dataclass
class LayerRouting:
    """What one MoE layer routed over the analysed tokens."""

    layer: int  # 1-based layer number
    routing_map_TE: torch.Tensor  # bool
    probs_TE: torch.Tensor  # fp32, zero off the routing map
    token_ids_T: torch.Tensor  # int64


@torch.no_grad()
def record_routing(model, batches: Iterable[dict]) -> tuple[list[LayerRouting], Optional[float]]:
    """Run `model` in eval mode over `batches` (dicts with ``tokens`` and ``position_ids``
    [b, s], optionally ``labels`` and ``loss_mask``) and return each MoE layer's routing, in
    layer order, and the mean LM loss over the masked tokens (None without labels). The
    model's mode is restored."""
    from megatron.core.transformer.moe.router import Router

    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers:
        raise ValueError("the model has no MoE router to analyse")
    maps: dict[int, list] = {}
    probs: dict[int, list] = {}
    hooks = []

    def hook(module, _inputs, output):
        p, rmap = output[0], output[1]
        maps.setdefault(module.layer_number, []).append(rmap.detach().bool().cpu())
        probs.setdefault(module.layer_number, []).append(p.detach().float().cpu())

    for router in routers:
        hooks.append(router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    token_ids = []
    loss_sum, loss_count = 0.0, 0.0
    try:
        for batch in batches:
            tokens = batch["tokens"]
            labels = batch.get("labels")
            out = model(tokens, batch["position_ids"], None, labels=labels)
            if labels is not None:
                mask = batch.get("loss_mask", torch.ones_like(labels)).float()
                loss_sum += float((out.float() * mask).sum())
                loss_count += float(mask.sum())
            # Megatron's MoE layers see tokens as [s, b] flattened s-major.
            token_ids.append(tokens.t().reshape(-1).cpu())
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    ids_T = torch.cat(token_ids)
    layers = []
    for layer in sorted(maps):
        rmap = torch.cat(maps[layer])
        if rmap.shape[0] != ids_T.shape[0]:
            raise RuntimeError(f"layer {layer}: {rmap.shape[0]} routed tokens for "
                               f"{ids_T.shape[0]} input tokens")
        layers.append(LayerRouting(layer, rmap, torch.cat(probs[layer]), ids_T))
    return layers, (loss_sum / loss_count if loss_count else None)


def effective_experts(load_E: torch.Tensor) -> float:
    """1 / Simpson index of a load vector: E when balanced, 1 when one expert takes all (nan
    for no load)."""
    load_E = load_E.double()
    total = load_E.sum()
    if total <= 0:
        return float("nan")
    return float(total * total / (load_E * load_E).sum())


class TrainingLoad:
    """Routed (token, expert) pairs per expert of every MoE layer in `model`'s training
    forwards, for any Megatron router: `pop()` after each optimizer step returns each layer's
    effective experts (`effective_experts`) over that step's micro-batches and starts again.

    Only forwards that build a graph count, as Megatron guards its routers' statistics: an
    evaluation pass or the no-grad first pass of activation recompute would count twice. The
    routing map covers every token the router saw (padding included). Call `remove()` to drop
    the hooks."""

    def __init__(self, model) -> None:
        from megatron.core.transformer.moe.router import Router

        self._loads: dict[int, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook)
                         for module in model.modules() if isinstance(module, Router)]
        if not self._handles:
            raise ValueError("the model has no MoE router to follow")

    def _hook(self, module, _inputs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        load_E = output[1].detach().sum(dim=0, dtype=torch.float32)
        previous = self._loads.get(module.layer_number)
        self._loads[module.layer_number] = load_E if previous is None else previous + load_E

    def pop(self) -> list[float]:
        """Effective experts per MoE layer (layer order) since the last call; [] if no
        training forward ran."""
        values = [effective_experts(self._loads[layer].cpu()) for layer in sorted(self._loads)]
        self._loads.clear()
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def token_classes(token_ids_T: torch.Tensor, num_classes: int = 65) -> torch.Tensor:
    """Class of every token: rank 0..num_classes-2 for the most frequent ids in
    `token_ids_T`, num_classes-1 for every other id."""
    ids, counts = torch.unique(token_ids_T, return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    frequent = ids[order[: num_classes - 1]]
    lookup = torch.full((int(ids.max()) + 1,), num_classes - 1, dtype=torch.long)
    lookup[frequent] = torch.arange(frequent.numel())
    return lookup[token_ids_T]


def mutual_information_bits(joint_CX: torch.Tensor) -> float:
    """Plug-in mutual information (bits) of a joint count/mass table [C, X]."""
    joint = joint_CX.double()
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    pc = p.sum(1, keepdim=True)
    px = p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * torch.log2(p[nz] / (pc * px)[nz])).sum())


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    return -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(-1)


def summarize_layer(routing: LayerRouting, num_classes: int = 65,
                    classes_T: Optional[torch.Tensor] = None) -> dict:
    """The comparison's per-layer numbers (see the module docstring)."""
    rmap = routing.routing_map_TE.float()
    num_tokens, num_experts = rmap.shape
    active_T = rmap.sum(-1)
    load_E = rmap.sum(0)
    frac_E = load_E / load_E.sum().clamp(min=1.0)
    simpson = float((frac_E * frac_E).sum())
    mean_load = load_E.mean()
    cv = float(load_E.std(unbiased=False) / mean_load) if mean_load > 0 else float("nan")

    if classes_T is None:
        classes_T = token_classes(routing.token_ids_T, num_classes)
    # Each token spreads unit mass over its routed experts.
    mass_TE = rmap / active_T.clamp(min=1.0)[:, None]
    joint_CX = torch.zeros(int(classes_T.max()) + 1, num_experts, dtype=torch.float64)
    joint_CX.index_add_(0, classes_T, mass_TE.double())
    mi = mutual_information_bits(joint_CX)
    h_x = float(_entropy_bits(joint_CX.sum(0) / joint_CX.sum()))

    probs = routing.probs_TE / routing.probs_TE.sum(-1, keepdim=True).clamp(min=1e-30)
    return {
        "layer": routing.layer,
        "tokens": num_tokens,
        "active_experts": float(active_T.mean()),
        "load_fraction": frac_E.tolist(),
        "load_cv": cv,
        "load_simpson": simpson,
        "effective_experts": effective_experts(load_E),
        "mi_bits": mi,
        "mi_normalized": mi / h_x if h_x > 0 else 0.0,
        "routing_entropy_bits": float(_entropy_bits(probs).mean()),
        "max_entropy_bits": math.log2(num_experts),
    }
