"""Routing metrics over several ranks (CPU, gloo): the values are those of the whole global batch
whatever the layout, at the cost the README states (per layer and micro-batch one all-reduce
over TP x CP when that group has several ranks, none otherwise; one all-reduce per step for all
metrics; no host sync until the report).

Each rank's router sees tokens built so that its shard covers only a few experts while the
global batch loads all E experts equally: a globally uniform router. Effective experts computed
per shard and then averaged (what the metrics used to do) would read E / shards here; computed
from the globally reduced load they read E.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import spawn

E, HIDDEN, SEQ, MICRO = 8, 32, 8, 2

# name: (tp, pp, ep) on 4 ranks; DP is what remains.
LAYOUTS = {
    "dp4_ep4": (1, 1, 4),
    "tp2_dp2": (2, 1, 1),
    "tp4": (4, 1, 1),
    "pp2_dp2_ep2": (1, 2, 2),
    "tp2_pp2": (2, 2, 1),
}


def _router(tp: int, pp: int):
    from tiny_config import tiny_transformer_config

    from megatron_dirmoe.config import DirMoEConfig
    from megatron_dirmoe.router import DirichletRouter
    from megatron.core import parallel_state as ps

    config = tiny_transformer_config(
        num_layers=pp, hidden_size=HIDDEN, num_moe_experts=E, moe_router_topk=4,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=tp > 1, pipeline_dtype=torch.float32)
    # The load controller on (off by default at k = 1), the balance term kept.
    router = DirichletRouter(config, dirmoe_config=DirMoEConfig(
        schedule_iters=10, target_k=1, load_control_rate=0.03, balance_weight=0.1))
    router.set_layer_number(ps.get_pipeline_model_parallel_rank() + 1)  # one layer per stage
    with torch.no_grad():  # spike logit of expert e = 50 x_e: a one-hot token picks its expert
        router.weight.zero_()
        router.weight[:E, :E] = 50.0 * torch.eye(E)
    return router


def _tokens(shard: int, shards: int, tokens: int, extra: bool) -> torch.Tensor:
    """One-hot tokens [tokens, HIDDEN] of token shard `shard`: they cycle over the E / shards
    experts of this shard, so every expert gets tokens / (E / shards) of them. `extra`: the
    first token also asks for two more experts (3 experts for one token of the whole batch)."""
    per = E // shards
    experts = shard * per + torch.arange(tokens) % per
    x = torch.nn.functional.one_hot(experts, HIDDEN).float()
    if extra:
        x[0, (experts[0] + 1) % E] = x[0, (experts[0] + 2) % E] = 1.0
    return x


def run_layouts(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.metrics import install_metrics_tracker
    from megatron_dirmoe.router import update_count_control
    from sync_count import HostSyncCounter, count_collectives

    results = {}
    for name, (tp, pp, ep) in LAYOUTS.items():
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep)
        dp = world_size // (tp * pp)
        shard = ps.get_data_parallel_rank() * tp + ps.get_tensor_model_parallel_rank()
        tracker = install_metrics_tracker(num_experts=E)
        tracker.clear()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / MICRO))
        router = _router(tp, pp)
        batch = 2  # sequences per DP rank and micro-batch
        local = SEQ // tp * batch
        view = {}
        for case in ("uniform", "one_token_three_experts"):
            extra = case != "uniform" and rank == 0
            with count_collectives() as per_layer, HostSyncCounter() as syncs:
                for _ in range(MICRO):
                    x = _tokens(shard, tp * dp, local, extra).view(SEQ // tp, batch, HIDDEN)
                    probs, _ = router(x.requires_grad_())
                    probs.sum().backward()
            with count_collectives() as per_step:
                tracker.report(loss_scale=1.0 / MICRO, iteration=1, num_layers=pp,
                               force_initialize=True, track_names=[])
            with count_collectives() as control:
                update_count_control(router)
            view[case] = dict(count_bias=router.count_bias.item(), control=dict(control),
                load_bias=router.load_bias.tolist(),
                metrics={k: v.tolist() for k, v in tracker.last_per_layer.items()},
                per_layer=dict(per_layer), per_step=dict(per_step), syncs=syncs.count,
                tokens=MICRO * local * world_size // pp)
        view.update(tp=tp, dp=dp, pp=pp, stage=ps.get_pipeline_model_parallel_rank())
        views = [None] * world_size
        dist.all_gather_object(views, view)
        results[name] = views
    return results


@pytest.fixture(scope="module")
def layouts():
    return spawn(4, run_layouts)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_uniform_router_reads_all_experts_whatever_the_layout(layouts, name):
    for view in layouts[name]:  # every rank reports the global values
        for layer in range(view["pp"]):
            got = {k: v[layer] for k, v in view["uniform"]["metrics"].items()}
            assert got["dirmoe/effective_experts"] == pytest.approx(E, rel=1e-6), got
            assert got["dirmoe/max_load"] == pytest.approx(1.0, rel=1e-6)
            assert got["dirmoe/load_simpson"] == pytest.approx(1 / E, rel=1e-6)
            assert got["dirmoe/active_experts"] == 1.0 and got["dirmoe/active_experts_max"] == 1
            assert got["dirmoe/fallback_frac"] == 0.0 and got["dirmoe/tau"] == 2.0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_active_experts_max_is_the_true_maximum(layouts, name):
    """One token of the whole step (on rank 0) goes to 3 experts, every other one to 1."""
    for view in layouts[name]:
        tokens = view["one_token_three_experts"]["tokens"]
        for layer in range(view["pp"]):
            got = {k: v[layer] for k, v in view["one_token_three_experts"]["metrics"].items()}
            has_extra = layer == 0  # rank 0 is on the first stage
            assert got["dirmoe/active_experts_max"] == (3 if has_extra else 1)
            expected = (tokens + 2 * MICRO) / tokens if has_extra else 1.0
            assert got["dirmoe/active_experts"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_collectives_and_host_syncs_per_step(layouts, name):
    """Per layer and micro-batch: one all-reduce over TP x CP when it has several ranks (the
    balance statistic and the token count together), none otherwise, and nothing over DP. Per
    step: one all-reduce over all ranks for every metric. No host sync in the router."""
    for view in layouts[name]:
        for case in ("uniform", "one_token_three_experts"):
            counts = view[case]
            calls = {k: v for k, v in counts["per_layer"].items() if isinstance(k, str)}
            if view["tp"] > 1:
                assert calls == {"all_reduce": MICRO}, counts
                assert counts["per_layer"][("all_reduce", view["tp"])] == MICRO
            else:
                assert calls == {}, counts
            assert {k: v for k, v in counts["per_step"].items() if isinstance(k, str)} == {
                "all_reduce": 1}
            assert counts["per_step"][("all_reduce", 4)] == 1
            assert counts["syncs"] == 0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_count_controller_steps_on_the_global_count(layouts, name):
    """The count controller reads the count of the whole step: only rank 0 sees the token with
    three experts, yet every rank of its stage steps c down (one all-reduce over TP x DP x CP
    per step for all layers), and the exact count (uniform case) leaves c at 0."""
    for view in layouts[name]:
        assert view["uniform"]["count_bias"] == 0.0
        has_extra = view["stage"] == 0  # rank 0 is on the first stage
        assert view["one_token_three_experts"]["count_bias"] == pytest.approx(
            -0.03 if has_extra else 0.0, abs=1e-9)
        assert view["one_token_three_experts"]["control"].get("all_reduce") == 1


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_load_controller_steps_on_the_global_load(layouts, name):
    """Each rank's shard loads only some experts, but the global load is uniform: b stays 0.
    With the extra token (rank 0: experts 1 and 2 get one more token per micro-batch) those two
    are above the mean and step down, the rest step up, on every rank of the first stage, from
    the same single all-reduce as the count controller."""
    for view in layouts[name]:
        assert view["uniform"]["load_bias"] == [0.0] * E
        has_extra = view["stage"] == 0
        expected = ([0.03, -0.03, -0.03] + [0.03] * (E - 3)) if has_extra else [0.0] * E
        assert view["one_token_three_experts"]["load_bias"] == pytest.approx(expected, abs=1e-9)
