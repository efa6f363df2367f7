"""The paper recipe's router structure (three heads, gate-conditioned posterior, relaxed
weights, sparsity on the sample) against references written here, plus the exponential
temperature schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.routing import route, routing_regularizers, softplus_inverse
from megatron_dirmoe.schedules import temperature_at

E, K = 8, 2


def _paper_route(spike, slab, bias, slab_bias, *, tau, training, cfg=None, generator=None):
    cfg = cfg or DirMoEConfig(recipe="paper", target_k=K, schedule_iters=10)
    return route(
        spike, slab, bias, tau=tau, posterior_scale=cfg.posterior_scale,
        alpha_floor=cfg.alpha_floor, alpha_ceiling=cfg.alpha_ceiling, leak=cfg.leak,
        route_threshold=cfg.route_threshold, max_active=cfg.max_active_for(E),
        renormalize=cfg.renormalize, training=training, rule=cfg.routing_rule,
        fallback_k=cfg.fallback_k, slab=cfg.slab, slab_bias_S=slab_bias,
        generator=generator,
    )


def _inputs(seed=0, tokens=64):
    gen = torch.Generator().manual_seed(seed)
    spike = torch.randn(tokens, E, generator=gen) * 1.5
    slab = torch.randn(tokens, 2 * E, generator=gen) * 0.5
    bias = torch.randn(E, generator=gen) * 0.3
    slab_bias = torch.cat([torch.full((E,), softplus_inverse(1.985)),
                           torch.full((E,), softplus_inverse(0.05))])
    return spike, slab, bias, slab_bias


def test_softplus_inverse():
    for value in (1e-3, 0.05, 1.985, 30.0):
        assert F.softplus(torch.tensor(softplus_inverse(value), dtype=torch.float64)).item() == \
            pytest.approx(value, rel=1e-12)


def test_eval_path_matches_reference():
    """Evaluation: z = pi = sigmoid(l / tau); alpha_q = lambda_q (pi alpha_hi(x) + (1 - pi)
    alpha_lo(x)); theta its mean; w = (z theta + eps) / sum; route where w >= 0.125 (argmax
    when none, at most max_active), renormalised over the active set."""
    spike, slab, bias, slab_bias = _inputs()
    tau, cfg = 0.7, DirMoEConfig(recipe="paper", target_k=K, schedule_iters=10)
    res = _paper_route(spike, slab, bias, slab_bias, tau=tau, training=False)

    logits = spike - spike.mean(-1, keepdim=True) + bias
    pi = torch.sigmoid(logits / tau)
    heads = F.softplus(slab + slab_bias)
    alpha_hi, alpha_lo = heads[:, :E], heads[:, E:]
    alpha_q = (cfg.posterior_scale * (pi * alpha_hi + (1 - pi) * alpha_lo)).clamp(
        cfg.alpha_floor, cfg.alpha_ceiling)
    theta = alpha_q / alpha_q.sum(-1, keepdim=True)
    w = (pi * theta + cfg.leak) / (pi * theta + cfg.leak).sum(-1, keepdim=True)
    active = w >= cfg.route_threshold
    for t in range(w.shape[0]):
        if not active[t].any():
            active[t, w[t].argmax()] = True
        if active[t].sum() > cfg.max_active_for(E):
            keep = w[t].topk(cfg.max_active_for(E)).indices
            active[t] = False
            active[t, keep] = True
    probs = torch.where(active, w, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    torch.testing.assert_close(res.alpha_q_TE, alpha_q)
    assert torch.equal(res.routing_map_TE, active)
    torch.testing.assert_close(res.probs_TE, probs)


def test_posterior_is_conditioned_on_the_relaxed_gate():
    """In training alpha_q uses the relaxed sample z (not pi): an expert whose gate sample is on
    gets lambda_q alpha_hi(x), one that is off lambda_q alpha_lo(x)."""
    spike, slab, bias, slab_bias = _inputs(1)
    cfg = DirMoEConfig(recipe="paper", target_k=K, schedule_iters=10)
    res = _paper_route(spike, slab, bias, slab_bias, tau=0.5, training=True,
                       generator=torch.Generator().manual_seed(3))
    heads = F.softplus(slab + slab_bias)
    z = res.gate_TE
    expected = (cfg.posterior_scale * (z * heads[:, :E] + (1 - z) * heads[:, E:])).clamp(
        cfg.alpha_floor, cfg.alpha_ceiling)
    torch.testing.assert_close(res.alpha_q_TE, expected)
    assert not torch.allclose(z, res.gate_prob_TE)


def test_relaxed_weights_carry_gradient_without_straight_through():
    """The forward weights are normalize(z * theta) itself: d probs / d spike logits is the
    derivative of that expression (no straight-through substitute), and every head gets a
    gradient."""
    spike, slab, bias, slab_bias = _inputs(2, tokens=16)
    spike = spike.double().requires_grad_()
    slab = slab.double().requires_grad_()
    slab_bias = slab_bias.double().requires_grad_()
    torch.manual_seed(5)
    res = _paper_route(spike, slab, bias.double(), slab_bias, tau=0.8, training=True,
                       generator=torch.Generator().manual_seed(4))
    # The forward value equals the relaxed weights renormalised over the active set.
    w = res.weights_TE
    expected = torch.where(res.routing_map_TE, w, 0.0)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(res.probs_TE, expected)
    (res.probs_TE * torch.randn_like(res.probs_TE)).sum().backward()
    assert spike.grad.abs().sum() > 0 and slab.grad.abs().sum() > 0
    assert slab_bias.grad.abs().sum() > 0


def test_sparsity_penalty_reads_the_sample():
    spike, slab, bias, slab_bias = _inputs(3)
    res = _paper_route(spike, slab, bias, slab_bias, tau=0.6, training=True,
                       generator=torch.Generator().manual_seed(1))
    _, sparsity = routing_regularizers(
        res, prior_scale=0.5, alpha_lo=0.05, prior_ratio=39.7, alpha_floor=0.005,
        alpha_ceiling=1000.0, target_k=K, rule="weight", count_on_sample=True)
    torch.testing.assert_close(sparsity, (res.gate_TE.sum(-1) - K) ** 2)
    _, on_pi = routing_regularizers(
        res, prior_scale=0.5, alpha_lo=0.05, prior_ratio=39.7, alpha_floor=0.005,
        alpha_ceiling=1000.0, target_k=K, rule="weight")
    torch.testing.assert_close(on_pi, (res.gate_prob_TE.sum(-1) - K) ** 2)


def test_exponential_temperature_schedule():
    cfg = DirMoEConfig(tau_schedule="exponential", tau_decay=0.99, schedule_iters=1000)
    for t in (0, 1, 50, 150):
        assert temperature_at(cfg, t) == pytest.approx(max(0.3, 2.0 * 0.99 ** t))
    assert temperature_at(cfg, 10_000) == 0.3  # floored at tau_end (tau_min)
    # Without a decay rate it reaches tau_end exactly at the horizon, geometrically.
    cfg = DirMoEConfig(tau_schedule="exponential", schedule_iters=100)
    assert temperature_at(cfg, 100) == pytest.approx(0.3)
    assert temperature_at(cfg, 50) == pytest.approx(math.sqrt(2.0 * 0.3))
    with pytest.raises(ValueError, match="--dirmoe-tau-decay needs --dirmoe-tau-schedule"):
        DirMoEConfig(tau_decay=0.99)
    with pytest.raises(ValueError, match="--dirmoe-tau-decay"):
        DirMoEConfig(tau_schedule="exponential", tau_decay=1.0)
