"""`DirichletRouter` as a Megatron module: shapes, losses, padding, metrics, schedules (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.routing import route, routing_regularizers

E, H = 8, 64


@pytest.fixture
def router_factory(megatron_single_rank):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.router import DirichletRouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    get_moe_metrics_tracker().clear()

    def make(megatron_overrides=None, **dirmoe_overrides):
        cfg = DirMoEConfig(schedule_iters=100, **dirmoe_overrides)
        torch.manual_seed(0)
        router = DirichletRouter(tiny_transformer_config(**(megatron_overrides or {})),
                                 dirmoe_config=cfg)
        router.set_layer_number(1)
        return router

    return make


def _aux_grads(router, hidden, padding_mask=None, seed=0):
    """Router parameter gradients coming from the attached losses alone."""
    router.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    probs, _ = router(hidden, padding_mask=padding_mask)
    (probs * 0).sum().backward()  # LM path contributes nothing; MoEAuxLossAutoScaler adds the losses
    return router.weight.grad.clone(), router.spike_bias.grad.clone()


@pytest.mark.parametrize("recipe, rows, slab_bias", [
    ("calibrated", E, False),      # gate-logit slab: the gate head W_z only
    ("paper", 3 * E, True),        # W_z, then the alpha_hi and alpha_lo heads with their bias
    ("paper-notes", 2 * E, False),  # W_z and one slab head W_v
])
def test_parameters_and_initialisation(router_factory, recipe, rows, slab_bias):
    router = router_factory(recipe=recipe, target_k=2)
    assert router.weight.shape == (rows, H) and router.weight.dtype == torch.float32
    assert router.spike_bias.shape == (E,)
    expected_bias = 2.0 * math.log((2 / E) / (1 - 2 / E))  # tau_0 * logit(k/E)
    torch.testing.assert_close(router.spike_bias.detach(), torch.full((E,), expected_bias))
    params = [router.weight, router.spike_bias]
    if slab_bias:
        # softplus(bias) = the prior's alpha_hi (first E) and alpha_lo (last E) at the start.
        cfg = router.dirmoe_config
        alpha = torch.nn.functional.softplus(router.slab_bias.detach())
        torch.testing.assert_close(alpha[:E], torch.full((E,), router.prior_ratio * cfg.alpha_lo))
        torch.testing.assert_close(alpha[E:], torch.full((E,), cfg.alpha_lo))
        params.append(router.slab_bias)
    else:
        assert router.slab_bias is None
    for p in params:
        assert hasattr(p, "sequence_parallel")
    assert router.max_active == 8  # min(E, 4k)


def _reference_route(router, hidden):
    """`route` on leaf copies of the router's parameters, as the router's forward calls it:
    (result, weight, spike bias) for an independent objective's backward."""
    cfg = router.dirmoe_config
    weight = router.weight.detach().clone().requires_grad_()
    bias = router.spike_bias.detach().clone().requires_grad_()
    slab_bias = None if router.slab_bias is None else router.slab_bias.detach().clone()
    torch.manual_seed(0)
    logits = hidden.reshape(-1, H) @ weight.T
    res = route(
        logits[:, :E], logits[:, E:] if router.slab_heads else None, bias,
        tau=router.temperature, posterior_scale=cfg.posterior_scale,
        alpha_floor=cfg.alpha_floor, alpha_ceiling=cfg.alpha_ceiling, leak=cfg.leak,
        route_threshold=cfg.route_threshold, max_active=router.max_active,
        renormalize=cfg.renormalize, training=True, rule=cfg.routing_rule,
        fallback_k=cfg.fallback_k, slab=cfg.slab, slab_bias_S=slab_bias,
    )
    return res, weight, bias


