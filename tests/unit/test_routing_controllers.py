"""The routing controllers, biases on the routing decision stepped once per optimizer step:
the count controller's c, one per layer, towards k routed experts per token
(`DirMoEConfig.count_control_rate`), and the load controller's b, one per expert, towards the
mean expert's load (`DirMoEConfig.load_control_rate`, DeepSeek-V3's auxiliary-loss-free
balancing applied to DirMoE's gates)."""

from __future__ import annotations

import argparse

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


def test_count_control_gain_steps_c_in_proportion_to_the_miss(make_router):
    """`count_control_gain` g > 0: c moves by rate * clamp(g * (k - n) / k, -1, 1), a full step
    from a miss of k / g on; g = 0 is the sign rule (a full step for any miss)."""
    from megatron_dirmoe.router import update_count_control

    k, tokens = 2, 100.0
    # (gain, mean count n) -> the step in units of rate.
    cases = {(4.0, 2.1): -0.2, (4.0, 1.95): 0.1, (4.0, 1.0): 1.0, (4.0, 3.0): -1.0,
             (4.0, 2.0): 0.0, (0.0, 2.1): -1.0, (0.0, 1.95): 1.0, (2.5, 1.5): 0.625}
    for (gain, count), expected in cases.items():
        router = make_router(target_k=k, count_control_gain=gain)
        assert router.count_control_gain == gain
        router.count_sums = torch.tensor([count * tokens, tokens])
        update_count_control(router)
        rate = router.count_control_rate
        assert router.count_bias.item() == pytest.approx(expected * rate, abs=1e-7), (gain, count)
    # The resolved default: proportional where the controller counts the gates' choice.
    assert make_router(target_k=2).count_control_gain == 0.0
    assert make_router(target_k=2, count_control_on="gates").count_control_gain == 4.0
    with pytest.raises(ValueError, match="--dirmoe-count-control-gain"):
        DirMoEConfig(count_control_gain=-1.0)


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


# ---------------------------------------------------------------------- load controller
def test_a_per_expert_route_bias_moves_each_experts_decision_only():
    torch.manual_seed(0)
    logits_TE = torch.randn(64, E) * 2.0
    bias_E = torch.linspace(-1.0, 1.0, E)
    kwargs = dict(tau=0.5, posterior_scale=1000.0, alpha_floor=1e-3, alpha_ceiling=1e4,
                  leak=1e-3, route_threshold=0.125, max_active=E, renormalize=True,
                  rule="gate", fallback_k=2, slab="gate", training=False)
    base = route(logits_TE, None, torch.zeros(E), **kwargs)
    shifted = route(logits_TE, None, torch.zeros(E), route_bias=bias_E, **kwargs)
    centred_TE = logits_TE - logits_TE.mean(-1, keepdim=True)
    expected_map, _, _ = _active_set(centred_TE + bias_E, 0.0, E, 2)
    assert torch.equal(shifted.routing_map_TE, expected_map)
    torch.testing.assert_close(shifted.gate_prob_TE, base.gate_prob_TE)
    # The expert with the largest b is chosen more often than the one with the smallest.
    load_E = shifted.routing_map_TE.sum(0)
    assert load_E[-1] > base.routing_map_TE.sum(0)[-1] and load_E[0] < base.routing_map_TE.sum(0)[0]


