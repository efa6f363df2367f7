"""The end-of-run routing summary names the layers that routed as TopK routers."""

from __future__ import annotations

import torch


def test_summary_names_the_layers_whose_every_token_took_the_fallback():
    from megatron_dirmoe.metrics import ALL_FALLBACK, format_routing_summary, routing_summary

    # Three MoE layers of the last step: one routed by its gates, two on the fallback.
    per_layer = {"dirmoe/active_experts": torch.tensor([4.1, 4.0, 4.0]),
                 "dirmoe/fallback_frac": torch.tensor([0.01, 1.0, ALL_FALLBACK]),
                 "dirmoe/count_bias": torch.tensor([2.6, 0.0, 0.0])}
    rows = routing_summary(per_layer, [1, 2, 3])
    assert [row["fallback_frac"] for row in rows] == [
        float(torch.tensor(v)) for v in (0.01, 1.0, ALL_FALLBACK)]
    text = format_routing_summary(rows, target_k=4, num_experts=32)
    lines = text.splitlines()
    assert lines[0] == "routing summary (target k = 4, experts = 32)"
    assert lines[1].split() == ["layer", "active", "fallback", "c"]
    assert lines[2].split() == ["1", "4.100", "0.010", "2.600"]
    assert lines[-1].startswith("  note: layers 2, 3 sent every token to the top-k fallback")
    # No note while the gates route somewhere in every layer.
    per_layer["dirmoe/fallback_frac"] = torch.tensor([0.01, 0.5, 0.98])
    quiet = format_routing_summary(routing_summary(per_layer, [1, 2, 3]), 4, 32)
    assert "note" not in quiet and len(quiet.splitlines()) == 5
    # One layer: singular.
    per_layer["dirmoe/fallback_frac"] = torch.tensor([1.0, 0.5, 0.0])
    one = format_routing_summary(routing_summary(per_layer, [1, 2, 3]), 4, 32)
    assert one.splitlines()[-1].startswith("  note: layer 1 sent every token")
