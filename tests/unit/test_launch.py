"""`megatron_dirmoe.launch`: layout arithmetic, refusals naming the flag, Slurm durations and the
parameter estimate (checked against a hand count)."""

from __future__ import annotations

import pytest

from megatron_dirmoe.launch import (
    LayoutError,
    check_layout,
    main,
    parameter_counts,
    parse_slurm_duration,
    resolve_args,
)

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
         "--moe-ffn-hidden-size", "512", "--ffn-hidden-size", "512", "--seq-length", "128",
         "--moe-token-dispatcher-type", "alltoall", "--train-iters", "10"]


def layout(world: int, *extra: str):
    return check_layout(resolve_args(MODEL + list(extra)), world)


@pytest.mark.parametrize(
    "world, extra, expect",
    [
        # world, flags, (dp, expert_dp, micro-batches per step)
        (8, ["--expert-model-parallel-size", "8", "--micro-batch-size", "4",
             "--global-batch-size", "64"], (8, 1, 2)),
        (16, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
              "--expert-model-parallel-size", "8", "--expert-tensor-parallel-size", "1",
              "--micro-batch-size", "2",
              "--global-batch-size", "32"], (8, 2, 2)),
        (32, ["--tensor-model-parallel-size", "4", "--sequence-parallel",
              "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "8",
              "--expert-tensor-parallel-size", "1", "--micro-batch-size", "32",
              "--global-batch-size", "512"], (4, 2, 4)),
        # expert TP defaults to TP in Megatron: ETP 2 x EP 4 x EDP 1 x PP 1 on 8 ranks
        (8, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
             "--expert-model-parallel-size", "4", "--micro-batch-size", "1"], (4, 1, 1)),
    ],
)
def test_valid_layouts(world, extra, expect):
    lay = layout(world, *extra)
    assert (lay.dp, lay.expert_dp, lay.num_microbatches) == expect
    assert lay.tp * lay.pp * lay.cp * lay.dp == world
    assert lay.etp * lay.ep * lay.expert_dp * lay.pp == world
    assert lay.micro_batch_size * lay.dp * lay.num_microbatches == lay.global_batch_size


@pytest.mark.parametrize(
    "world, extra, message",
    [
        (12, ["--tensor-model-parallel-size", "8", "--sequence-parallel"], "world size 12 is not divisible by --tensor"),
        (8, ["--expert-model-parallel-size", "3"], "--num-experts 8 is not divisible by --expert-model-parallel-size 3"),
        (12, ["--expert-model-parallel-size", "8"], "--expert-model-parallel-size x --pipeline"),
        (8, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
             "--expert-model-parallel-size", "8", "--expert-tensor-parallel-size", "2"],
         "(2 x 8 x 1 = 16)"),
        (8, ["--micro-batch-size", "4", "--global-batch-size", "48"],
         "--global-batch-size 48 is not divisible by --micro-batch-size x data-parallel size (4 x 8 = 32"),
        (6, ["--pipeline-model-parallel-size", "3"], "--num-layers 4 is not divisible by --pipeline"),
        (8, ["--tensor-model-parallel-size", "2"], "--sequence-parallel"),  # DirMoE's rule
        (8, ["--moe-token-dispatcher-type", "flex"], "cannot carry a variable number"),
        (8, ["--moe-router-topk", "2"], "must equal DirMoE's max_active (4"),
        (8, ["--moe-router-topk", "6"], "Leave --moe-router-topk unset"),
        (8, ["--dirmoe-target-k", "9"], "--dirmoe-target-k"),
    ],
)
def test_impossible_layouts_are_refused(world, extra, message):
    with pytest.raises(LayoutError) as err:
        layout(world, "--micro-batch-size", "1", *extra)
    assert message in str(err.value)


def test_batch_check_uses_given_micro_batch():
    # flags later on the command line win, as in argparse
    with pytest.raises(LayoutError, match="micro-batch-size"):
        layout(4, "--micro-batch-size", "3", "--global-batch-size", "16")


def test_cpu_device_forces_one_rank_layout():
    lay = check_layout(resolve_args(["--preset", "tiny", "--dirmoe-device", "cpu",
                                     "--tensor-model-parallel-size", "4"]), 1)
    assert (lay.tp, lay.dp, lay.ep) == (1, 1, 1)


def test_topk_router_baseline_skips_dirmoe_rules():
    lay = layout(8, "--micro-batch-size", "1", "--dirmoe-router", "topk",
                 "--moe-router-topk", "2", "--moe-token-dispatcher-type", "flex")
    assert lay.dp == 8


def test_parameter_counts_by_hand():
    h, L, E, f, V = 256, 4, 8, 512, 1000
    args = resolve_args(MODEL + ["--vocab-size", str(V), "--dirmoe-target-k", "2"])
    total, active, vocab = parameter_counts(args)
    attention = 4 * h * h
    per_layer_dense = attention + 2 * h + 2 * E * h + E  # + norms + DirMoE router
    expert = 3 * h * f  # SwiGLU (paper default)
    embeddings = 2 * V * h  # untied input and output embeddings (paper default)
    assert vocab == V
    assert total == L * (per_layer_dense + E * expert) + embeddings + h
    assert active == L * (per_layer_dense + 2 * expert) + embeddings + h


def test_moe_layer_freq_pattern():
    args = resolve_args(MODEL + ["--moe-layer-freq", "([1]*1+[0]*1)*2", "--vocab-size", "10"])
    dense = resolve_args(MODEL + ["--moe-layer-freq", "([0]*2)*2", "--vocab-size", "10"])
    moe_per_layer = parameter_counts(resolve_args(MODEL + ["--vocab-size", "10"]))[0]
    half, none = parameter_counts(args)[0], parameter_counts(dense)[0]
    assert none < half < moe_per_layer
    assert half - none == moe_per_layer - half


@pytest.mark.parametrize(
    "text, seconds",
    [("1-02:03:04", 93784), ("02:03:04", 7384), ("59:30", 3570), ("45", 2700), ("2-03", 183600),
     ("UNLIMITED", None), ("INVALID", None), ("NOT_SET", None), ("", None)],
)
def test_parse_slurm_duration(text, seconds):
    assert parse_slurm_duration(text) == seconds


def test_cli(capsys):
    assert main(["check", "--world-size", "8", "--", *MODEL, "--expert-model-parallel-size", "8",
                 "--micro-batch-size", "4", "--global-batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = TP 1 x PP 1 x CP 1 x DP 8" in out and "x 2 micro-batches/step" in out
    assert main(["check", "--world-size", "8", "--", *MODEL, "--micro-batch-size", "3"]) == 0
    assert main(["check", "--world-size", "8", "--", *MODEL, "--micro-batch-size", "3",
                 "--global-batch-size", "16"]) == 2
    assert "layout check failed: --global-batch-size 16" in capsys.readouterr().err
    assert main(["seconds", "1:00:00"]) == 0 and capsys.readouterr().out.strip() == "3600"