def test_count_controller_on_the_gates_sees_the_fallback(make_router):
    """While every token rides the top-k fallback the routed count is exactly k, so the
    default controller (`count_control_on` 'routed') stays put; counting only what the gates
    chose ('gates') sees 0 experts per token, and 'partial' 3k/4, and both raise c by a full
    step from the first one (the miss of 'partial', k/4, is where its gain of 4 saturates)."""
    from megatron_dirmoe.router import update_count_control

    hidden = torch.randn(16, 2, H)
    moved = {}
    for on, counted in (("routed", 64.0), ("gates", 0.0), ("partial", 48.0)):
        router = make_router(target_k=2, count_control_on=on)
        with torch.no_grad():
            router.spike_bias.fill_(-50.0)  # no gate passes: every token on the fallback
        routing_map = _train_forward(router, hidden)
        assert routing_map.sum(-1).tolist() == [2] * 32  # fallback_k = k experts each
        assert router.count_sums.tolist() == [counted, 32.0]
        update_count_control(router)
        moved[on] = router.count_bias.item()
    rate = DirMoEConfig(target_k=2).count_control_rate
    assert moved == {"routed": 0.0, "gates": pytest.approx(rate),
                     "partial": pytest.approx(rate)}
    # Tokens whose gates chose their experts count them under every setting.
    for on in ("gates", "partial"):
        router = make_router(target_k=2, count_control_on=on)
        with torch.no_grad():
            router.spike_bias.copy_(torch.tensor([50.0, 50.0, 50.0] + [-50.0] * (E - 3)))
        _train_forward(router, hidden)
        assert router.count_sums.tolist() == [96.0, 32.0]
    with pytest.raises(ValueError, match="--dirmoe-count-control-on"):
        DirMoEConfig(count_control_on="fallback")
    with pytest.raises(ValueError, match="--dirmoe-aux-loss-scores"):
        DirMoEConfig(aux_loss_scores="softmax")
    # Without Megatron's aux loss nothing reads the scores: a flag with no effect is an error.
    def given(balancing, coeff):
        return argparse.Namespace(dirmoe_aux_loss_scores="posterior-mean",
                                  moe_router_load_balancing_type=balancing,
                                  moe_aux_loss_coeff=coeff)

    for balancing, coeff in (("none", 0.03), ("aux_loss", 0.0), (["seq_aux_loss"], [0.03])):
        with pytest.raises(ValueError, match="--dirmoe-aux-loss-scores has no effect without"):
            config_from_args(given(balancing, coeff))
    assert config_from_args(given("aux_loss", 0.03)).aux_loss_scores == "posterior-mean"
    assert config_from_args(given(["aux_loss"], [0.03])).aux_loss_scores == "posterior-mean"
    # From 32 experts and k = 4 on the router's own aux loss reads them; Megatron's replaces
    # it, never both.
    own = argparse.Namespace(dirmoe_aux_loss_scores="gates", dirmoe_target_k=4, num_experts=32,
                             moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0)
    assert config_from_args(own).aux_loss_coeff == pytest.approx(3e-2)
    own.num_experts = 16
    with pytest.raises(ValueError, match="--dirmoe-aux-loss-scores has no effect without"):
        config_from_args(own)
    own.dirmoe_aux_loss_coeff, own.moe_aux_loss_coeff = 0.05, 1e-2
    with pytest.raises(ValueError, match="--dirmoe-aux-loss-coeff and --moe-aux-loss-coeff"):
        config_from_args(own)
    # Megatron takes a list of types with one coefficient for all, or one per type.
    own.moe_router_load_balancing_type = ["none", "aux_loss"]
    with pytest.raises(ValueError, match="--dirmoe-aux-loss-coeff and --moe-aux-loss-coeff"):
        config_from_args(own)
    own.moe_aux_loss_coeff = [1e-2, 0.0]
    assert config_from_args(own).aux_loss_coeff == 0.05


def test_controller_steps_b_against_the_mean_load(make_router):
    from megatron_dirmoe.router import update_count_control

    router = make_router(target_k=2)
    rate = router.dirmoe_config.load_control_rate
    assert rate == 0.03 and router.dirmoe_config.balance_weight == 0.0  # the k >= 2 defaults
    assert router.balance_scale == 0.0
    assert router.load_bias.dtype == torch.float32 and router.load_bias.tolist() == [0.0] * E
    hidden = torch.randn(16, 2, H)
    # Experts 0 and 1 always on, the others never: every token routes to {0, 1}.
    with torch.no_grad():
        router.spike_bias.copy_(torch.tensor([50.0, 50.0] + [-50.0] * (E - 2)))
    maps = [_train_forward(router, hidden) for _ in range(2)]  # two micro-batches, one step
    assert router.load_sums.tolist() == sum(m.sum(0).float() for m in maps).tolist()
    assert router.load_sums.tolist() == [64.0, 64.0] + [0.0] * (E - 2)
    assert update_count_control(router) == 1
    torch.testing.assert_close(router.load_bias, torch.tensor([-rate, -rate] + [rate] * (E - 2)))
    assert router.load_sums.tolist() == [0.0] * E
    # The logs show the spread of b (max - min), and no balance term at these defaults.
    from megatron_dirmoe.metrics import install_metrics_tracker

    tracker = install_metrics_tracker()
    tracker.clear()
    _train_forward(router, hidden)
    tracker.report(loss_scale=1.0, iteration=1, num_layers=2, track_names=[])
    got = {name: values[0].item() for name, values in tracker.last_per_layer.items()}
    assert got["dirmoe/load_bias_spread"] == pytest.approx(2 * rate)
    assert "dirmoe/balance_penalty" not in got
    update_count_control(router)  # (that forward's step)
    router.load_bias.copy_(torch.tensor([-rate, -rate] + [rate] * (E - 2)))
    # A balanced step (every expert at the mean) and a step without tokens leave b alone.
    before = router.load_bias.clone()
    with torch.no_grad():
        router.spike_bias.fill_(50.0)  # every gate on: each expert gets every token
    _train_forward(router, hidden)
    update_count_control(router)
    assert torch.equal(router.load_bias, before)
    router.eval()
    router(hidden)
    router.train()
    update_count_control(router)
    assert torch.equal(router.load_bias, before)


