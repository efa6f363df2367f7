"""The pure DirMoE routing math against independent references (no Megatron involved)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.routing import (
    cosine_schedule,
    dirichlet_kl,
    exponential_schedule,
    route,
    routing_regularizers,
    spike_bias_init,
)
from megatron_dirmoe.schedules import prior_scale_at, temperature_at

E = 8


def _route(spike, slab, bias, cfg: DirMoEConfig, tau: float, training: bool, max_active=None):
    return route(
        spike,
        slab,
        bias,
        tau=tau,
        posterior_scale=cfg.posterior_scale,
        alpha_floor=cfg.alpha_floor,
        alpha_ceiling=cfg.alpha_ceiling,
        leak=cfg.leak,
        route_threshold=cfg.route_threshold,
        max_active=max_active or cfg.max_active_for(spike.shape[-1]),
        renormalize=cfg.renormalize,
        training=training,
    )


# ---------------------------------------------------------------------- Dirichlet KL
def test_dirichlet_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    alpha_q = torch.rand(64, E, generator=gen, dtype=torch.float64) * 20 + 0.005
    alpha_p = torch.rand(64, E, generator=gen, dtype=torch.float64) * 2 + 0.005
    reference = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(alpha_q), torch.distributions.Dirichlet(alpha_p)
    )
    torch.testing.assert_close(dirichlet_kl(alpha_q, alpha_p), reference, rtol=1e-10, atol=1e-10)


def test_dirichlet_kl_is_zero_for_equal_and_positive_otherwise():
    alpha = torch.rand(16, E, dtype=torch.float64) * 5 + 0.01
    assert dirichlet_kl(alpha, alpha).abs().max() < 1e-10
    assert (dirichlet_kl(alpha, alpha.flip(-1) + 0.3) > 0).all()


# ---------------------------------------------------------------------- spike
def test_relaxed_spike_monte_carlo_mean_matches_gate_probability():
    """Binary-concrete samples exceed 1/2 with probability exactly sigmoid(l / tau)... so the
    fraction of samples above 1/2 must match pi; the samples' mean tends to pi as tau -> 0."""
    torch.manual_seed(0)
    cfg = DirMoEConfig(schedule_iters=10)
    logits = torch.linspace(-3, 3, E).repeat(20000, 1)
    zero = torch.zeros(E)
    # Centring removes the mean of a row; the linspace row has mean 0 already.
    res = _route(logits, torch.zeros_like(logits), zero, cfg, tau=1.0, training=True)
    pi = torch.sigmoid(torch.linspace(-3, 3, E))
    torch.testing.assert_close(res.gate_prob_TE[0], pi)
    frac_on = (res.gate_TE > 0.5).float().mean(0)
    assert (frac_on - pi).abs().max() < 0.015
    cold = _route(logits, torch.zeros_like(logits), zero, cfg, tau=0.05, training=True)
    assert (cold.gate_TE.mean(0) - pi).abs().max() < 0.02


def test_spike_bias_init_gives_expected_k_at_initialisation():
    """sum_i pi_i == k at init (centred logits + b = tau_0 * logit(k/E)), within 5%."""
    torch.manual_seed(0)
    for k in (1, 2, 4):
        cfg = DirMoEConfig(target_k=k, schedule_iters=10)
        tau0 = temperature_at(cfg, 0)
        bias = torch.full((E,), spike_bias_init(k, E, tau0))
        # Small random logits, as from a freshly initialised W_z (std 0.02) on unit-scale inputs.
        spike = torch.randn(4096, E) * 0.02 * math.sqrt(64)
        res = _route(spike, torch.randn(4096, E), bias, cfg, tau=tau0, training=True)
        expected = res.gate_prob_TE.sum(-1).mean().item()
        assert abs(expected - k) / k < 0.05, (k, expected)


