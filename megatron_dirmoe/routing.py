"""Pure DirMoE routing math (torch only: no Megatron, no torch.distributed).

The Megatron router (`megatron_dirmoe.router.DirichletRouter`) and the Hugging Face model
(`megatron_dirmoe.hf`) both call these functions, so training and inference cannot drift apart.
This file is copied verbatim next to exported Hugging Face checkpoints; keep it torch-only.

Shape suffixes: T tokens, E experts, D hidden size.
All math is fp32 regardless of the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "RULES",
    "SLABS",
    "UNNORMALIZED_WEIGHTS",
    "RoutingResult",
    "bernoulli_kl",
    "balance_penalty",
    "firing_sums",
    "cosine_schedule",
    "exponential_schedule",
    "spike_bias_init",
    "dirichlet_kl",
    "route",
    "routing_regularizers",
    "slab_heads",
    "softplus_inverse",
    "routing_statistics",
    "routing_statistics_width",
    "STAT_SUMS",
]

# Keeps U ~ Uniform(0, 1) away from 0 and 1 so the logistic noise log U - log(1 - U) stays finite.
_UNIFORM_EPS = 1e-6

# Routing rules (which experts a token goes to):
# - "gate":   expert i is active when its gate is more likely on than off, pi_i = sigmoid(l_i / tau)
#             >= 1/2 (l_i >= 0): the mode of the spike, in training and evaluation alike, so the
#             count trained is the count served (the calibrated recipe).
# - "weight": z = sigmoid((l + g) / tau) and expert i is active when the combined weight
#             w_i = normalize(z * theta + leak)_i >= route_threshold (the paper's relaxed weights;
#             there the slab decides as much as the spike, and P(z_i >= 1/2) = sigmoid(l_i) is
#             not pi once tau != 1).
RULES = ("gate", "weight")

# Slabs (how the Dirichlet posterior over the experts' shares is parameterised):
# - "gate":  alpha_q = lambda_q * softmax(gate scores): the posterior mean is the softmax of the
#            token's own (centred) gate logits, so one head decides which experts fire and how
#            their weights compare, and the LM loss reaches the gates through the weights.
# - "head":  alpha_q = lambda_q * softmax(v) from a separate slab head v (the paper notes; release
#            0.1's calibrated recipe, where the gates learn through a straight-through relaxed
#            Bernoulli(pi) sample instead).
# - "gated": alpha_q = lambda_q * (z * alpha_hi(x) + (1 - z) * alpha_lo(x)) with two concentration
#            heads alpha_hi/lo(x) = softplus(head + bias): the posterior conditioned on the relaxed
#            gates z (the paper's structure).
SLABS = ("gate", "head", "gated")

# The weight of an active expert when the weights are not renormalised over the active set
# (rule "gate", slab "gate"; k = 1 in the calibrated recipe):
# - "sigmoid":        sigmoid of the expert's centred gate logit, its own confidence whatever the
#                     other experts' logits (as DeepSeek-V3's sigmoid router scales its experts);
# - "posterior-mean": its share of the Dirichlet posterior (mean), softmax over all E experts,
#                     which starts at 1/E (releases before the sigmoid weight).
UNNORMALIZED_WEIGHTS = ("sigmoid", "posterior-mean")


def slab_heads(slab: str) -> int:
    """Slab logits per expert that the router's GEMM must produce for `slab`: 0, 1 or 2."""
    if slab not in SLABS:
        raise ValueError(f"unknown slab {slab!r}; allowed {SLABS}")
    return {"gate": 0, "head": 1, "gated": 2}[slab]


def softplus_inverse(value: float) -> float:
    """x with softplus(x) = value (> 0): the bias that starts a concentration head at `value`."""
    return value + math.log(-math.expm1(-value))


# ---------------------------------------------------------------------- schedules
def cosine_schedule(start: float, end: float, iteration: int, horizon: int) -> float:
    """`end + (start - end) * (1 + cos(pi * min(t, T) / T)) / 2`; `start` at t=0, `end` from t=T."""
    t = min(max(int(iteration), 0), horizon)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t / horizon))


