"""TP, EP, PP layouts of a tiny DirMoE GPT give the single-rank loss and gradients (CPU, gloo).

One spawn per world size runs all of its layouts, so the ~8 s Megatron import is paid once per
rank. See `harness.py` for how weights, data and training-mode noise are made identical.
"""

from __future__ import annotations

import pytest

from harness import Case, run_cases, spawn

LOSS_RTOL = 1e-5  # fp32, relative
GRAD_RTOL = 1e-5  # max |g - g_ref| / max |g_ref| per tensor

WORLD2 = [
    Case("tp2_sp_allgather", tp=2),
    Case("tp2_sp_alltoall", tp=2, dispatcher="alltoall"),
    Case("tp2_sp_etp2_alltoall", tp=2, etp=2, dispatcher="alltoall"),
    Case("tp2_sp_alltoall_train_padded", tp=2, dispatcher="alltoall", training=True, padding=True),
    Case("ep2_allgather", ep=2),
    Case("ep2_alltoall", ep=2, dispatcher="alltoall"),
    Case("ep2_allgather_train", ep=2, training=True),
    Case("ep2_alltoall_train_padded", ep=2, dispatcher="alltoall", training=True, padding=True),
    Case("pp2_allgather", pp=2),
    Case("pp2_alltoall_train", pp=2, dispatcher="alltoall", training=True),
    Case("pp2_alltoall_train_2microbatches", pp=2, dispatcher="alltoall", training=True,
         microbatches=2),
    Case("ep2_alltoall_dead_rank", ep=2, dispatcher="alltoall", forced="dead_rank"),
    Case("ep2_alltoall_single_expert", ep=2, dispatcher="alltoall", forced="single"),
    Case("tp2_sp_alltoall_single_expert", tp=2, dispatcher="alltoall", forced="single"),
]
WORLD4 = [
    Case("ep2_tp2_allgather", ep=2, tp=2),
    Case("ep2_tp2_alltoall", ep=2, tp=2, dispatcher="alltoall"),
    Case("ep2_tp2_alltoall_train_padded", ep=2, tp=2, dispatcher="alltoall", training=True,
         padding=True),
    Case("ep4_e8_allgather", ep=4, num_experts=8),
    Case("ep4_e8_alltoall", ep=4, num_experts=8, dispatcher="alltoall"),
    Case("ep4_e8_alltoall_train", ep=4, num_experts=8, dispatcher="alltoall", training=True),
    Case("ep4_e8_alltoall_dead_ranks", ep=4, num_experts=8, dispatcher="alltoall",
         forced="dead_rank"),
    Case("ep2_pp2_alltoall_train", ep=2, pp=2, dispatcher="alltoall", training=True),
]


@pytest.fixture(scope="module")
def world2():
    return spawn(2, run_cases, WORLD2)


@pytest.fixture(scope="module")
def world4():
    return spawn(4, run_cases, WORLD4)


def _check(result: dict, case: Case) -> None:
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=LOSS_RTOL)
    bad = {k: v for k, v in result["grad_rel_err"].items() if not v <= GRAD_RTOL}
    assert not bad, f"gradients differ from the single-rank run: {bad}"
    # Replicated shards (DP, and SP-replicated params over TP) must agree after reduction.
    assert result["replica_err"] <= 1e-6
    reached = result["expert_grad_max"] > 0  # [layers, experts]
    E = case.num_experts
    if case.forced == "dead_rank":
        assert reached[:, : E // 2].all() and not reached[:, E // 2 :].any()
    elif case.forced == "single":
        assert reached[:, 0].all() and not reached[:, 1:].any()
        assert result["mean_k"] == 1.0
    else:
        assert reached.all()
        # A non-integral mean: tokens really route to different numbers of experts.
        assert 1.0 < result["mean_k"] < 3.0 and abs(result["mean_k"] - 2.0) > 0.05


@pytest.mark.parametrize("case", WORLD2, ids=lambda c: c.name)
def test_two_ranks_match_single_rank(world2, case):
    _check(world2[case.name], case)


@pytest.mark.parametrize("case", WORLD4, ids=lambda c: c.name)
def test_four_ranks_match_single_rank(world4, case):
    _check(world4[case.name], case)


def test_noise_differs_between_layers_and_modes(world2):
    # Training mode must really draw noise: its loss differs from eval mode on the same weights.
    assert world2["ep2_allgather_train"]["ref_loss"] != world2["ep2_allgather"]["ref_loss"]
