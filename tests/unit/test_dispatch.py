"""Dispatch invariants for variable-k routing (one rank, CPU).

- Permutation sized from the routing map groups exactly the routed (token, expert) pairs, and
  un-permutation inverts it, for random maps with 0..E experts per token.
- A whole DirMoE MoE layer (router + dispatch + experts + combine) equals the dense reference
  ``sum_i p_i * expert_i(x)`` over the active set, for both dispatchers, with and without padding
  and capacity dropping.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from cuda_shim import shim_patches  # noqa: E402  (test-only CPU stand-ins for CUDA streams)

E, H, S, B = 6, 32, 8, 3


@pytest.fixture
def cpu_cuda_shim(monkeypatch):
    """The all-to-all dispatcher creates CUDA streams; stand-ins for this test only."""
    for owner, name, value in shim_patches():
        monkeypatch.setattr(owner, name, value)


def _random_map(gen, T, num_experts, max_k):
    """Variable-k routing map: each row has 0..max_k experts (0 = a padded token)."""
    k_T = torch.randint(0, max_k + 1, (T,), generator=gen)
    scores = torch.rand(T, num_experts, generator=gen)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a random permutation of experts per row
    return ranks < k_T[:, None]


@pytest.mark.parametrize("seed", range(4))
def test_permute_unpermute_is_identity_for_variable_k(seed):
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    gen = torch.Generator().manual_seed(seed)
    T = 37
    map_TE = _random_map(gen, T, E, max_k=4)
    assert (map_TE.sum(1) == 0).any() and len(map_TE.sum(1).unique()) > 2
    x_TH = torch.randn(T, H, generator=gen)

    # What VariableKAlltoAllTokenDispatcher passes: the routed-pair count from the map.
    permuted, _, sorted_idx, _, _ = permute(x_TH, map_TE, num_out_tokens=map_TE.sum())
    assert permuted.shape[0] == int(map_TE.sum())
    # Grouped by expert, tokens in order within an expert, nothing else.
    expected = torch.cat([x_TH[map_TE[:, e]] for e in range(E)])
    torch.testing.assert_close(permuted, expected, rtol=0, atol=0)

    # Combining with weights 1/k_t gives every routed token back; padded rows come back zero.
    k_T = map_TE.sum(1, keepdim=True)
    probs_TE = map_TE / k_T.clamp(min=1)
    restored = unpermute(permuted, sorted_idx, x_TH.shape, probs=probs_TE, routing_map=map_TE)
    routed_T = k_T.squeeze(1) > 0
    torch.testing.assert_close(restored[routed_T], x_TH[routed_T], rtol=1e-6, atol=1e-6)
    assert restored[~routed_T].abs().max() == 0


def _moe_layer(dispatcher, dirmoe_config, training):
    from megatron_dirmoe.specs import get_dirmoe_layer_spec

    cfg = dirmoe_config.validate_for(E)
    config = tiny_transformer_config(
        hidden_size=H, num_moe_experts=E, moe_router_topk=cfg.max_active_for(E),
        moe_token_dispatcher_type=dispatcher, moe_ffn_hidden_size=24,
    )
    spec = get_dirmoe_layer_spec(cfg, num_experts=E, use_te=False, normalization="RMSNorm")
    torch.manual_seed(0)
    layer = spec.submodules.mlp(config=config, layer_number=1)
    with torch.no_grad():
        # Spread the spike biases so tokens route to 1..max_active experts, not all to k.
        layer.router.spike_bias.copy_(torch.linspace(-2.0, 3.0, E))
        layer.router.weight.mul_(20.0)
    return layer.train(training)


def _dense_reference(layer, x, padding):
    """sum_i p_i * expert_i(x) over the active set, with the layer's own routing decision."""
    probs_TE, map_TE = layer.route(x, padding)
    x_TH = x.reshape(-1, H)
    out_TH = torch.zeros_like(x_TH)
    for e, expert in enumerate(layer.experts.local_experts):
        y_TH, _ = expert(x_TH)
        out_TH = out_TH + (probs_TE[:, e] * map_TE[:, e])[:, None] * y_TH
    return out_TH.view_as(x), map_TE


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "cf1"])
def test_moe_layer_equals_dense_reference(
    megatron_single_rank, cpu_cuda_shim, dispatcher, training, padded, capacity_factor
):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    cfg = DirMoEConfig(target_k=1, schedule_iters=10, capacity_factor=capacity_factor)
    layer = _moe_layer(dispatcher, cfg, training)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(S, B, H, generator=gen, requires_grad=True)
    padding = None
    if padded:
        padding = torch.zeros(S, B, dtype=torch.bool)
        padding[-3:, 1] = True

    torch.manual_seed(7)  # identical training noise for both paths
    out, _ = layer(x, padding_mask=None if padding is None else padding.T)
    torch.manual_seed(7)
    ref, map_TE = _dense_reference(layer, x, padding)

    k_T = map_TE.sum(1)
    assert len(k_T.unique()) >= 2, "routing should exercise variable k"
    if padded:
        assert (k_T.view(S, B)[padding] == 0).all()
        assert out.detach()[padding].abs().max() == 0
    if capacity_factor is not None:
        capacity = -(-S * B * cfg.target_k * capacity_factor // E)
        assert int(map_TE.sum(0).max()) <= capacity
        torch.manual_seed(7)
        _, undropped_TE = layer.router(x, padding)
        assert int(undropped_TE.sum()) > int(map_TE.sum()), "capacity should drop some pairs"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    # Gradients through router, dispatch, experts and combine agree too.
    w = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * w).sum(), [x, layer.router.weight])
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, layer.router.weight])
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_expert_capacity_is_measured_against_target_k():
    from megatron_dirmoe.dispatcher import expert_capacity

    # ceil(T * k / E * cf)
    assert expert_capacity(100, 8, 2, 1.0) == 25
    assert expert_capacity(100, 8, 2, 1.5) == 38
    assert expert_capacity(10, 3, 1, 1.0) == 4


def test_drop_over_capacity_keeps_the_highest_probabilities():
    from megatron_dirmoe.dispatcher import drop_over_capacity

    probs_TE = torch.tensor(
        [[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.7, 0.0, 0.3], [0.0, 0.5, 0.5], [0.2, 0.0, 0.8]],
        requires_grad=True,
    )
    map_TE = probs_TE.detach() > 0
    kept_probs, kept_map = drop_over_capacity(probs_TE, map_TE, capacity=2)
    expected_map = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(kept_map, expected_map)
    torch.testing.assert_close(kept_probs, probs_TE.detach() * expected_map)
    # Gradients reach the kept entries only.
    kept_probs.sum().backward()
    assert torch.equal(probs_TE.grad, expected_map.float())
    # Under capacity: unchanged (same tensors).
    same_probs, same_map = drop_over_capacity(probs_TE, map_TE, capacity=5)
    assert same_probs is probs_TE and same_map is map_TE


def test_flex_dispatcher_is_rejected(megatron_single_rank):
    cfg = DirMoEConfig(target_k=1, schedule_iters=10)
    with pytest.raises(ValueError, match="--moe-token-dispatcher-type 'flex'"):
        _moe_layer("flex", cfg, training=False)
