"""Routing noise per rank (two CPU gloo ranks): ranks that route different tokens draw different
noise, ranks that route the same tokens draw the same, a seed + layout reproduces the draws, and
activation recompute replays them.

Every rank builds the same `DirichletRouter` (same weights) and routes the same hidden states in
training mode, so any difference between the ranks' gate samples (Gumbel) and weights
(Dirichlet) comes from the noise alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import spawn

S, B, H, E = 8, 2, 32, 4
NOISE_SEED = 99

# name: (parallel sizes, sequence parallel); every layout on 2 ranks.
LAYOUTS = {
    "dp2": (dict(), False),
    "ep2": (dict(expert_model_parallel_size=2), False),  # EP ranks are DP ranks for the router
    "tp2_sp": (dict(tensor_model_parallel_size=2), True),
    "tp2_no_sp": (dict(tensor_model_parallel_size=2), False),
}


def _router(sizes: dict, sequence_parallel: bool):
    from megatron.core import parallel_state as ps
    from tiny_config import tiny_transformer_config

    from megatron_dirmoe.config import DirMoEConfig
    from megatron_dirmoe.router import DirichletRouter

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(**sizes)
    config = tiny_transformer_config(
        hidden_size=H, num_moe_experts=E, moe_router_topk=E,
        tensor_model_parallel_size=sizes.get("tensor_model_parallel_size", 1),
        expert_model_parallel_size=sizes.get("expert_model_parallel_size", 1),
        sequence_parallel=sequence_parallel)
    torch.manual_seed(0)
    # k = 2: the renormalised weights come from the Dirichlet draw (at k = 1 the default
    # weight is the sigmoid of the gate logit, which draws no noise in the forward).
    router = DirichletRouter(config, dirmoe_config=DirMoEConfig(
        target_k=2, schedule_iters=10, torch_compile=False))
    router.set_layer_number(1)
    return router.train()


def _draws(router, calls: int = 2) -> list:
    """(gate sample z, weights) of `calls` routing calls on fixed hidden states; also checks that
    the process's default generator is left alone when a dedicated stream is used."""
    from megatron_dirmoe import router as router_module

    captured = []
    original = router_module.route

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.gate_TE.detach().clone())
        return result

    hidden = torch.randn(S, B, H, generator=torch.Generator().manual_seed(7))
    router_module.route = spy
    try:
        out = []
        for _ in range(calls):
            with torch.no_grad():
                probs, _ = router(hidden)
            out.append((captured[-1], probs.clone()))
        return out
    finally:
        router_module.route = original


def _differ(a: list, b: list) -> bool:
    return all(not torch.equal(x[0], y[0]) and not torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _recompute_replays(router) -> bool:
    """Activation recompute re-runs the router's forward: it must draw the forward's noise
    (Megatron's recompute restores the RNG tracker's states, where the stream lives)."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe import router as router_module

    saved = mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state, router_module.route
    # Test-only: recompute also saves/restores the CUDA generator; these ranks have none.
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.zeros(1)
    mp_random._set_cuda_rng_state = lambda *a, **k: None
    gates = []

    def spy(*args, **kwargs):
        result = saved[2](*args, **kwargs)
        gates.append(result.gate_TE.detach().clone())
        return result

    router_module.route = spy
    try:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        hidden = torch.randn(S, B, H, generator=torch.Generator().manual_seed(7))
        hidden.requires_grad_(True)
        probs = tensor_parallel.checkpoint(lambda x: router(x)[0], False, hidden)
        probs.sum().backward()
    finally:
        mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state, router_module.route = saved
    return len(gates) == 2 and torch.equal(gates[0], gates[1])


def noise_per_layout(rank: int, world_size: int) -> dict:
    from megatron_dirmoe.router import reset_routing_noise, seed_routing_noise

    results = {}
    for name, (sizes, sequence_parallel) in LAYOUTS.items():
        router = _router(sizes, sequence_parallel)
        reset_routing_noise()
        seed_routing_noise(NOISE_SEED)
        torch.manual_seed(123)  # the default generator, identical on both ranks
        default_before = torch.get_rng_state()
        first = _draws(router)
        default_untouched = torch.equal(default_before, torch.get_rng_state())
        # Same seed and layout again, from scratch: the same draws.
        reset_routing_noise()
        seed_routing_noise(NOISE_SEED)
        torch.manual_seed(123)
        again = _draws(router)
        # Another seed: other draws.
        reset_routing_noise()
        seed_routing_noise(NOISE_SEED + 1)
        torch.manual_seed(123)
        other_seed = _draws(router)
        replays = _recompute_replays(router)
        router.eval()
        eval_draws = _draws(router, calls=1)

        gathered = [None] * world_size
        dist.all_gather_object(gathered, first)
        results[name] = dict(
            across_ranks_differ=_differ(gathered[0], gathered[1]),
            across_ranks_same=_same(gathered[0], gathered[1]),
            calls_differ=_differ(first[:1], first[1:]),
            reproduced=_same(first, again),
            other_seed_differs=_differ(first, other_seed),
            default_untouched=default_untouched,
            noisy=not torch.equal(first[0][1], eval_draws[0][1]),
            recompute_replays=replays,
        )
        dist.barrier()
    reset_routing_noise()
    return results


@pytest.fixture(scope="module")
def noise():
    return spawn(2, noise_per_layout)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_routing_noise_per_rank(noise, name):
    result = noise[name]
    assert result["noisy"]  # training draws noise at all
    assert result["calls_differ"]  # the stream advances from call to call
    assert result["reproduced"]  # same seed + layout -> same draws
    assert result["recompute_replays"]
    if name == "tp2_no_sp":
        # Both TP ranks route the whole sequence and must pick the same experts: same noise,
        # from the default generator as before (one token shard: nothing to decorrelate).
        assert result["across_ranks_same"]
    else:
        # DP (EP) ranks route different micro-batches, SP ranks different sequence shards.
        assert result["across_ranks_differ"]
        assert result["default_untouched"]  # a stream of its own, not the default generator
        assert result["other_seed_differs"]  # seeded by seed_routing_noise