def test_a_starved_expert_recovers_under_the_controller(make_router):
    """No dead experts by construction: an expert that no token picks gains `rate` per step on
    its decision until it is routed; the load then settles near uniform."""
    from megatron_dirmoe.router import update_count_control

    router = make_router(target_k=2, load_control_rate=0.1)
    hidden = torch.randn(32, 4, H)
    with torch.no_grad():
        router.spike_bias[3] -= 4.0  # expert 3 starts far below every token's threshold
    first = _train_forward(router, hidden)
    assert first[:, 3].sum() == 0
    loads = []
    for _ in range(120):
        routing_map = _train_forward(router, hidden)
        loads.append(routing_map.sum(0).float())
        update_count_control(router)
    late_E = torch.stack(loads[-20:]).mean(0)
    uniform = late_E.sum() / E
    assert late_E[3] >= 0.5 * uniform, late_E
    assert late_E.min() >= 0.5 * uniform, late_E
    assert router.load_bias[3] > 1.0  # it got there through its own b


def test_b_is_checkpointed_in_fp32_and_absent_without_a_controller(make_router):
    router = make_router(target_k=2)
    with torch.no_grad():
        router.load_bias.copy_(torch.linspace(-0.123456789, 0.123456789, E))
    state = router.state_dict()
    assert "load_bias" in state
    other = make_router(target_k=2).to(torch.bfloat16)  # as Float16Module casts buffers
    other.load_state_dict(state)
    assert other.load_bias.dtype == torch.float32
    torch.testing.assert_close(other.load_bias, state["load_bias"], rtol=0, atol=1e-8)
    for off in (make_router(target_k=1), make_router(target_k=2, load_control_rate=0.0)):
        assert off.load_bias is None and "load_bias" not in off.state_dict()