def test_forward_shapes_invariants_and_eval_determinism(router_factory):
    router = router_factory()
    hidden = torch.randn(16, 2, H)
    probs, routing_map = router(hidden)
    assert probs.shape == (32, E) and probs.dtype == torch.float32
    assert routing_map.shape == (32, E) and routing_map.dtype == torch.bool
    counts = routing_map.sum(-1)
    assert counts.min() >= 1 and counts.max() <= router.max_active
    router.eval()
    with torch.no_grad():
        a = router(hidden)
        b = router(hidden)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("scale", [1e-3, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_inputs_stay_finite(router_factory, scale, dtype):
    router = router_factory(target_k=2)
    hidden = (torch.randn(32, 2, H) * scale).to(dtype).requires_grad_()
    for iteration in (0, 100):  # tau = 2.0 and tau = 0.3
        router.set_iteration(iteration)
        probs, routing_map = router(hidden)
        (probs * torch.randn_like(probs)).sum().backward()
        assert torch.isfinite(probs).all()
        assert torch.isfinite(router.weight.grad).all() and torch.isfinite(router.spike_bias.grad).all()
        assert torch.isfinite(hidden.grad).all()
        assert routing_map.sum(-1).min() >= 1


@pytest.mark.parametrize("recipe", ["calibrated", "paper"])
def test_attached_losses_equal_the_reference_objective(router_factory, recipe):
    """The gradient the router receives from MoEAuxLossAutoScaler is exactly the gradient of
    sigma^2 * [mean_t(beta * KL_t + lambda * penalty_t) + beta_z * balance(mean_t pi_t)]
    (no balance term in the paper recipe)."""
    router = router_factory(recipe=recipe, kl_weight=0.3, sparsity_weight=0.7, count_weight=0.7,
                            recon_variance=2.0, target_k=2)
    router.set_iteration(10)
    hidden = torch.randn(8, 4, H)
    grad_w, grad_b = _aux_grads(router, hidden)

    cfg = router.dirmoe_config
    rule = cfg.routing_rule
    res, weight, bias = _reference_route(router, hidden)
    kl, pen = routing_regularizers(
        res, prior_scale=router.prior_scale, alpha_lo=cfg.alpha_lo, prior_ratio=router.prior_ratio,
        alpha_floor=cfg.alpha_floor, alpha_ceiling=cfg.alpha_ceiling, target_k=cfg.target_k,
        rule=rule, count_on_sample=cfg.count_on_sample,
    )
    objective = (0.3 * kl + 0.7 * pen).mean()
    if recipe == "calibrated":
        # Reverse KL of the gates' mean firing rates: sum_e KL(Bern(k/E) || Bern(pbar_e)).
        pbar = torch.sigmoid(res.logits_TE / router.temperature).mean(0)
        q = 2 / E
        balance = (q * torch.log(q / pbar) + (1 - q) * torch.log((1 - q) / (1 - pbar))).sum()
        objective = objective + cfg.balance_weight * balance
    (2.0 * objective).backward()
    torch.testing.assert_close(grad_w, weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_b, bias.grad, rtol=1e-5, atol=1e-7)


def test_padding_adds_no_load_and_no_loss(router_factory):
    router = router_factory()
    hidden = torch.randn(8, 2, H)
    padding = torch.zeros(8, 2, dtype=torch.bool)
    padding[5:, 1] = True  # the tail of the second sequence is padding
    torch.manual_seed(0)
    probs, routing_map = router(hidden, padding_mask=padding)
    flat_pad = padding.reshape(-1)
    assert not routing_map[flat_pad].any() and (probs[flat_pad] == 0).all()
    assert (routing_map[~flat_pad].sum(-1) >= 1).all()
    assert router.pop_expert_load().sum().item() == routing_map.sum().item()

    grads = _aux_grads(router, hidden, padding)
    garbage = hidden.clone()
    garbage[5:, 1] = torch.randn(3, H) * 100  # changing padded tokens must not change the loss
    grads_garbage = _aux_grads(router, garbage, padding)
    for a, b in zip(grads, grads_garbage):
        torch.testing.assert_close(a, b)


def test_reported_metrics_are_those_of_all_tokens_of_the_step(router_factory):
    """Two micro-batches of one layer: every metric is that of their tokens together, computed
    here from the routing maps the router returned (a true maximum, effective experts and max
    load from the summed load), and reaches the report's console text."""
    from megatron_dirmoe.metrics import install_metrics_tracker

    tracker = install_metrics_tracker()
    tracker.clear()
    router = router_factory(target_k=2, load_control_rate=0.0)  # the balance term on
    router.set_iteration(50)
    torch.manual_seed(1)
    maps = [router(torch.randn(16, 2, H) * scale)[1] for scale in (0.1, 30.0)]
    text = tracker.report(loss_scale=0.5, iteration=1, num_layers=2, track_names=[])
    got = {name: values[0].item() for name, values in tracker.last_per_layer.items()}

    counts = [m.sum(-1).float() for m in maps]
    # The micro-batches differ, so a mean of per-micro-batch values would read otherwise.
    assert counts[0].max() != counts[1].max()
    routing_map = torch.cat(maps)
    count, load = routing_map.sum(-1).float(), routing_map.sum(0).float()
    share = load / load.sum()
    assert got["dirmoe/active_experts"] == pytest.approx(count.mean().item())
    assert got["dirmoe/active_experts_max"] == count.max().item()
    assert got["dirmoe/load_simpson"] == pytest.approx((share * share).sum().item())
    assert got["dirmoe/effective_experts"] == pytest.approx(1 / (share * share).sum().item())
    assert got["dirmoe/max_load"] == pytest.approx(share.max().item() * E)
    assert got["dirmoe/tau"] == pytest.approx(router.temperature) == pytest.approx(1.15)
    assert got["dirmoe/prior_scale"] == pytest.approx(0.4)
    assert got["dirmoe/kl"] > 0 and got["dirmoe/balance_penalty"] > 0
    assert got["dirmoe/load_bias_spread"] == 0.0  # no load controller
    assert f"dirmoe/active_experts_max: {count.max().item():.2f} |" in text
    assert f"dirmoe/effective_experts: {1 / (share * share).sum().item():.2f} |" in text
    # Reported and cleared: the next report has nothing to say.
    assert tracker.report(loss_scale=1.0, iteration=2, num_layers=2, track_names=[]) == ""


def test_metrics_and_load_count_only_the_forward_that_builds_the_graph(router_factory):
    """Activation recompute runs the router once without grad and again with grad; evaluation
    runs it without grad. Only the graph-building forward is recorded, so a no-grad forward
    followed by a grad forward records exactly what the grad forward alone records."""
    from megatron_dirmoe.metrics import install_metrics_tracker

    tracker = install_metrics_tracker()
    hidden = torch.randn(16, 2, H)

    def recorded(router):
        sums = tracker.routing_sums
        values = torch.zeros(1) if sums is None else sums.clone()
        tracker.clear()
        return values, router.pop_expert_load()

    router = router_factory(target_k=2)
    tracker.clear()
    router.pop_expert_load()
    torch.manual_seed(3)
    router(hidden)
    alone, alone_load = recorded(router)
    assert alone.abs().sum() > 0 and alone_load.sum() > 0

    with torch.no_grad():
        router(hidden)  # the first pass of a recomputed layer
    nothing, no_load = recorded(router)
    assert nothing.abs().sum() == 0 and no_load.sum() == 0
    torch.manual_seed(3)
    router(hidden)  # the re-forward, with grad
    again, again_load = recorded(router)
    torch.testing.assert_close(again, alone)
    torch.testing.assert_close(again_load, alone_load)

    router.eval()
    router(hidden)
    evaluated, eval_load = recorded(router)
    assert evaluated.abs().sum() == 0 and eval_load.sum() == 0


def test_schedule_follows_iteration(router_factory):
    router = router_factory()
    assert router.temperature == pytest.approx(2.0) and router.prior_scale == pytest.approx(0.5)
    router.set_iteration(100)
    assert router.temperature == pytest.approx(0.3) and router.prior_scale == pytest.approx(0.3)


def test_router_requires_a_schedule_horizon(megatron_single_rank):
    from megatron_dirmoe.router import DirichletRouter

    with pytest.raises(ValueError, match="--dirmoe-schedule-iters"):
        DirichletRouter(tiny_transformer_config(), dirmoe_config=DirMoEConfig())
    with pytest.raises(ValueError, match="--dirmoe-target-k"):
        DirichletRouter(tiny_transformer_config(), dirmoe_config=DirMoEConfig(target_k=9, schedule_iters=5))


@pytest.mark.parametrize("source", ["dirmoe", "megatron"])
@pytest.mark.parametrize("scores", ["gates", "posterior-mean"])
def test_aux_loss_is_switch_loss_on_normalised_scores(router_factory, scores, source):
    """The router's own aux loss (--dirmoe-aux-loss-coeff), or Megatron's in its place
    (--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff, which replaces it rather
    than adding a second): on top of the other DirMoE losses the router gets the gradient of
    coeff * E / (T k) * sum_e load_e * sum_t s_te / sum_j s_tj, with s the gate probabilities
    pi or (`--dirmoe-aux-loss-scores posterior-mean`, the calibrated default) the posterior
    mean. The count controller is kept on the routed experts so that both routers route alike."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    coeff = 0.5
    hidden = torch.randn(8, 4, H)
    plain = router_factory(target_k=2, aux_loss_scores=scores, count_control_on="routed")
    plain.set_iteration(10)
    assert plain.aux_loss_coeff == 0.0  # 8 experts: no aux loss by default
    base_w, base_b = _aux_grads(plain, hidden)
    if source == "dirmoe":
        router = router_factory(target_k=2, aux_loss_scores=scores, aux_loss_coeff=coeff,
                                count_control_on="routed")
    else:  # replaces the router's own coefficient rather than adding to it
        router = router_factory(
            {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": coeff},
            target_k=2, aux_loss_scores=scores, aux_loss_coeff=0.03, count_control_on="routed")
    assert router.aux_loss_coeff == coeff
    router.set_iteration(10)
    grad_w, grad_b = _aux_grads(router, hidden)

    res, weight, bias = _reference_route(router, hidden)
    num_tokens = res.routing_map_TE.shape[0]
    load = res.routing_map_TE.sum(0).float()
    if scores == "gates":
        scores = res.gate_prob_TE / res.gate_prob_TE.sum(-1, keepdim=True)
    else:
        scores = res.alpha_q_TE / res.alpha_q_TE.sum(-1, keepdim=True)
        # The calibrated recipe's slab: the posterior mean is the softmax of the gate logits.
        logits = (hidden.reshape(-1, H) @ weight.T)[:, :E]
        torch.testing.assert_close(scores, torch.softmax(logits, dim=-1))
    switch = coeff * E / (num_tokens * num_tokens * 2) * (load * scores.sum(0)).sum()
    switch.backward()
    torch.testing.assert_close(grad_w - base_w, weight.grad, rtol=1e-4, atol=1e-7)
    # The posterior mean is the softmax of the centred logits: no gradient to the spike bias.
    expected_b = torch.zeros_like(bias) if bias.grad is None else bias.grad
    torch.testing.assert_close(grad_b - base_b, expected_b, rtol=1e-4, atol=1e-7)
    assert weight.grad.abs().sum() > 0
    assert "load_balancing_loss" in get_moe_metrics_tracker().metrics
    get_moe_metrics_tracker().clear()


def test_aux_loss_next_to_gate_routing_warns_once(router_factory, monkeypatch):
    """At k >= 2 of the default recipe the aux loss was measured to leave layers on the top-k
    fallback: building such a router says so, once per process (not once per layer); k = 1,
    routers without the aux loss and a count controller on the gates' own choice stay quiet."""
    import warnings

    import megatron_dirmoe.router as router_module

    aux = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2}
    monkeypatch.setattr(router_module, "_WARNED_AUX_WITH_GATES", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        router_factory(target_k=2)
        router_factory(aux, target_k=1)
        # 32 experts, k = 4: the recipe's own aux loss, with the count on the gates' own choice.
        assert router_factory({"num_moe_experts": 32}, target_k=4).aux_loss_coeff > 0
    assert not [w for w in caught if "fallback_frac" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # counting the gates' own choice ends the fallback
        router_factory(aux, target_k=2, count_control_on="gates")
    assert not [w for w in caught if "fallback_frac" in str(w.message)]
    with pytest.warns(UserWarning, match="--dirmoe-count-control-on partial.*fallback_frac"):
        router_factory(aux, target_k=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        router_factory(aux, target_k=2)
    assert not [w for w in caught if "fallback_frac" in str(w.message)]
    # The router's own aux loss with the count held on routed experts warns the same.
    monkeypatch.setattr(router_module, "_WARNED_AUX_WITH_GATES", False)
    with pytest.warns(UserWarning, match="--dirmoe-aux-loss-coeff.*count-control-on partial"):
        router_factory(target_k=2, aux_loss_coeff=1e-2, count_control_on="routed")


@pytest.mark.parametrize("num_experts, k, coeff", [
    (8, 4, 0.0), (16, 4, 0.0), (32, 2, 0.03), (32, 4, 0.03), (64, 8, 0.03)])
def test_router_resolves_the_fine_grained_defaults(router_factory, num_experts, k, coeff):
    """From 32 experts on (k >= 2), a router of the default recipe has its own aux loss (0.03
    on the posterior mean), its count controller counts the gates' own choice with a fallback
    token at 3k/4 and steps in proportion to the miss, and its load controller steps 0.01;
    otherwise none of these (the load controller steps 0.03)."""
    router = router_factory({"num_moe_experts": num_experts}, target_k=k)
    assert router.aux_loss_coeff == pytest.approx(coeff)
    assert router.load_control_rate == (0.01 if coeff else 0.03)
    assert router.dirmoe_config.aux_loss_coeff == pytest.approx(coeff)
    assert (router._fallback_counted, router.count_control_gain) == (
        (0.75, 4.0) if coeff > 0 else (1.0, 0.0))
    assert router._static_kwargs["aux_scores"] == ("posterior-mean" if coeff else "gates")
    off = router_factory({"num_moe_experts": num_experts}, target_k=k, aux_loss_coeff=0.0)
    assert (off.aux_loss_coeff, off._fallback_counted, off.count_control_gain) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("overrides, match", [
    ({"moe_router_enable_expert_bias": True, "moe_router_score_function": "sigmoid"},
     "--moe-router-enable-expert-bias"),
    ({"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 1e-2},
     "seq_aux_loss"),
])
def test_unsupported_megatron_balancing_fails_at_build(router_factory, overrides, match):
    with pytest.raises(ValueError, match=match):
        router_factory(overrides)
