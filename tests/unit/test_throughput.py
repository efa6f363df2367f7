"""Throughput at the realised k: the FLOP count against a hand computation and against
Megatron's own estimate, and the logged tokens/s, TFLOP/s and MFU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_dirmoe.throughput import (
    ThroughputMeter,
    forward_flops_per_token,
    peak_tflops_for,
    training_flops_per_token,
)


def _args(**overrides):
    args = dict(hidden_size=64, num_attention_heads=4, kv_channels=None,
                group_query_attention=False, num_query_groups=None, seq_length=32, swiglu=True,
                ffn_hidden_size=128, moe_ffn_hidden_size=96, num_experts=8, num_layers=2,
                moe_layer_freq=1, padded_vocab_size=256, moe_shared_expert_intermediate_size=None,
                dirmoe_router="dirichlet", global_batch_size=4,
                dirmoe_config={"recipe": "paper-notes"})  # one slab head: a [2E, h] router
    args.update(overrides)
    return SimpleNamespace(**args)


def test_flops_by_hand():
    # Per layer: attention 4*64*16*(4+4) + 2*32*4*16 = 36864; router GEMM 2*64*(2*8) = 2048
    # (a [2E, h] router: _args() stores a one-slab-head recipe). Experts: (1.5 + 2.5) * 2*64*96*3
    # = 147456. Logits 2*64*256 = 32768.
    expected = 2 * 36864 + 2 * 2048 + 147456 + 32768
    assert forward_flops_per_token(_args(), [1.5, 2.5]) == expected == 258048


@pytest.mark.parametrize("stored, rows", [
    (None, 8),  # no stored config: the default recipe, whose slab reads the gate logits
    ({"recipe": "calibrated", "slab_mean": "gate"}, 8),
    ({"recipe": "calibrated", "slab_mean": "head"}, 16),
    ({"recipe": "paper-notes"}, 16),
    ({"recipe": "paper"}, 24),  # gate logits, alpha_hi and alpha_lo heads
])
def test_router_gemm_follows_the_recipe_heads(stored, rows):
    base = forward_flops_per_token(_args(dirmoe_router="topk"), [2, 2])  # [E, h] gate weight
    ours = forward_flops_per_token(_args(dirmoe_config=stored), [2, 2])
    assert ours - base == 2 * (2 * 64 * (rows - 8))  # two MoE layers
    assert training_flops_per_token(_args(), [1.5, 2.5]) == 3 * 258048
    # A dense second layer (--moe-layer-freq [1, 0]): 2*64*128*3 = 49152 instead of its experts.
    assert forward_flops_per_token(_args(moe_layer_freq=[1, 0]), [1.5]) == (
        2 * 36864 + 2048 + 1.5 * 2 * 64 * 96 * 3 + 49152 + 32768)
    # Top-k router: [E, h] gating weight; GQA with 2 groups: K and V shrink.
    assert forward_flops_per_token(_args(dirmoe_router="topk"), [1, 1]) == (
        2 * 36864 + 2 * 1024 + 2 * 2 * 64 * 96 * 3 + 32768)
    gqa = _args(group_query_attention=True, num_query_groups=2)
    assert forward_flops_per_token(gqa, [1, 1]) - forward_flops_per_token(_args(), [1, 1]) == (
        2 * 4 * 64 * 16 * (2 - 4))
    with pytest.raises(ValueError, match="MoE layers"):
        forward_flops_per_token(_args(), [1.0])


def test_meter_reports_the_interval_at_realised_k():
    meter = ThroughputMeter(_args(), devices=2, peak_tflops=1e-3)
    meter.add(1, [1.0, 2.0])
    meter.add(2, [1.75, 2.75])  # two steps with these counts
    speed = meter.report(0.5)
    # 3 iterations x 4 x 32 tokens in 0.5 s; mean counts (1.5, 2.5).
    assert speed.tokens_per_s == pytest.approx(768.0)
    assert speed.active_experts == pytest.approx(2.0)
    tflops = 768.0 * 3 * 258048 / 2 / 1e12
    assert speed.tflops_per_device == pytest.approx(tflops)
    assert speed.mfu == pytest.approx(tflops / 1e-3)
    assert "MFU" in speed.format() and "k=2.00" in speed.format()
    assert meter.report(1.0) is None  # a new interval starts empty
    fixed = ThroughputMeter(_args(dirmoe_router="topk"), fixed_active=2)
    fixed.add(1)
    assert fixed.report(1.0).mfu is None  # no peak known: no MFU


def test_peaks_by_device_name():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("cpu") is None and peak_tflops_for(None) is None


def test_matches_megatron_estimate_at_fixed_k_plus_router():
    """At a fixed k Megatron's estimate counts the same GEMMs except the router's."""
    from megatron.training.training import num_floating_point_operations

    from megatron_dirmoe.convert.megatron_checkpoint import parse_megatron_args

    args = parse_megatron_args([
        "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
        "--max-position-embeddings", "32", "--ffn-hidden-size", "128", "--swiglu",
        "--num-experts", "8", "--moe-ffn-hidden-size", "96", "--moe-router-topk", "3",
        "--moe-layer-freq", "([1]*2+[0]*1)", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "10", "--lr", "1e-4",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
    ])
    args.padded_vocab_size = 256
    args.dirmoe_router = "dirichlet"
    megatron = num_floating_point_operations(args, batch_size=2) / (2 * 32)
    ours = training_flops_per_token(args, [3.0, 3.0])
    router = 3 * 2 * (2 * 64 * 8)  # two MoE layers, the default [E, h] gating GEMM, x3 for training
    assert ours - router == pytest.approx(megatron, rel=1e-12)


def _row(experts_per_token: int, num_experts: int = 4) -> "torch.Tensor":
    """A router's metrics row for one token routed to `experts_per_token` experts."""
    import torch

    from megatron_dirmoe.metrics import routing_row_width
    from megatron_dirmoe.routing import STAT_SUMS

    row = torch.zeros(routing_row_width(num_experts), dtype=torch.float64)
    row[STAT_SUMS.index("tokens")] = 1
    row[STAT_SUMS.index("active_experts")] = experts_per_token
    row[len(STAT_SUMS) + experts_per_token] = 1  # the histogram of experts per token
    row[len(STAT_SUMS) + num_experts + 1:][:experts_per_token] = 1  # the experts' loads
    return row


