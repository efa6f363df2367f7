"""The count controller: a per-layer bias c on the routing decision, stepped towards k routed
experts per token once per optimizer step (`DirMoEConfig.count_control_rate`)."""

from __future__ import annotations

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig, dirmoe_config_from_args as config_from_args
from megatron_dirmoe.routing import _active_set, eval_active_count, route

E, H = 8, 64


def _route(logits_TE, route_bias=None, training=False, **overrides):
    kwargs = dict(tau=0.5, posterior_scale=1000.0, alpha_floor=1e-3, alpha_ceiling=1e4,
                  leak=1e-3, route_threshold=0.125, max_active=E, renormalize=True,
                  rule="gate", fallback_k=2, slab="gate")
    kwargs.update(overrides)
    return route(logits_TE, None, torch.zeros(E), route_bias=route_bias, training=training,
                 **kwargs)


def test_count_bias_moves_the_routing_decision_only():
    torch.manual_seed(0)
    logits_TE = torch.randn(64, E) * 2.0
    base = _route(logits_TE)
    for c in (-0.7, 0.0, 0.4, 1.3):
        shifted = _route(logits_TE, route_bias=torch.tensor([c]))
        centred_TE = logits_TE - logits_TE.mean(-1, keepdim=True)
        expected_map, expected_fallback, _ = _active_set(centred_TE + c, 0.0, E, 2)
        assert torch.equal(shifted.routing_map_TE, expected_map)
        assert torch.equal(shifted.fallback_T, expected_fallback)
        # pi and the posterior do not see c; the weights are the same posterior mean,
        # renormalised over the (new) active set.
        torch.testing.assert_close(shifted.gate_prob_TE, base.gate_prob_TE)
        torch.testing.assert_close(shifted.alpha_q_TE, base.alpha_q_TE)
        mean_TE = torch.softmax(centred_TE, -1) * expected_map
        torch.testing.assert_close(shifted.probs_TE, mean_TE / mean_TE.sum(-1, keepdim=True))
        counts = eval_active_count(shifted, route_threshold=0.125, leak=1e-3, max_active=E,
                                   rule="gate", fallback_k=2, route_bias=torch.tensor([c]))
        assert torch.equal(counts, expected_map.sum(-1))
    # A larger c routes more experts on average: the handle the controller turns.
    means = [_route(logits_TE, torch.tensor([c])).routing_map_TE.sum(-1).float().mean()
             for c in (-1.0, 0.0, 1.0)]
    assert means[0] < means[1] < means[2]
    # c = 0 is the rule without a controller (pi >= 1/2).
    assert torch.equal(_route(logits_TE, torch.tensor([0.0])).routing_map_TE, base.routing_map_TE)


def test_count_bias_needs_the_gate_rule():
    with pytest.raises(ValueError, match="route_bias"):
        _route(torch.randn(4, E), route_bias=torch.tensor([0.5]), rule="weight")


@pytest.fixture
def make_router(megatron_single_rank):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.router import DirichletRouter

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))

    def make(**overrides):
        torch.manual_seed(0)
        router = DirichletRouter(tiny_transformer_config(),
                                 dirmoe_config=DirMoEConfig(schedule_iters=100, **overrides))
        router.set_layer_number(1)
        return router

    return make


def _train_forward(router, hidden):
    probs, routing_map = router(hidden)
    probs.sum().backward()
    return routing_map


def test_controller_steps_c_towards_k_once_per_optimizer_step(make_router):
    from megatron_dirmoe.router import update_count_control

    router = make_router(target_k=2)
    rate = router.dirmoe_config.count_control_rate
    assert rate == 0.03 and router.dirmoe_config.count_weight == 0.0  # the calibrated defaults
    assert router.count_bias.dtype == torch.float32 and router.count_bias.tolist() == [0.0]
    hidden = torch.randn(16, 2, H)

    # Two micro-batches in one step: their sums add, and one update follows.
    maps = [_train_forward(router, hidden) for _ in range(2)]
    routed = sum(int(m.sum()) for m in maps)
    assert router.count_sums.tolist() == [float(routed), 64.0]
    assert update_count_control(router) == 1
    expected = 0.0 if routed == 2 * 64 else (rate if routed < 2 * 64 else -rate)
    torch.testing.assert_close(router.count_bias, torch.tensor([expected]))
    assert router.count_sums.tolist() == [0.0, 0.0]

    # Force the miss either way through the spike bias: too few experts -> c goes up.
    with torch.no_grad():
        router.count_bias.zero_()
        router.spike_bias.fill_(-50.0)  # no gate on: every token on the top-k fallback ...
        router.max_active = router.dirmoe_config.target_k  # (count = k exactly)
    _train_forward(router, hidden)
    update_count_control(router)
    assert router.count_bias.tolist() == [0.0]  # ... which is k: no step
    with torch.no_grad():
        router.spike_bias.fill_(50.0)  # every gate on, cut to max_active = E
        router.max_active = E
    _train_forward(router, hidden)
    update_count_control(router)
    torch.testing.assert_close(router.count_bias, torch.tensor([-rate]))

    # Evaluation forwards and a step without tokens leave c alone.
    router.eval()
    router(hidden)
    router.train()
    update_count_control(router)
    torch.testing.assert_close(router.count_bias, torch.tensor([-rate]))


