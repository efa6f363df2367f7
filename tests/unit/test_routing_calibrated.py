"""The calibrated recipe's routing math (rule "gate", count penalty E[(N-k)^2], aggregate spike
prior) against independent references: exact enumeration, Monte Carlo, torch.distributions and
hand-derived gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.routing import (
    balance_penalty,
    bernoulli_kl,
    firing_sums,
    eval_active_count,
    route,
    routing_regularizers,
)

E = 8


def _route(spike, slab, bias, tau, training, *, max_active=E, cfg=None):
    """Rule "gate" with a separate slab head (release 0.1's calibrated recipe, still selectable
    with --dirmoe-slab-mean head); the gate-logit slab has tests of its own below."""
    cfg = cfg or DirMoEConfig(schedule_iters=10, slab_mean="head", renormalize=True,
                              posterior_scale=20.0)
    return route(
        spike, slab, bias, tau=tau, posterior_scale=cfg.posterior_scale,
        alpha_floor=cfg.alpha_floor, alpha_ceiling=cfg.alpha_ceiling, leak=cfg.leak,
        route_threshold=cfg.route_threshold, max_active=max_active, renormalize=cfg.renormalize,
        training=training, rule="gate", slab=cfg.slab,
    )


def test_bernoulli_kl_matches_torch_distributions():
    p = torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    for q in (0.125, 0.5, 0.9):
        ref = torch.distributions.kl_divergence(
            torch.distributions.Bernoulli(probs=p),
            torch.distributions.Bernoulli(probs=torch.full_like(p, q)))
        torch.testing.assert_close(bernoulli_kl(p, q), ref)


def test_balance_penalty_value_and_gradient():
    """sum_e KL(Bern(k/E) || Bern(pbar_e)) with pbar_e = mean_t pi_te; its gradient with respect
    to pi_te is (-q / pbar_e + (1 - q) / (1 - pbar_e)) / T (derived by hand)."""
    torch.manual_seed(0)
    T, k = 32, 2
    logits_TE = (torch.randn(T, E, dtype=torch.float64) * 1.5).requires_grad_()
    tau = 0.7
    sums_2E = firing_sums(logits_TE, tau)
    value = balance_penalty(sums_2E[0] / T, sums_2E[1] / T, k)
    pi = torch.sigmoid(logits_TE.detach() / tau)
    pbar, q = pi.mean(0), k / E
    ref = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(probs=torch.full_like(pbar, q)),
        torch.distributions.Bernoulli(probs=pbar)).sum()
    torch.testing.assert_close(value.double(), ref)
    value.backward()
    d_pi = ((-q / pbar + (1 - q) / (1 - pbar)) / T).expand(T, E)
    torch.testing.assert_close(logits_TE.grad, d_pi * pi * (1 - pi) / tau)
    # Zero exactly at the prior, positive away from it.
    assert balance_penalty(torch.full((E,), q), torch.full((E,), 1 - q), k).abs() < 1e-6
    assert balance_penalty(torch.tensor([1.0 - 1e-6] + [1e-6] * (E - 1)),
                           torch.tensor([1e-6] + [1.0 - 1e-6] * (E - 1)), 1) > 1.0


def test_a_dead_gate_recovers_under_the_balance_term():
    """A gate driven far below every clamp (logit -1000 at tau 0.3, so pi underflows in any float
    format) still gets the full balance gradient, d/db = -(k/E) / tau, and descent on the balance
    term alone brings its firing rate back to the prior k/E. Under release 0.1's posterior-first
    KL (p clamped at 1e-6) the same gate had no gradient at all."""
    torch.manual_seed(1)
    T, k, tau = 256, 2, 0.3
    scores_TE = torch.randn(T, E) * 0.5
    bias = torch.zeros(E)
    bias[3] = -1e3
    bias.requires_grad_()
    sums = firing_sums(scores_TE + bias, tau)
    balance_penalty(sums[0] / T, sums[1] / T, k).backward()
    assert bias.grad[3].item() == pytest.approx(-(k / E) / tau, rel=1e-3)
    flat = bias.detach().clone().requires_grad_()
    bernoulli_kl(torch.sigmoid((scores_TE + flat) / tau).mean(0), k / E).sum().backward()
    assert flat.grad[3] == 0.0
    optimiser = torch.optim.Adam([bias], lr=20.0)
    decay = torch.optim.lr_scheduler.ExponentialLR(optimiser, 0.985)
    for _ in range(400):
        optimiser.zero_grad()
        sums = firing_sums(scores_TE + bias, tau)
        balance_penalty(sums[0] / T, sums[1] / T, k).backward()
        optimiser.step()
        decay.step()
    rate_E = torch.sigmoid((scores_TE + bias.detach()) / tau).mean(0)
    torch.testing.assert_close(rate_E, torch.full((E,), k / E), atol=1e-3, rtol=0)


def test_count_penalty_equals_exact_expected_squared_miss():
    """E[(N - k)^2] for N = sum of independent Bernoulli(pi_i), by enumerating all 2^E outcomes."""
    torch.manual_seed(1)
    res = _route(torch.randn(4, E, dtype=torch.float64) * 2, torch.randn(4, E), torch.zeros(E),
                 tau=0.7, training=True)
    _, pen_T = routing_regularizers(
        res, prior_scale=0.5, alpha_lo=0.05, prior_ratio=39.7, alpha_floor=0.005,
        alpha_ceiling=1000.0, target_k=2, rule="gate")
    pi = res.gate_prob_TE.double()
    for t in range(4):
        exact = 0.0
        for bits in itertools.product((0, 1), repeat=E):
            b = torch.tensor(bits, dtype=torch.float64)
            prob = torch.prod(torch.where(b > 0, pi[t], 1 - pi[t])).item()
            exact += prob * (b.sum().item() - 2) ** 2
        assert pen_T[t].item() == pytest.approx(exact, rel=1e-6)  # route() computes in fp32


@pytest.mark.parametrize("tau", [2.0, 1.0, 0.3])
def test_relaxed_spike_is_a_bernoulli_pi_sample_and_routing_takes_its_mode(tau):
    """The relaxed gate clears 1/2 with probability pi = sigmoid(l / tau) at every temperature
    (the paper recipe's sampler clears it with probability sigmoid(l)); the active set is the
    mode, pi >= 1/2, in training as in evaluation."""
    torch.manual_seed(0)
    logits_E = torch.tensor([-1.5, -0.8, -0.3, 0.0, 0.2, 0.6, 1.0, 1.6]) * tau
    spike = logits_E.repeat(40000, 1)
    res = _route(spike, torch.zeros_like(spike), torch.zeros(E), tau, True)
    centred_E = logits_E - logits_E.mean()
    pi_E = torch.sigmoid(centred_E / tau)
    torch.testing.assert_close(res.gate_prob_TE[0], pi_E)
    fired = (res.gate_TE >= 0.5).float().mean(0)
    assert (fired - pi_E).abs().max() < 0.01
    assert torch.equal(res.routing_map_TE, (centred_E >= 0).expand(40000, E))
    evaluated = _route(spike[:4], torch.zeros_like(spike[:4]), torch.zeros(E), tau, False)
    assert torch.equal(evaluated.routing_map_TE, res.routing_map_TE[:4])


def test_eval_routes_where_logit_is_non_negative_with_renormalised_mean_slab():
    torch.manual_seed(2)
    cfg = DirMoEConfig(schedule_iters=10, posterior_scale=20.0)
    spike, slab = torch.randn(64, E) * 2, torch.randn(64, E)
    bias = torch.full((E,), -0.5)
    res = _route(spike, slab, bias, 0.4, False, max_active=3)
    l = spike - spike.mean(-1, keepdim=True) + bias
    on = l >= 0
    # Independent reference: the 3 largest of the non-negative logits, argmax when none.
    ref_map = torch.zeros_like(on)
    for t in range(64):
        idx = [i for i in torch.argsort(l[t], descending=True).tolist() if on[t, i]][:3]
        ref_map[t, idx or [int(l[t].argmax())]] = True
    assert torch.equal(res.routing_map_TE, ref_map)
    alpha = (cfg.posterior_scale * torch.softmax(slab, -1)).clamp(cfg.alpha_floor, cfg.alpha_ceiling)
    theta = alpha * ref_map
    torch.testing.assert_close(res.probs_TE, theta / theta.sum(-1, keepdim=True))
    counts = eval_active_count(res, route_threshold=0.125, leak=1e-3, max_active=3, rule="gate")
    assert torch.equal(counts, ref_map.sum(-1))


def test_straight_through_gate_forward_is_the_slab_share_backward_is_dz_dl():
    """Forward: theta renormalised over the active set. Backward to the spike logits:
    c_i * theta~_i * dz_i/dl_i with dz/dl = z (1 - z) / tau^2 on active experts, 0 elsewhere."""
    torch.manual_seed(4)
    tau = 0.7
    spike = torch.randn(128, E) * 2
    slab = torch.randn(128, E)
    bias = torch.zeros(E, requires_grad=True)
    c_TE = torch.randn(128, E)
    res = _route(spike, slab, bias, tau, True)
    res.gate_TE.retain_grad()
    (res.probs_TE * c_TE).sum().backward()
    active = res.routing_map_TE
    theta = res.probs_TE.detach()  # forward value: the renormalised slab share
    assert torch.allclose(theta.sum(-1), torch.ones(128)) and (theta[~active] == 0).all()
    z = res.gate_TE.detach()
    dz_dl = z * (1 - z) / tau**2
    # d(centred logits)/d(bias) is the identity, so the bias gradient is the logit gradient
    # summed over tokens; the slab sample does not depend on the spike.
    expected = (c_TE * theta * dz_dl).sum(0)
    torch.testing.assert_close(bias.grad, expected, rtol=1e-4, atol=1e-6)


def test_gate_rule_gradients_reach_spike_and_slab_through_the_output():
    torch.manual_seed(3)
    h = torch.randn(256, 16)
    w_z = torch.randn(E, 16, requires_grad=True)
    w_v = torch.randn(E, 16, requires_grad=True)
    b_z = torch.zeros(E, requires_grad=True)
    res = _route(h @ w_z.T, h @ w_v.T, b_z, 1.0, True)
    (res.probs_TE * torch.randn(256, E)).sum().backward()
    for p in (w_z, w_v, b_z):
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("training", [True, False])
def test_gate_rule_map_invariants_without_nan(scale, training):
    torch.manual_seed(0)
    spike, slab = torch.randn(512, E) * scale, torch.randn(512, E) * scale
    for tau in (2.0, 0.3):
        res = _route(spike, slab, torch.zeros(E), tau, training, max_active=4)
        counts = res.routing_map_TE.sum(-1)
        assert counts.min() >= 1 and counts.max() <= 4
        assert (res.probs_TE[~res.routing_map_TE] == 0).all()
        for t in (res.probs_TE, res.gate_TE, res.weights_TE):
            assert torch.isfinite(t).all()


def test_tokens_whose_gates_all_stay_off_fall_back_to_their_k_most_likely_experts():
    """At initialisation (every pi = k/E < 1/2) the calibrated rule routes each token to its k
    largest pi, i.e. it starts as top-k routing; tokens with a gate on are not padded up to k."""
    torch.manual_seed(5)
    spike = torch.randn(256, E) * 0.1
    bias = torch.full((E,), -3.0)  # no gate reaches 1/2
    for training in (True, False):
        res = route(
            spike, torch.randn(256, E), bias, tau=1.0, posterior_scale=20.0, alpha_floor=0.005,
            alpha_ceiling=1000.0, leak=1e-3, route_threshold=0.125, max_active=4,
            training=training, rule="gate", fallback_k=2)
        assert res.fallback_T.all()
        top2 = torch.zeros(256, E, dtype=torch.bool).scatter_(
            1, torch.topk(spike, 2, dim=-1).indices, True)
        assert torch.equal(res.routing_map_TE, top2)
        counts = eval_active_count(res, route_threshold=0.125, leak=1e-3, max_active=4,
                                   rule="gate", fallback_k=2)
        assert (counts == 2).all()
    one_on = spike.clone()
    one_on[:, 3] = 10.0  # gate 3 fires for every token: exactly one expert, no padding to k
    res = route(one_on, torch.randn(256, E), bias, tau=1.0, posterior_scale=20.0,
                alpha_floor=0.005, alpha_ceiling=1000.0, leak=1e-3, route_threshold=0.125,
                max_active=4, training=False, rule="gate", fallback_k=2)
    assert (res.routing_map_TE.sum(-1) == 1).all() and res.routing_map_TE[:, 3].all()


# ---------------------------------------------------------------------- the gate-logit slab
def _gate_slab_route(spike, bias, tau, training, *, renormalize=True, max_active=E, k=2):
    cfg = DirMoEConfig(schedule_iters=10, target_k=k)
    return route(
        spike, None, bias, tau=tau, posterior_scale=cfg.posterior_scale,
        alpha_floor=cfg.alpha_floor, alpha_ceiling=cfg.alpha_ceiling, leak=cfg.leak,
        route_threshold=cfg.route_threshold, max_active=max_active, renormalize=renormalize,
        training=training, rule="gate", fallback_k=k, slab="gate",
    )


@pytest.mark.parametrize("renormalize", [True, False])
def test_gate_slab_eval_weights_are_the_softmax_of_the_gate_logits(renormalize):
    """Evaluation: the posterior mean is softmax(centred gate logits), clamped as a
    concentration lambda_q * softmax; the weights are its entries on the active set (pi >= 1/2),
    renormalised over that set or not."""
    torch.manual_seed(6)
    spike = torch.randn(64, E) * 2
    bias = torch.full((E,), -0.4)
    res = _gate_slab_route(spike, bias, 0.5, False, renormalize=renormalize)
    centred = spike - spike.mean(-1, keepdim=True)
    alpha = (1000.0 * torch.softmax(centred, -1)).clamp(0.005, 1000.0)
    mean = alpha / alpha.sum(-1, keepdim=True)
    active = res.routing_map_TE
    assert torch.equal(active[~res.fallback_T], ((centred + bias) >= 0)[~res.fallback_T])
    expected = mean * active
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(res.probs_TE, expected)


def test_gate_slab_gradient_is_the_softmax_over_the_active_set_without_straight_through():
    """The LM gradient reaches the gate logits only through the weights: with renormalisation
    it is the softmax Jacobian over the active set, so it sums to zero over a token's active
    experts (it reorders them but cannot raise or lower the count) and is zero elsewhere."""
    torch.manual_seed(7)
    spike = (torch.randn(256, E) * 2).requires_grad_()
    res = _gate_slab_route(spike, torch.full((E,), -0.3), 0.5, False)
    c = torch.randn(256, E)
    (res.probs_TE * c).sum().backward()
    active = res.routing_map_TE
    p = res.probs_TE.detach()
    expected = p * (c - (p * c).sum(-1, keepdim=True))  # d/dl of sum_i c_i softmax_A(l)_i
    torch.testing.assert_close(spike.grad, expected * active, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(spike.grad.sum(-1), torch.zeros(256), rtol=0, atol=1e-5)


def test_gate_slab_single_expert_weight_keeps_a_gradient_without_renormalisation():
    """At k = 1 a renormalised single weight is always 1 (no gradient for the router); without
    renormalisation it is the expert's softmax share, whose gradient reaches every logit."""
    torch.manual_seed(8)
    spike = (torch.randn(64, E) * 2).requires_grad_()
    bias = torch.full((E,), -30.0)  # no gate on: every token uses its top-1 fallback
    res = _gate_slab_route(spike, bias, 1.0, False, renormalize=True, k=1)
    assert (res.routing_map_TE.sum(-1) == 1).all()
    torch.testing.assert_close(res.probs_TE.sum(-1), torch.ones(64))
    (res.probs_TE * torch.randn(64, E)).sum().backward()
    assert spike.grad.abs().max() < 1e-6  # p / p: zero up to round-off
    spike.grad = None
    res = _gate_slab_route(spike, bias, 1.0, False, renormalize=False, k=1)
    (res.probs_TE * torch.randn(64, E)).sum().backward()
    assert (spike.grad.abs() > 0).all() and spike.grad.abs().max() > 1e-2


def test_unnormalised_single_weight_is_the_sigmoid_of_the_centred_gate_logit():
    """Without renormalisation (k = 1) the default weight of an active expert is
    sigmoid(l_i - mean_j l_j), its own confidence: independent of the spike bias and the
    controllers (which only move the decision), and, unlike the softmax share, not 1/E when the
    logits are equal. 'posterior-mean' keeps the softmax share of releases before it."""
    torch.manual_seed(9)
    spike = (torch.randn(64, E) * 2).requires_grad_()
    bias = torch.full((E,), -0.4)
    kwargs = dict(tau=0.5, posterior_scale=1000.0, alpha_floor=0.005, alpha_ceiling=1000.0,
                  leak=1e-3, route_threshold=0.125, max_active=E, renormalize=False,
                  training=True, rule="gate", fallback_k=1, slab="gate")
    res = route(spike, None, bias, unnormalized_weight="sigmoid",
                route_bias=torch.linspace(-0.5, 0.5, E), **kwargs)
    centred = spike - spike.mean(-1, keepdim=True)
    torch.testing.assert_close(res.probs_TE, torch.sigmoid(centred) * res.routing_map_TE)
    # The gradient of one token's single weight: sigmoid' (delta_ij - 1/E), reaching every logit.
    c = torch.randn(64, E)
    (res.probs_TE * c).sum().backward()
    s = torch.sigmoid(centred.detach())
    g = (c * s * (1 - s) * res.routing_map_TE)
    torch.testing.assert_close(spike.grad, g - g.sum(-1, keepdim=True) / E)
    flat = route(torch.zeros(4, E), None, torch.full((E,), 1.0), unnormalized_weight="sigmoid",
                 **dict(kwargs, training=False))
    assert (flat.probs_TE[flat.routing_map_TE] == 0.5).all()  # not 1/E
    mean = route(spike.detach(), None, bias, unnormalized_weight="posterior-mean",
                 **dict(kwargs, training=False))
    share = (1000.0 * torch.softmax(centred.detach(), -1)).clamp(0.005, 1000.0)
    torch.testing.assert_close(mean.probs_TE, share / share.sum(-1, keepdim=True)
                               * mean.routing_map_TE)
    with pytest.raises(ValueError, match="unnormalized_weight"):
        route(spike, None, bias, unnormalized_weight="softmax", **kwargs)
    # The recipe's default, and the value of configs stored before it existed.
    assert DirMoEConfig(target_k=1).unnormalized_weight == "sigmoid"
    from megatron_dirmoe.config import IMPLICIT_IN_OLDER_CHECKPOINTS

    assert IMPLICIT_IN_OLDER_CHECKPOINTS["unnormalized_weight"] == "posterior-mean"
    with pytest.raises(ValueError, match="--dirmoe-unnormalized-weight"):
        DirMoEConfig(unnormalized_weight="softmax")
