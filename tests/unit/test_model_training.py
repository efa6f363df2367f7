"""A tiny Megatron GPT with DirMoE layers trains on CPU; the router swap works on Megatron specs."""

from __future__ import annotations

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig

VOCAB, SEQ, BATCH, STEPS = 64, 32, 8, 40


def _pattern_batch(gen: torch.Generator) -> torch.Tensor:
    """Sequences following x_{t+1} = (5 x_t + 3) mod V: learnable, so the loss must fall."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    seq = [start]
    for _ in range(SEQ):
        seq.append((seq[-1] * 5 + 3) % VOCAB)
    return torch.cat(seq, dim=1)


def _train(model, steps=STEPS, lr=3e-3, attention_mask=None):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.metrics import install_metrics_tracker
    from megatron_dirmoe.router import set_router_iteration

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tracker = install_metrics_tracker()
    tracker.clear()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    position_ids = torch.arange(SEQ)[None].expand(BATCH, -1)
    losses, metrics = [], []
    for step in range(steps):
        set_router_iteration(model, step)
        tokens = _pattern_batch(gen)
        loss = model(tokens[:, :-1], position_ids, attention_mask, labels=tokens[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tracker.report(loss_scale=1.0, iteration=step + 1, num_layers=model.config.num_layers)
        metrics.append(dict(tracker.last_per_layer))
    return losses, metrics


def _router_grads_after_one_step(model):
    from megatron_dirmoe.router import iter_dirichlet_routers

    gen = torch.Generator().manual_seed(1)
    tokens = _pattern_batch(gen)
    model.zero_grad()
    position_ids = torch.arange(SEQ)[None].expand(BATCH, -1)
    model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean().backward()
    return [(r.weight.grad, r.spike_bias.grad) for r in iter_dirichlet_routers(model)]


def test_dirmoe_gpt_trains_on_cpu(megatron_single_rank):
    from megatron.core.models.gpt import GPTModel

    from megatron_dirmoe import get_dirmoe_layer_spec
    from megatron_dirmoe.layers import DeviceAgnosticRotaryEmbedding
    from megatron_dirmoe.router import DirichletRouter

    torch.manual_seed(0)
    config = tiny_transformer_config()
    spec = get_dirmoe_layer_spec(
        DirMoEConfig(schedule_iters=STEPS), num_experts=8, use_te=False, normalization="RMSNorm"
    )
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    routers = [m for m in model.modules() if isinstance(m, DirichletRouter)]
    assert len(routers) == 2

    # Gradients reach the gate weights (the default's only head: its slab reads the gate
    # logits) and the spike bias through the LM loss and the attached losses together.
    for weight_grad, bias_grad in _router_grads_after_one_step(model):
        assert weight_grad.shape == (8, config.hidden_size)
        assert (weight_grad.abs().sum(-1) > 0).all()
        assert bias_grad.abs().sum() > 0

    # The routing maps the routers hand to the dispatcher, per layer, for the metrics check.
    maps = {id(r): [] for r in routers}
    hooks = [r.register_forward_hook(lambda m, i, out: maps[id(m)].append(out[1].clone()))
             for r in routers]
    losses, metrics = _train(model)
    for hook in hooks:
        hook.remove()
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # Every step's reported metrics are those of the tokens the routers routed in that step.
    for step, step_metrics in enumerate(metrics):
        routed = [maps[id(r)][step] for r in routers]
        active = torch.stack([m.sum(-1).float().mean() for m in routed])
        torch.testing.assert_close(step_metrics["dirmoe/active_experts"], active)
        top = torch.stack([m.sum(-1).max().float() for m in routed])
        torch.testing.assert_close(step_metrics["dirmoe/active_experts_max"], top)
    assert metrics[0]["dirmoe/tau"][0].item() == pytest.approx(2.0)
    assert metrics[-1]["dirmoe/tau"][0].item() < 0.35


def test_build_gpt_model_with_rope_and_moe_layer_freq(megatron_single_rank):
    from megatron_dirmoe.model import build_gpt_model
    from megatron_dirmoe.moe_layer import DirMoELayer

    torch.manual_seed(0)
    config = tiny_transformer_config(moe_layer_freq=[1, 0])
    model = build_gpt_model(config, DirMoEConfig(schedule_iters=20), vocab_size=VOCAB,
                            max_sequence_length=SEQ, use_te=False)
    assert isinstance(model.decoder.layers[0].mlp, DirMoELayer)
    assert not isinstance(model.decoder.layers[1].mlp, DirMoELayer)
    losses, _ = _train(model, steps=20)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_swap_router_on_megatron_specs(megatron_single_rank):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dirmoe import dirichlet_router_builder, swap_router
    from megatron_dirmoe.router import DirichletRouter

    builder = dirichlet_router_builder(DirMoEConfig(schedule_iters=10))
    layer_spec = get_gpt_layer_local_spec(num_experts=8)
    swapped = swap_router(layer_spec, builder)
    moe = swapped.submodules.mlp.keywords["submodules"]
    assert isinstance(moe, MoESubmodules) and moe.router is builder
    # The original spec is untouched (swap returns a copy).
    assert layer_spec.submodules.mlp.keywords["submodules"].router is TopKRouter

    block = get_gpt_decoder_block_spec(tiny_transformer_config(moe_layer_freq=[1, 0]),
                                       use_transformer_engine=False)
    swapped_block = swap_router(block, builder)
    mlp_subs = [s.submodules.mlp.keywords["submodules"] for s in swapped_block.layer_specs]
    assert [type(m).__name__ for m in mlp_subs] == ["MoESubmodules", "MLPSubmodules"]
    assert mlp_subs[0].router is builder

    with pytest.raises(ValueError, match="no MoE layer"):
        swap_router(get_gpt_layer_local_spec(), builder)

    # A model built from Megatron's own (swapped) local spec holds DirichletRouters.
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(config=tiny_transformer_config(), transformer_layer_spec=swapped,
                     vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type="learned_absolute")
    assert sum(isinstance(m, DirichletRouter) for m in model.modules()) == 2


def test_swapped_megatron_local_spec_trains_on_cpu(megatron_single_rank, monkeypatch):
    """Megatron's own local spec (its DotProductAttention included), router swapped in one line.

    Test-only shim: Megatron's local attention takes its score buffer from
    `torch.cuda.current_device()` and forks the CUDA RNG tracker; pointing the first at the CPU
    and making the fork a no-op (dropout is 0) lets the unmodified spec run here.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_dirmoe import dirichlet_router_builder, swap_router
    from megatron_dirmoe.router import DirichletRouter

    import contextlib

    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    # Its attention dropout forks the CUDA RNG tracker; with dropout 0 a no-op fork is exact.
    monkeypatch.setattr(get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
    torch.manual_seed(0)
    spec = swap_router(get_gpt_layer_local_spec(num_experts=8),
                       dirichlet_router_builder(DirMoEConfig(schedule_iters=STEPS)))
    model = GPTModel(config=tiny_transformer_config(normalization="LayerNorm"),
                     transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type="learned_absolute")
    assert type(model.decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    assert sum(isinstance(m, DirichletRouter) for m in model.modules()) == 2
    # An explicit causal mask: Megatron's default one is allocated with a literal device="cuda".
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    losses, metrics = _train(model, attention_mask=causal)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert (metrics[-1]["dirmoe/active_experts"] >= 1).all()


def test_block_spec_for_a_dense_only_pipeline_stage(megatron_single_rank):
    """With --moe-layer-freq [0,1] and PP=2 the first stage holds no MoE layer; its block spec
    must still build (nothing to swap there)."""
    from megatron_dirmoe.specs import get_dirmoe_decoder_block_spec

    config = tiny_transformer_config(num_layers=1, moe_layer_freq=[0])
    spec = get_dirmoe_decoder_block_spec(config, DirMoEConfig(schedule_iters=5), use_te=False)
    assert [type(s.submodules.mlp.keywords["submodules"]).__name__ for s in spec.layer_specs] == [
        "MLPSubmodules"
    ]
