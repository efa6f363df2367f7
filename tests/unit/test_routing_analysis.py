"""Routing-analysis metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dirmoe.routing_analysis import (
    LayerRouting,
    effective_experts,
    mutual_information_bits,
    summarize_layer,
    token_classes,
)


def _layer(rmap, ids, probs=None):
    rmap = torch.as_tensor(rmap, dtype=torch.bool)
    if probs is None:
        probs = rmap.float() / rmap.float().sum(-1, keepdim=True)
    return LayerRouting(1, rmap, probs, torch.as_tensor(ids))


def test_mutual_information_of_independent_and_deterministic_tables():
    assert mutual_information_bits(torch.full((4, 4), 5.0)) == pytest.approx(0.0, abs=1e-12)
    # Class c always goes to expert c: I = H(C) = log2(4).
    assert mutual_information_bits(torch.eye(4) * 10) == pytest.approx(2.0)
    # Hand computed: p = [[.5, 0], [.25, .25]] -> I = sum p log2 p/(pc px).
    p = torch.tensor([[0.5, 0.0], [0.25, 0.25]])
    ref = 0.5 * math.log2(0.5 / (0.5 * 0.75)) + 0.25 * math.log2(0.25 / (0.5 * 0.75)) \
        + 0.25 * math.log2(0.25 / (0.5 * 0.25))
    assert mutual_information_bits(p * 8) == pytest.approx(ref)


def test_token_classes_ranks_frequent_ids_and_pools_the_rest():
    ids = torch.tensor([7, 7, 7, 3, 3, 9, 11, 12])
    classes = token_classes(ids, num_classes=3)
    # 7 most frequent -> 0, 3 -> 1, everything else -> 2.
    assert classes.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_balanced_token_specific_routing():
    # Token id t always goes to expert t % 4: balanced, fully specialised.
    ids = torch.arange(400) % 4
    rmap = torch.nn.functional.one_hot(ids, 4).bool()
    s = summarize_layer(_layer(rmap, ids))
    assert s["active_experts"] == 1.0
    assert s["load_cv"] == pytest.approx(0.0)
    assert s["effective_experts"] == pytest.approx(4.0)
    assert s["mi_bits"] == pytest.approx(2.0)
    assert s["mi_normalized"] == pytest.approx(1.0)
    assert s["routing_entropy_bits"] == pytest.approx(0.0)


def test_token_independent_collapsed_routing():
    # Every token to experts 0 and 1 with equal weight: 2 active, 2 effective experts, no MI.
    ids = torch.arange(100) % 10
    rmap = torch.zeros(100, 4, dtype=torch.bool)
    rmap[:, :2] = True
    s = summarize_layer(_layer(rmap, ids))
    assert s["active_experts"] == 2.0
    assert s["effective_experts"] == pytest.approx(2.0)
    assert s["load_fraction"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert s["load_cv"] == pytest.approx(1.0)  # loads [50, 50, 0, 0]: std 25 / mean 25
    assert s["mi_bits"] == pytest.approx(0.0, abs=1e-12)
    assert s["routing_entropy_bits"] == pytest.approx(1.0)


def test_effective_experts_is_the_inverse_simpson_index():
    assert effective_experts(torch.tensor([3.0, 3.0, 3.0, 3.0])) == pytest.approx(4.0)
    assert effective_experts(torch.tensor([5.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)
    # Shares 1/2, 1/4, 1/4: 1 / (1/4 + 1/16 + 1/16) = 8/3.
    assert effective_experts(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(8 / 3)
    assert math.isnan(effective_experts(torch.zeros(4)))
