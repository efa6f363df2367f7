"""The load controller: a per-expert bias b on the routing decision, stepped once per optimizer
step towards the mean expert's load (`DirMoEConfig.load_control_rate`, DeepSeek-V3's
auxiliary-loss-free balancing applied to DirMoE's gates)."""

from __future__ import annotations

import argparse

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig, dirmoe_config_from_args
from megatron_dirmoe.routing import _active_set, route

E, H = 8, 64


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


def test_config_defaults_and_flags():
    assert DirMoEConfig(target_k=1).load_control_rate == 0.0  # the balance term serves k = 1
    assert DirMoEConfig(target_k=4).load_control_rate == 0.03
    assert DirMoEConfig(recipe="paper", target_k=2).effective_load_control_rate == 0.0
    with pytest.raises(ValueError, match="--dirmoe-load-control-rate"):
        DirMoEConfig(load_control_rate=-0.1)
    with pytest.raises(ValueError, match="--dirmoe-load-control-rate has no effect"):
        dirmoe_config_from_args(argparse.Namespace(dirmoe_recipe="paper",
                                                   dirmoe_load_control_rate=0.01))
    # A stored config from before the controller balanced with the balance term alone.
    stored = {"recipe": "calibrated", "target_k": 2, "count_weight": 0.0,
              "count_control_rate": 0.03, "balance_weight": 0.1, "slab_mean": "gate",
              "tau_schedule": "cosine"}
    old = dirmoe_config_from_args(argparse.Namespace(dirmoe_config=stored))
    assert (old.load_control_rate, old.balance_weight) == (0.0, 0.1)


def test_megatron_expert_bias_flag_points_at_the_load_controller(megatron_single_rank):
    from megatron_dirmoe.router import DirichletRouter

    config = tiny_transformer_config()
    config.moe_router_enable_expert_bias = True
    with pytest.raises(ValueError, match="--dirmoe-load-control-rate"):
        DirichletRouter(config, dirmoe_config=DirMoEConfig(target_k=2, schedule_iters=10))
