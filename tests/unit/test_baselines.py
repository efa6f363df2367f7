"""Megatron's TopKRouter baselines on CPU (same pipeline as DirMoE, one-line router swap)."""

from __future__ import annotations

import pytest
import torch
from tiny_config import tiny_transformer_config


def _model(megatron_router_config):
    from megatron_dirmoe.baselines import DeviceAgnosticTopKRouter
    from megatron_dirmoe.model import build_gpt_model

    torch.manual_seed(0)
    return build_gpt_model(megatron_router_config, None, vocab_size=64, max_sequence_length=16,
                           use_te=False, router=DeviceAgnosticTopKRouter)


def _forward(model):
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(16)[None].expand(4, -1)
    return model(tokens, position_ids, None, labels=tokens).mean()


def _forward_backward(model):
    loss = _forward(model)
    loss.backward()
    return loss


def test_softmax_topk_with_aux_loss_runs_on_cpu(megatron_single_rank):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    config = tiny_transformer_config(moe_router_topk=2, moe_router_load_balancing_type="aux_loss",
                                     moe_aux_loss_coeff=1e-2)
    model = _model(config)
    loss = _forward_backward(model)
    assert torch.isfinite(loss)
    lb = get_moe_metrics_tracker().metrics["load_balancing_loss"].values
    assert (lb > 0).all()  # both layers recorded Megatron's aux loss
    get_moe_metrics_tracker().clear()
    assert model.decoder.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_aux_loss_free_bias_moves_against_load(megatron_single_rank):
    from megatron_dirmoe.baselines import update_expert_biases

    config = tiny_transformer_config(moe_router_topk=2, moe_router_score_function="sigmoid",
                                     moe_router_enable_expert_bias=True,
                                     moe_router_load_balancing_type="none")
    model = _model(config)
    _forward_backward(model)
    router = model.decoder.layers[0].mlp.router
    load = router.local_tokens_per_expert.clone()
    assert load.sum() == 4 * 16 * 2  # every token counted k=2 times
    assert update_expert_biases(model) == 2
    rate = config.moe_router_bias_update_rate
    expected = torch.sign(load.mean() - load) * rate  # overloaded experts are pushed down
    torch.testing.assert_close(router.expert_bias, expected)
    assert (router.local_tokens_per_expert == 0).all()


def test_training_load_follows_any_router_in_training_forwards_only(megatron_single_rank):
    """`routing_analysis.TrainingLoad` counts what Megatron's own router routed (its bias
    buffer counts the same tokens), per layer, and ignores evaluation and no-grad passes."""
    from megatron_dirmoe.routing_analysis import TrainingLoad, effective_experts

    config = tiny_transformer_config(moe_router_topk=2, moe_router_score_function="sigmoid",
                                     moe_router_enable_expert_bias=True,
                                     moe_router_load_balancing_type="none")
    model = _model(config)
    follow = TrainingLoad(model)
    _forward_backward(model)
    routers = [layer.mlp.router for layer in model.decoder.layers]
    expected = [effective_experts(r.local_tokens_per_expert) for r in routers]
    assert follow.pop() == pytest.approx(expected)
    assert follow.pop() == []  # emptied by the first call
    with torch.no_grad():  # the no-grad first pass of activation recompute
        _forward(model)
    model.eval()
    _forward(model)
    assert follow.pop() == []
    follow.remove()
    model.train()
    _forward(model)
    assert follow.pop() == []
    with pytest.raises(ValueError, match="no MoE router"):
        TrainingLoad(torch.nn.Linear(2, 2))