def test_floor_controller_lifts_only_starved_experts(make_router):
    """Below a floor of 1 b_i rises while expert i gets less than that share of the mean load,
    falls back toward 0 once it gets more, and never goes below 0: it cannot push an expert off
    its gates' own choice, only lift a starved one."""
    from megatron_dirmoe.router import update_count_control

    router = make_router(target_k=1, load_control_rate=0.03, load_control_floor=0.5)
    cfg = router.dirmoe_config
    assert (cfg.load_control_rate, cfg.load_control_floor, cfg.balance_weight) == (0.03, 0.5, 0.1)
    rate = cfg.load_control_rate
    # Loads against the mean, 8 tokens per expert: experts 0 and 1 are below half of it, expert
    # 2 sits on it (no step), the others above.
    router.load_sums.copy_(torch.tensor([0.0, 3.0, 4.0, 8.0, 8.0, 9.0, 12.0, 20.0]))
    router._counting_since = 0
    assert update_count_control(router) == 1
    torch.testing.assert_close(router.load_bias,
                               torch.tensor([rate, rate, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    # Once expert 0 gets enough, its b steps back down, and stops at 0.
    router.load_sums.copy_(torch.tensor([8.0, 2.0, 4.0, 8.0, 8.0, 9.0, 12.0, 13.0]))
    update_count_control(router)
    torch.testing.assert_close(router.load_bias,
                               torch.tensor([0.0, 2 * rate, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    router.load_sums.copy_(torch.tensor([8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]) * 2)
    router.load_sums[0] = 30.0
    update_count_control(router)
    assert router.load_bias.min() >= 0.0 and router.load_bias[1] == pytest.approx(rate)
    # The same numbers with a floor of 1: every expert toward the mean, b of either sign.
    two_sided = make_router(target_k=1, load_control_rate=0.03)
    assert two_sided.dirmoe_config.balance_weight == 0.0
    two_sided.load_sums.copy_(torch.tensor([0.0, 3.0, 4.0, 8.0, 8.0, 9.0, 12.0, 20.0]))
    update_count_control(two_sided)
    torch.testing.assert_close(two_sided.load_bias,
                               torch.tensor([rate] * 3 + [0.0] * 2 + [-rate] * 3))


def test_a_starved_expert_recovers_under_the_floor_controller(make_router):
    """k = 1: an expert that no token picks, with the balance term's gradient not applied (no
    optimizer here), is lifted by the floor controller alone to at least a quarter of uniform."""
    from megatron_dirmoe.router import update_count_control

    router = make_router(target_k=1, load_control_rate=0.03, load_control_floor=0.5)
    hidden = torch.randn(32, 4, H)
    with torch.no_grad():
        router.spike_bias[3] -= 4.0
    assert _train_forward(router, hidden)[:, 3].sum() == 0
    loads = []
    for _ in range(200):
        loads.append(_train_forward(router, hidden).sum(0).float())
        update_count_control(router)
    late_E = torch.stack(loads[-20:]).mean(0)
    assert late_E[3] >= 0.25 * late_E.sum() / E, late_E
    assert router.load_bias[3] > 1.0 and router.load_bias.min() >= 0.0


def test_load_control_config_defaults_and_flags():
    assert DirMoEConfig(target_k=1).load_control_rate == 0.0  # the balance term serves k = 1
    # From k = 2 on: 0.03, or 0.01 next to the fine-grained aux loss (from 32 experts on).
    assert DirMoEConfig(target_k=4).load_control_rate is None  # E not known yet
    assert DirMoEConfig(target_k=4).calibrated_for(16).load_control_rate == 0.03
    assert DirMoEConfig(target_k=4).calibrated_for(32).load_control_rate == 0.01
    assert DirMoEConfig(recipe="paper", target_k=2).effective_load_control_rate == 0.0
    with pytest.raises(ValueError, match="--dirmoe-load-control-rate"):
        DirMoEConfig(load_control_rate=-0.1)
    for floor in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"--dirmoe-load-control-floor .* \(0, 1\]"):
            DirMoEConfig(load_control_floor=floor)
    for name in ("load_control_rate", "load_control_floor"):
        with pytest.raises(ValueError, match=f"--dirmoe-{name.replace('_', '-')} has no effect"):
            config_from_args(argparse.Namespace(dirmoe_recipe="paper", **{f"dirmoe_{name}": 0.5}))
    # The floor without a controller (off by default at k = 1) would do nothing.
    with pytest.raises(ValueError, match="--dirmoe-load-control-floor has no effect without the "
                                         "load controller: give --dirmoe-load-control-rate"):
        config_from_args(argparse.Namespace(dirmoe_target_k=1, dirmoe_load_control_floor=0.5))
    floor = config_from_args(argparse.Namespace(dirmoe_target_k=1, dirmoe_load_control_floor=0.5,
                                                dirmoe_load_control_rate=0.03))
    assert (floor.load_control_floor, floor.balance_weight) == (0.5, 0.1)
    # A stored config from before the controller balanced with the balance term alone.
    stored = {"recipe": "calibrated", "target_k": 2, "count_weight": 0.0,
              "count_control_rate": 0.03, "balance_weight": 0.1, "slab_mean": "gate",
              "tau_schedule": "cosine"}
    old = config_from_args(argparse.Namespace(dirmoe_config=stored))
    assert (old.load_control_rate, old.balance_weight) == (0.0, 0.1)
    # One from before the floor stepped b toward the mean load.
    one = config_from_args(argparse.Namespace(dirmoe_config=dict(
        stored, target_k=1, load_control_rate=0.0, count_weight=0.1)))
    two = config_from_args(argparse.Namespace(dirmoe_config=dict(stored,
                                                                   load_control_rate=0.03,
                                                                   balance_weight=0.0)))
    assert (one.load_control_rate, one.load_control_floor) == (0.0, 1.0)
    assert (two.load_control_rate, two.load_control_floor, two.balance_weight) == (0.03, 1.0, 0.0)


def test_megatron_expert_bias_flag_points_at_the_load_controller(megatron_single_rank):
    from megatron_dirmoe.router import DirichletRouter

    config = tiny_transformer_config()
    config.moe_router_enable_expert_bias = True
    with pytest.raises(ValueError, match="--dirmoe-load-control-rate"):
        DirichletRouter(config, dirmoe_config=DirMoEConfig(target_k=2, schedule_iters=10))
