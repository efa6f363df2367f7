"""Activation recompute re-runs the router's forward: metrics, expert load, loss and gradients
must be what a run without recompute gives (counted once, same routing).

Megatron's recompute saves and restores the RNG states around the re-forward (CPU generator,
CUDA generator, the model-parallel tracker's states); on CPU the CUDA parts are replaced by
no-ops (test-only) so the same code path runs.
"""

from __future__ import annotations

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig

VOCAB, SEQ, BATCH = 64, 16, 4

LAYOUTS = {
    "none": dict(),
    "full": dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1),
    "selective-moe": dict(recompute_granularity="selective",
                          recompute_modules=["core_attn", "moe"]),
}


@pytest.fixture
def cpu_recompute(monkeypatch):
    from cuda_shim import shim_patches
    from megatron.core.tensor_parallel import random as mp_random

    for owner, name, value in shim_patches():
        monkeypatch.setattr(owner, name, value)
    # Recompute saves/restores the CUDA generator; there is none on CPU.
    monkeypatch.setattr(mp_random, "_get_cuda_rng_state", lambda *a, **k: torch.zeros(1))
    monkeypatch.setattr(mp_random, "_set_cuda_rng_state", lambda *a, **k: None)


def _step(recompute: dict, training: bool = True):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.metrics import install_metrics_tracker

    from megatron_dirmoe.model import build_gpt_model
    from megatron_dirmoe.router import iter_dirichlet_routers, set_router_iteration

    torch.manual_seed(0)
    config = tiny_transformer_config(num_layers=2, **recompute)
    model = build_gpt_model(config, DirMoEConfig(schedule_iters=20), vocab_size=VOCAB,
                            max_sequence_length=SEQ, use_te=False)
    model.train(training)
    set_router_iteration(model, 3)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tracker = install_metrics_tracker()
    tracker.clear()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(SEQ)[None].expand(BATCH, -1)
    torch.manual_seed(2)  # the routing noise of this step
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    # What each layer's router recorded for the report (sums over its tokens, load, schedules).
    metrics = {"routing_sums": tracker.routing_sums.clone()}
    tracker.clear()
    loads = [r.pop_expert_load().clone() for r in iter_dirichlet_routers(model)]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, loads, grads


@pytest.mark.parametrize("layout", ["full", "selective-moe"])
def test_recompute_counts_once_and_routes_the_same(megatron_single_rank, cpu_recompute, layout):
    loss, metrics, loads, grads = _step(LAYOUTS["none"])
    loss_r, metrics_r, loads_r, grads_r = _step(LAYOUTS[layout])
    assert torch.equal(loss, loss_r)
    assert metrics.keys() == metrics_r.keys() and metrics["routing_sums"][:, 0].sum() > 0
    for name in metrics:
        torch.testing.assert_close(metrics_r[name], metrics[name], rtol=0, atol=1e-6,
                                   msg=f"{name} differs under {layout} recompute")
    for load, load_r in zip(loads, loads_r):
        assert torch.equal(load, load_r)  # token counts: recorded once, same routing
        assert load.sum() > 0
    assert grads.keys() == grads_r.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-6,
                                   msg=f"gradient of {name} under {layout} recompute")