def exponential_schedule(start: float, end: float, iteration: int, horizon: int) -> float:
    """Geometric interpolation `start * (end / start) ** (min(t, T) / T)`."""
    t = min(max(int(iteration), 0), horizon)
    return start * (end / start) ** (t / horizon)


def spike_bias_init(target_k: int, num_experts: int, tau0: float) -> float:
    """`tau_0 * logit(k / E)`: with centred logits every gate then fires with probability k/E,
    so the expected number of active experts sum_i pi_i is k at initialisation."""
    p = target_k / num_experts
    if p >= 1.0:  # k == E: every expert always active; a large finite bias keeps pi ~ 1.
        return tau0 * 20.0
    return tau0 * math.log(p / (1.0 - p))


# ---------------------------------------------------------------------- Dirichlet KL
def dirichlet_kl(alpha_q_TE: torch.Tensor, alpha_p_TE: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(Dir(alpha_q) || Dir(alpha_p)) per row, shape [T]."""
    sum_q_T = alpha_q_TE.sum(-1)
    sum_p_T = alpha_p_TE.sum(-1)
    return (
        torch.lgamma(sum_q_T)
        - torch.lgamma(alpha_q_TE).sum(-1)
        - torch.lgamma(sum_p_T)
        + torch.lgamma(alpha_p_TE).sum(-1)
        + ((alpha_q_TE - alpha_p_TE) * (torch.digamma(alpha_q_TE) - torch.digamma(sum_q_T)[:, None])).sum(-1)
    )


# ---------------------------------------------------------------------- balance
# sigmoid(-80) ~ 1.8e-35 is a normal fp32 number: firing rates computed from logits clamped to
# +-80 (forward only) never underflow to 0 or round to 1.
_RATE_LOGIT_CLAMP = 80.0


def bernoulli_kl(p: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bern(p) || Bern(q)); p is clamped to (1e-6, 1 - 1e-6) so 0 and 1 are finite."""
    p = p.clamp(1e-6, 1.0 - 1e-6)
    q = torch.as_tensor(q, dtype=p.dtype, device=p.device)
    return p * (torch.log(p) - torch.log(q)) + (1.0 - p) * (torch.log1p(-p) - torch.log1p(-q))


def firing_sums(logits_TE: torch.Tensor, tau: float | torch.Tensor,
                valid_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[2, E]: sum_t pi_te and sum_t (1 - pi_te) over real tokens, pi = sigmoid(l / tau).

    l / tau is clamped to +-80 in the forward only (the gradient passes unchanged), so a gate
    driven far below or above every threshold keeps a tiny, exactly representable firing rate and
    a gradient: the balance term can always bring it back. The two sums are computed separately
    so that neither rate is a difference of nearly equal numbers."""
    x_TE = logits_TE.float() / tau
    x_TE = x_TE + (x_TE.clamp(-_RATE_LOGIT_CLAMP, _RATE_LOGIT_CLAMP) - x_TE).detach()
    on_TE, off_TE = torch.sigmoid(x_TE), torch.sigmoid(-x_TE)
    if valid_T is not None:
        on_TE, off_TE = on_TE * valid_T[:, None], off_TE * valid_T[:, None]
    return torch.stack([on_TE.sum(dim=0), off_TE.sum(dim=0)])


def balance_penalty(rate_E: torch.Tensor, off_rate_E: torch.Tensor, target_k: int) -> torch.Tensor:
    """Aggregate spike prior: sum_e KL(Bern(k / E) || Bern(pbar_e)), from each gate's mean firing
    rate pbar_e = mean_t pi_te and 1 - pbar_e (see `firing_sums`).

    The per-token KL of a spike posterior against its prior splits into the mutual information
    between token and gate plus a divergence between the *aggregate* posterior and the prior.
    Penalising only the aggregate part asks every gate to fire for a k/E share of the tokens
    (balanced load) without pulling individual tokens back to the prior (which would erase
    specialisation). The prior-first direction is used: near balance it equals the posterior-first
    KL to second order, but its gradient with respect to the logit of pbar_e is pbar_e - k/E,
    which does not vanish for a gate that never fires (or always fires), so no expert can die.
    """
    num_experts = rate_E.shape[-1]
    q = min(target_k / num_experts, 1.0 - 1e-6)
    rate_E, off_rate_E = rate_E.float(), off_rate_E.float()
    return (q * (math.log(q) - torch.log(rate_E))
            + (1.0 - q) * (math.log1p(-q) - torch.log(off_rate_E))).sum(-1)


# ---------------------------------------------------------------------- routing
@dataclass
class RoutingResult:
    """What one routing call produces (all [T, E] fp32 unless noted)."""

    probs_TE: torch.Tensor  # weights handed to the dispatcher, zero off the active set
    routing_map_TE: torch.Tensor  # bool, 1..max_active True per row
    logits_TE: torch.Tensor  # l: centred spike logits plus the spike bias
    gate_prob_TE: torch.Tensor  # pi = sigmoid(l / tau): gate firing probability
    gate_TE: torch.Tensor  # z: relaxed Bernoulli sample (training) or pi (eval)
    alpha_q_TE: torch.Tensor  # posterior Dirichlet concentration
    weights_TE: torch.Tensor  # w: combined, leaked, normalised weights (rule "gate": = probs)
    fallback_T: torch.Tensor  # bool [T]: no expert passed the rule -> fallback (top fallback_k)
    capped_T: torch.Tensor  # bool [T]: more than max_active passed -> cut to the largest


def route(
    spike_logits_TE: torch.Tensor,
    slab_logits_TS: Optional[torch.Tensor],
    spike_bias_E: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    posterior_scale: float,
    alpha_floor: float,
    alpha_ceiling: float,
    leak: float,
    route_threshold: float,
    max_active: int,
    renormalize: bool = True,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
    rule: str = "weight",
    fallback_k: int = 1,
    slab: str = "head",
    slab_bias_S: Optional[torch.Tensor] = None,
    route_bias: Optional[torch.Tensor] = None,
    unnormalized_weight: str = "posterior-mean",
) -> RoutingResult:
    """DirMoE routing for a batch of tokens.

    Training draws the spike with Gumbel-Sigmoid noise and the slab with a reparameterised
    Dirichlet sample; evaluation (``training=False``) is deterministic: z = pi = sigmoid(l / tau)
    and theta is the Dirichlet mean. `rule` picks the active set and `slab` the posterior (see
    `RULES`, `SLABS`); `slab_logits_TS` holds `slab_heads(slab)` logits per expert (None for
    slab "gate") and `slab_bias_S` the concentration heads' bias (slab "gated").
    `route_threshold` applies to rule "weight" only; `fallback_k` experts (largest score) go to a
    token where no expert passes the rule. `tau` may be a 0-d tensor (so a compiled caller does
    not recompile when the schedule moves). `route_bias` (rule "gate" only; a float, or a
    tensor of 1 or E elements) moves the routing decision alone: expert i is active where
    l_i + r_i >= 0, with r = c + b the controllers' biases (`DirMoEConfig.count_control_rate`,
    `DirMoEConfig.load_control_rate`); pi, the weights and the regularisers do not see it.
    `unnormalized_weight` (`UNNORMALIZED_WEIGHTS`) sets an active expert's weight when
    `renormalize` is off under rule "gate" with slab "gate".

    Noise: `generator` drives the Gumbel (logistic) draw only; the Dirichlet sample always comes
    from torch's default generator of the logits' device (``Dirichlet.rsample`` takes none). To
    control all of it, make that generator the source (fork it, as `DirichletRouter` does with
    its routing-noise stream) rather than passing `generator`.
    """
    if rule not in RULES:
        raise ValueError(f"unknown routing rule {rule!r}; allowed {RULES}")
    if slab not in SLABS:
        raise ValueError(f"unknown slab {slab!r}; allowed {SLABS}")
    if route_bias is not None and rule != "gate":
        raise ValueError('route_bias needs rule "gate"')
    if unnormalized_weight not in UNNORMALIZED_WEIGHTS:
        raise ValueError(f"unknown unnormalized_weight {unnormalized_weight!r}; allowed "
                         f"{UNNORMALIZED_WEIGHTS}")
    spike_logits_TE = spike_logits_TE.float()

    # 1. Per-token centring of the spike logits, then the learned bias.
    centred_TE = spike_logits_TE - spike_logits_TE.mean(dim=-1, keepdim=True)
    logits_TE = centred_TE + spike_bias_E.float()

    # 2. Spike: gate probability and (training) relaxed Bernoulli sample.
    gate_prob_TE = torch.sigmoid(logits_TE / tau)
    if training:
        u_TE = torch.rand(
            logits_TE.shape, device=logits_TE.device, dtype=torch.float32, generator=generator
        ).clamp_(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        noise_TE = torch.log(u_TE) - torch.log1p(-u_TE)
        if rule == "gate":
            # A relaxed Bernoulli(pi) sample: logit l / tau, relaxation temperature tau.
            gate_TE = torch.sigmoid((logits_TE / tau + noise_TE) / tau)
        else:
            gate_TE = torch.sigmoid((logits_TE + noise_TE) / tau)
    else:
        gate_TE = gate_prob_TE

    # 3. Slab: posterior concentration and a Dirichlet sample (or its mean).
    if slab == "gate":
        alpha_q_TE = posterior_scale * torch.softmax(centred_TE, dim=-1)
    elif slab == "head":
        alpha_q_TE = posterior_scale * torch.softmax(slab_logits_TS.float(), dim=-1)
    else:
        heads_TS = slab_logits_TS.float()
        if slab_bias_S is not None:
            heads_TS = heads_TS + slab_bias_S.float()
        alpha_hi_TE, alpha_lo_TE = F.softplus(heads_TS).chunk(2, dim=-1)
        alpha_q_TE = posterior_scale * (gate_TE * alpha_hi_TE + (1.0 - gate_TE) * alpha_lo_TE)
    alpha_q_TE = alpha_q_TE.clamp(alpha_floor, alpha_ceiling)
    # The sigmoid single weight does not read the slab: no Dirichlet draw for it.
    sigmoid_weight = (rule == "gate" and slab == "gate" and not renormalize
                      and unnormalized_weight == "sigmoid")
    if sigmoid_weight:
        theta_TE = None
    elif training:
        # validate_args=False: the default validation syncs device->host on every call.
        theta_TE = torch.distributions.Dirichlet(alpha_q_TE, validate_args=False).rsample()
    else:
        theta_TE = alpha_q_TE / alpha_q_TE.sum(dim=-1, keepdim=True)

    if rule == "gate":
        # 4-5. Active set: gates with pi >= 1/2 (the spike's mode), i.e. l >= 0, decided on the
        #      logits (pi saturates and would tie), at most `max_active` (largest l); a token
        #      where none passes gets its `fallback_k` most likely experts. The controllers'
        #      c + b join the bias before the sum, so an export that folds them into the bias
        #      decides bit for bit the same.
        with torch.no_grad():
            decision_TE = (logits_TE if route_bias is None
                           else centred_TE + (spike_bias_E.float() + route_bias))
            routing_map_TE, fallback_T, capped_T = _active_set(decision_TE, 0.0, max_active,
                                                               fallback_k)
        if sigmoid_weight:
            probs_TE = torch.sigmoid(centred_TE) * routing_map_TE
        else:
            probs_TE = theta_TE * routing_map_TE
            if renormalize:
                probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True)
        if slab == "head":
            # The weights do not depend on the gates here, so the gates learn from the LM loss
            # through a straight-through gate: 1 on the active set in the forward, dz/dl in the
            # backward.
            probs_TE = (routing_map_TE.float() + gate_TE - gate_TE.detach()) * probs_TE
        weights_TE = probs_TE  # the rule's weights are the dispatcher's: no leaked mixture
    else:
        # 4. Combine with the leak before normalising (no row can be all-zero).
        mixed_TE = gate_TE * theta_TE + leak
        weights_TE = mixed_TE / mixed_TE.sum(dim=-1, keepdim=True)
        # 5. Active set: w >= threshold, at most `max_active` (largest w), argmax when none.
        with torch.no_grad():
            routing_map_TE, fallback_T, capped_T = _active_set(weights_TE, route_threshold,
                                                               max_active, fallback_k)
        probs_TE = weights_TE * routing_map_TE
        if renormalize:
            probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True)

    return RoutingResult(
        probs_TE=probs_TE,
        routing_map_TE=routing_map_TE,
        logits_TE=logits_TE,
        gate_prob_TE=gate_prob_TE,
        gate_TE=gate_TE,
        alpha_q_TE=alpha_q_TE,
        weights_TE=weights_TE,
        fallback_T=fallback_T,
        capped_T=capped_T,
    )


def _active_set(score_TE: torch.Tensor, threshold: float, max_active: int, fallback_k: int = 1):
    """Experts with score >= threshold, cut to the `max_active` largest; a row where none passes
    falls back to its `fallback_k` largest. Returns (routing_map [T, E] bool, fallback [T],
    capped [T])."""
    over_TE = score_TE >= threshold
    num_over_T = over_TE.sum(dim=-1)
    # One sorted top-k serves both the cap and the fallback (fallback_k <= max_active).
    capping = max_active < score_TE.shape[-1]
    top_idx_TM = torch.topk(score_TE, max_active if capping else fallback_k, dim=-1).indices
    if capping:
        top_TE = torch.zeros_like(over_TE).scatter_(1, top_idx_TM, True)
        routing_map_TE = over_TE & top_TE
    else:
        routing_map_TE = over_TE.clone()
    fallback_T = num_over_T == 0
    # Only rows where nothing passed get the fallback, so it can never exceed max_active.
    fallback_TE = torch.zeros_like(over_TE).scatter_(1, top_idx_TM[:, :fallback_k], True)
    routing_map_TE |= fallback_TE & fallback_T[:, None]
    return routing_map_TE, fallback_T, num_over_T > max_active


def eval_active_count(
    result: RoutingResult,
    *,
    route_threshold: float,
    leak: float,
    max_active: int,
    rule: str = "weight",
    fallback_k: int = 1,
    route_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Active experts per token [T] that the deterministic (eval) path gives for the same
    logits, from a (possibly training-mode) `RoutingResult`."""
    if rule == "gate":
        shift = 0.0 if route_bias is None else route_bias
        over_T = (result.logits_TE + shift >= 0).sum(dim=-1)
    else:
        mean_theta_TE = result.alpha_q_TE / result.alpha_q_TE.sum(dim=-1, keepdim=True)
        mixed_TE = result.gate_prob_TE * mean_theta_TE + leak
        eval_weights_TE = mixed_TE / mixed_TE.sum(dim=-1, keepdim=True)
        over_T = (eval_weights_TE >= route_threshold).sum(dim=-1)
    return torch.where(over_T == 0, fallback_k, over_T).clamp(max=max_active)


def routing_regularizers(
    result: RoutingResult,
    *,
    prior_scale: float | torch.Tensor,
    alpha_lo: float,
    prior_ratio: float,
    alpha_floor: float,
    alpha_ceiling: float,
    target_k: int,
    rule: str = "weight",
    count_on_sample: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token Dirichlet KL against the spike-dependent prior, and the count penalty.

    Prior: alpha_p,i = max(lambda_p * (alpha_lo + (alpha_hi - alpha_lo) * z_i), floor) with
    alpha_hi = r * alpha_lo. Count penalty, rule "weight": the expected-k penalty
    (sum_i pi_i - k)^2. Rule "gate": the expected squared miss of the realised count,
    E[(N - k)^2] = (sum_i pi_i - k)^2 + sum_i pi_i (1 - pi_i) for N = sum_i Bernoulli(pi_i), which
    is zero only when exactly k gates are certain to fire (calibrated *and* decisive per token).
    `count_on_sample`: the penalty (sum_i z_i - k)^2 on the relaxed sample z instead of pi (the
    paper's sparsity term). Returns (kl_T, sparsity_T), both [T] fp32, unweighted.
    """
    alpha_hi = prior_ratio * alpha_lo
    alpha_p_TE = (prior_scale * (alpha_lo + (alpha_hi - alpha_lo) * result.gate_TE)).clamp(
        alpha_floor, alpha_ceiling
    )
    kl_T = dirichlet_kl(result.alpha_q_TE, alpha_p_TE)
    p_TE = result.gate_TE if count_on_sample else result.gate_prob_TE
    sparsity_T = (p_TE.sum(dim=-1) - target_k) ** 2
    if rule == "gate" and not count_on_sample:
        sparsity_T = sparsity_T + (p_TE * (1.0 - p_TE)).sum(dim=-1)
    return kl_T, sparsity_T


# Columns of `routing_statistics(...)[0]`: sums over the real (non-padded) tokens, so that the
# rows of micro-batches, ranks and sequence shards add up to the row of all their tokens; means
# are taken only after that sum (`megatron_dirmoe.metrics`). They are followed by a histogram of
# experts per token: column ``len(STAT_SUMS) + j`` counts the tokens routed to exactly j experts,
# j = 0..E, which sums like the rest and gives the true maximum after any reduction.
STAT_SUMS = (
    "tokens",
    "active_experts",
    "expected_k",
    "fallback",
    "capped",
    "kl",
    "sparsity_penalty",
    "eval_active_experts",
)


def routing_statistics_width(num_experts: int) -> int:
    """Length of `routing_statistics(...)[0]` for `num_experts` experts."""
    return len(STAT_SUMS) + num_experts + 1


def routing_statistics(
    result: RoutingResult,
    routing_map_TE: torch.Tensor,
    valid_T: Optional[torch.Tensor],
    kl_T: Optional[torch.Tensor],
    sparsity_T: Optional[torch.Tensor],
    *,
    route_threshold: float,
    leak: float,
    max_active: int,
    rule: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing-health sums over real (non-padded) tokens, as one fp32 vector (`STAT_SUMS`, then
    the histogram of experts per token), plus the routed-token count per expert [E].

    Sums rather than means so that a caller can add the vectors of several micro-batches,
    ranks and layers' shards and divide once (a mean of per-shard means or maxima is not the
    statistic of the whole batch). ``eval_active_experts`` is what the deterministic (eval) path
    would route for the same logits: the train/eval gap. ``kl`` and ``sparsity_penalty`` are 0
    when not given. No host synchronisation: everything stays on the logits' device.
    """
    with torch.no_grad():
        num_tokens, num_experts = routing_map_TE.shape
        weight_T = (
            torch.ones(num_tokens, device=routing_map_TE.device)
            if valid_T is None
            else valid_T.float()
        )
        active_T = routing_map_TE.sum(dim=-1)

        if rule == "gate":  # training routes by the same deterministic rule as evaluation
            eval_active_T = active_T.float()
        else:
            eval_active_T = eval_active_count(result, route_threshold=route_threshold,
                                              leak=leak, max_active=max_active).float()

        zeros_T = torch.zeros_like(weight_T)
        per_token_TS = torch.stack(
            [
                torch.ones_like(weight_T),
                active_T.float(),
                result.gate_prob_TE.sum(dim=-1),
                result.fallback_T.float(),
                result.capped_T.float(),
                zeros_T if kl_T is None else kl_T.detach().float(),
                zeros_T if sparsity_T is None else sparsity_T.detach().float(),
                eval_active_T,
            ],
            dim=-1,
        )
        sums_S = weight_T @ per_token_TS
        # scatter_add rather than bincount: bincount sizes its output from the data (a sync).
        histogram_K = torch.zeros(num_experts + 1, device=weight_T.device).scatter_add_(
            0, active_T.long(), weight_T
        )
        load_E = routing_map_TE.float().sum(dim=0)
    return torch.cat([sums_S, histogram_K]), load_E