def test_c_is_checkpointed_in_fp32_and_absent_without_a_controller(make_router):
    router = make_router(target_k=2)
    with torch.no_grad():
        router.count_bias.fill_(0.123456789)
    state = router.state_dict()
    assert "count_bias" in state
    other = make_router(target_k=2).to(torch.bfloat16)  # as Float16Module casts buffers
    other.load_state_dict(state)
    assert other.count_bias.dtype == torch.float32
    assert other.count_bias.item() == pytest.approx(0.123456789, abs=1e-8)

    off = make_router(target_k=2, count_control_rate=0.0)
    assert off.count_bias is None and "count_bias" not in off.state_dict()


def test_config_defaults_and_flags():
    assert DirMoEConfig(target_k=1).count_weight == 0.1  # no renormalisation: the penalty stays
    assert DirMoEConfig(target_k=2).count_weight == 0.0  # the controller holds the count
    assert DirMoEConfig(target_k=2, count_control_rate=0.0).count_weight == 0.01
    assert DirMoEConfig(recipe="paper").effective_count_control_rate == 0.0
    with pytest.raises(ValueError, match="--dirmoe-count-control-rate"):
        DirMoEConfig(count_control_rate=-0.1)
    with pytest.raises(ValueError, match="--dirmoe-count-control-rate has no effect"):
        config_from_args(_args(dirmoe_recipe="paper", dirmoe_count_control_rate=0.01))
    # A stored config from before the controller held its count with the penalty alone.
    stored = {"recipe": "calibrated", "target_k": 2, "count_weight": 0.01,
              "slab_mean": "gate", "tau_schedule": "cosine"}
    old = config_from_args(_args(dirmoe_config=stored))
    assert old.count_control_rate == 0.0 and old.count_weight == 0.01


def _args(**values):
    import argparse

    return argparse.Namespace(**values)


def test_a_loop_that_never_steps_the_controller_is_warned(make_router, monkeypatch):
    import megatron_dirmoe.router as router_module

    monkeypatch.setattr(router_module, "_WARNED_UNSTEPPED_CONTROL", False)
    import warnings

    router = make_router(target_k=2)
    hidden = torch.randn(8, 2, H)
    with warnings.catch_warnings(record=True) as early:
        warnings.simplefilter("always")
        router.set_iteration(0)
        _train_forward(router, hidden)
        router.set_iteration(1)  # the step's update may still come (Megatron runs it later)
        router_module.update_count_control(router)
        _train_forward(router, hidden)
        router.set_iteration(2)
        _train_forward(router, hidden)
    assert not [w for w in early if "update_count_control" in str(w.message)]
    with pytest.warns(UserWarning, match="update_count_control"):
        router.set_iteration(3)  # two steps of counts and no update


def test_megatron_train_steps_the_controller_in_finalize_model_grads(make_router):
    """Under megatron.training's train(), the first forward step wraps
    config.finalize_model_grads_func once, so the controllers step after every optimizer step's
    last backward, where Megatron steps its own expert bias."""
    import types

    from megatron_dirmoe.training.gpu import _hook_count_control

    router = make_router(target_k=2)
    calls = []
    config = types.SimpleNamespace(
        finalize_model_grads_func=lambda model, *a, **k: calls.append((model, a, k)))
    _hook_count_control(config)
    wrapped = config.finalize_model_grads_func
    _hook_count_control(config)  # every forward step calls it: wrapped once
    assert config.finalize_model_grads_func is wrapped
    with torch.no_grad():
        router.spike_bias.fill_(50.0)  # every gate on: more than k experts per token
    _train_forward(router, torch.randn(8, 2, H))
    wrapped([router], 123, force_all_reduce=True)
    assert calls == [([router], (123,), {"force_all_reduce": True})]
    assert router.count_bias.item() == pytest.approx(-0.03)
    # Before train() sets the function there is nothing to wrap.
    bare = types.SimpleNamespace(finalize_model_grads_func=None)
    _hook_count_control(bare)
    assert bare.finalize_model_grads_func is None