# ---------------------------------------------------------------------- slab + combine
def test_eval_path_is_deterministic_and_uses_dirichlet_mean():
    cfg = DirMoEConfig(schedule_iters=10)
    spike, slab = torch.randn(32, E), torch.randn(32, E)
    bias = torch.zeros(E)
    a = _route(spike, slab, bias, cfg, tau=0.7, training=False)
    b = _route(spike, slab, bias, cfg, tau=0.7, training=False)
    assert torch.equal(a.probs_TE, b.probs_TE) and torch.equal(a.routing_map_TE, b.routing_map_TE)
    # Independent reference of steps 2-5 in eval mode.
    centred = spike - spike.mean(-1, keepdim=True)
    pi = torch.sigmoid(centred / 0.7)
    alpha = (cfg.posterior_scale * torch.softmax(slab, -1)).clamp(cfg.alpha_floor, cfg.alpha_ceiling)
    theta = alpha / alpha.sum(-1, keepdim=True)
    w = (pi * theta + cfg.leak) / (pi * theta + cfg.leak).sum(-1, keepdim=True)
    torch.testing.assert_close(a.weights_TE, w)


def test_training_path_is_stochastic():
    cfg = DirMoEConfig(schedule_iters=10)
    spike, slab = torch.randn(32, E), torch.randn(32, E)
    a = _route(spike, slab, torch.zeros(E), cfg, tau=1.0, training=True)
    b = _route(spike, slab, torch.zeros(E), cfg, tau=1.0, training=True)
    assert not torch.equal(a.weights_TE, b.weights_TE)


def test_slab_sample_mean_matches_dirichlet_mean():
    torch.manual_seed(1)
    cfg = DirMoEConfig(schedule_iters=10)
    slab = torch.randn(1, E).repeat(20000, 1)
    # Gates pinned on: z ~ 1, so w ~ (theta + eps) / (1 + E eps).
    spike = torch.zeros(20000, E)
    bias = torch.full((E,), 50.0)
    res = _route(spike, slab, bias, cfg, tau=0.3, training=True)
    alpha = res.alpha_q_TE[0]
    expected_w = (alpha / alpha.sum() + cfg.leak) / (1 + E * cfg.leak)
    assert (res.weights_TE.mean(0) - expected_w).abs().max() < 0.01


# ---------------------------------------------------------------------- routing map
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_routing_map_invariants_without_nan(scale, dtype, training):
    torch.manual_seed(0)
    cfg = DirMoEConfig(target_k=2, schedule_iters=10)
    max_active = cfg.max_active_for(E)
    spike = (torch.randn(512, E) * scale).to(dtype)
    slab = (torch.randn(512, E) * scale).to(dtype)
    for tau in (2.0, 0.3):
        res = _route(spike, slab, torch.zeros(E), cfg, tau=tau, training=training)
        counts = res.routing_map_TE.sum(-1)
        assert counts.min() >= 1 and counts.max() <= max_active
        for t in (res.probs_TE, res.weights_TE, res.gate_TE, res.alpha_q_TE):
            assert torch.isfinite(t).all()
        assert res.probs_TE.dtype == torch.float32
        # probs live on the active set and sum to 1 (renormalised)
        assert (res.probs_TE[~res.routing_map_TE] == 0).all()
        torch.testing.assert_close(res.probs_TE.sum(-1), torch.ones(512))
        # the argmax of w is always routed
        assert res.routing_map_TE.gather(1, res.weights_TE.argmax(-1, keepdim=True)).all()


def test_fallback_and_cap_are_flagged():
    cfg = DirMoEConfig(target_k=1, max_active=2, route_threshold=0.2, schedule_iters=10)
    # Uniform weights 1/8 < 0.2 threshold: every token falls back to a single expert.
    flat = _route(torch.zeros(4, E), torch.zeros(4, E), torch.zeros(E), cfg, tau=1, training=False)
    assert flat.fallback_T.all() and (flat.routing_map_TE.sum(-1) == 1).all()
    # Low threshold: all 8 pass, capped to max_active=2 (the two largest w).
    cfg_low = DirMoEConfig(target_k=1, max_active=2, route_threshold=0.01, schedule_iters=10)
    slab = torch.arange(E, dtype=torch.float32).repeat(4, 1) * 0.1
    capped = _route(torch.zeros(4, E), slab, torch.full((E,), 5.0), cfg_low, tau=1, training=False)
    assert capped.capped_T.all()
    assert (capped.routing_map_TE.sum(-1) == 2).all()
    assert capped.routing_map_TE[:, -2:].all()