def test_gpu_path_tracker_appends_throughput_on_log_iterations(megatron_single_rank):
    """The tracker `megatron.training` reports through every iteration adds the realised-k
    throughput to the log line of each logging iteration (as `training/gpu.py` sets it up)."""
    import torch

    from megatron_dirmoe.metrics import DirMoEMetricsTracker

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, name, value, step):
            self.scalars[(name, step)] = value

    tracker = DirMoEMetricsTracker()
    meter = ThroughputMeter(_args(), devices=1, peak_tflops=1e-3)
    tracker.enable_throughput(meter, 2, lambda: 0.25)
    writer = Writer()
    lines = []
    for iteration, counts in ((1, (1.0, 2.0)), (2, (2.0, 3.0))):
        for layer, value in zip((1, 2), counts):
            tracker.record_routing(_row(int(value)), layer, 2, num_experts=4)
        lines.append(tracker.report(loss_scale=1.0, iteration=iteration, writer=writer,
                                    num_layers=2, moe_layer_freq=1, force_initialize=True,
                                    track_names=[]))
    assert "MFU" not in lines[0] and "k=2.00" in lines[1]
    tokens_per_s = 2 * 4 * 32 / 0.25
    tflops = tokens_per_s * training_flops_per_token(_args(), [1.5, 2.5]) / 1e12
    assert writer.scalars[("throughput/tokens_per_sec", 2)] == pytest.approx(tokens_per_s)
    assert writer.scalars[("throughput/tflops_per_device", 2)] == pytest.approx(tflops)
    assert writer.scalars[("throughput/mfu", 2)] == pytest.approx(tflops / 1e-3)