def test_renormalize_off_keeps_raw_weights():
    cfg = DirMoEConfig(renormalize=False, schedule_iters=10)
    res = _route(torch.randn(16, E), torch.randn(16, E), torch.zeros(E), cfg, 1.0, False)
    torch.testing.assert_close(res.probs_TE, res.weights_TE * res.routing_map_TE)


# ---------------------------------------------------------------------- gradients
def test_gradients_reach_spike_weights_bias_and_slab_through_output_and_losses():
    torch.manual_seed(0)
    cfg = DirMoEConfig(schedule_iters=10)
    h = torch.randn(64, 16)
    w_z = torch.randn(E, 16, requires_grad=True)
    w_v = torch.randn(E, 16, requires_grad=True)
    b_z = torch.zeros(E, requires_grad=True)

    def run():
        res = _route(h @ w_z.T, h @ w_v.T, b_z, cfg, tau=1.0, training=True)
        return res

    # LM path only: probs weight a random "expert output".
    res = run()
    (res.probs_TE * torch.randn(64, E)).sum().backward()
    for p in (w_z, w_v, b_z):
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()
        p.grad = None
    # Losses only.
    res = run()
    kl, pen = routing_regularizers(
        res, prior_scale=0.5, alpha_lo=cfg.alpha_lo, prior_ratio=39.7, alpha_floor=cfg.alpha_floor,
        alpha_ceiling=cfg.alpha_ceiling, target_k=1,
    )
    (kl.mean() + (pen + 0.1).mean()).backward()
    for p in (w_z, w_v, b_z):
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()


def test_regularizers_reference_values():
    """KL against an explicit prior built by hand; penalty = (sum pi - k)^2."""
    cfg = DirMoEConfig(schedule_iters=10)
    res = _route(torch.randn(8, E), torch.randn(8, E), torch.zeros(E), cfg, 1.0, True)
    r = 39.7
    kl, pen = routing_regularizers(
        res, prior_scale=0.4, alpha_lo=0.05, prior_ratio=r, alpha_floor=0.005,
        alpha_ceiling=1000.0, target_k=2,
    )
    alpha_p = (0.4 * (0.05 + (r * 0.05 - 0.05) * res.gate_TE)).clamp(min=0.005)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(res.alpha_q_TE.double()), torch.distributions.Dirichlet(alpha_p.double())
    )
    torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pen, (res.gate_prob_TE.sum(-1) - 2) ** 2)


# ---------------------------------------------------------------------- schedules
def test_schedule_endpoints_and_monotonicity():
    cfg = DirMoEConfig(schedule_iters=100)
    taus = [temperature_at(cfg, t) for t in range(0, 131)]
    assert taus[0] == pytest.approx(2.0) and taus[100] == pytest.approx(0.3)
    assert taus[130] == pytest.approx(0.3)  # held after the horizon
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert temperature_at(cfg, 50) == pytest.approx(1.15)  # cosine midpoint
    for kind in ("cosine", "exponential"):
        c = DirMoEConfig(schedule_iters=100, prior_scale_schedule=kind)
        ps = [prior_scale_at(c, t) for t in range(101)]
        assert ps[0] == pytest.approx(0.5) and ps[-1] == pytest.approx(0.3)
        assert all(a >= b for a, b in zip(ps, ps[1:]))
    assert exponential_schedule(0.5, 0.3, 50, 100) == pytest.approx(math.sqrt(0.5 * 0.3))
    assert cosine_schedule(1.0, 0.0, -5, 10) == 1.0  # negative iterations clamp to the start


def test_schedules_need_a_horizon():
    with pytest.raises(ValueError, match="--dirmoe-schedule-iters"):
        temperature_at(DirMoEConfig(), 0)
    assert DirMoEConfig().with_schedule_horizon(500).schedule_iters == 500
    assert DirMoEConfig(schedule_iters=7).with_schedule_horizon(500).schedule_iters == 7
