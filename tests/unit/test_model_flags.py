"""Parity with Megatron-LM's `pretrain_gpt`: every model flag of Megatron's parser is honoured or
refused at start-up by name (megatron_dirmoe/training/model_flags.py), the builder flags change
the built model, MTP trains with DirMoE MoE layers, the dry run rejects what the run rejects,
and the loss checks are back."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re

import pytest
import torch

from megatron_dirmoe.training import model_flags as mf

BASE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "128", "--num-experts", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--train-iters", "4", "--mock-data", "--dirmoe-device", "cpu",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
]


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)


def parse(*extra, validate=True):
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    return parse_pretrain_args([*BASE, *extra], validate=validate)


def _parser_groups():
    from megatron_dirmoe.training.arguments import build_parser

    parser = build_parser()
    return parser, {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}


def _config_fields() -> set[str]:
    from megatron.core.transformer.transformer_config import (MLATransformerConfig,
                                                              TransformerConfig)

    return {f.name for cls in (TransformerConfig, MLATransformerConfig)
            for f in dataclasses.fields(cls)}


# ------------------------------------------------------------------ every flag accounted for
def test_every_model_flag_of_megatrons_parser_is_accounted_for():
    """A flag a new megatron-core adds to a model group must be placed in a table (config field,
    builder, derived, training-loop or refused) or this fails, naming it."""
    _, groups = _parser_groups()
    assert set(mf.MODEL_GROUPS) <= set(groups), set(mf.MODEL_GROUPS) - set(groups)
    config = _config_fields()
    refused = {r.dest for r in mf.REFUSALS}
    placed = (config | set(mf.BUILDER_FLAGS) | set(mf.CONFIG_DERIVED_FLAGS)
              | set(mf.TRAINING_FLAGS) | refused)
    model_dests = {d for title in mf.MODEL_GROUPS for d in groups[title]}
    # Read by Megatron-LM's gpt_builder / model_provider from outside the model groups.
    model_dests |= {"spec", "yaml_cfg", "fp16_lm_cross_entropy", "record_memory_history",
                    "memory_snapshot_path"}
    missing = sorted(model_dests - placed)
    assert not missing, f"Megatron model flags with no DirMoE decision: {missing}"
    # The tables name real flags only (a renamed Megatron flag shows up here).
    all_dests = {d for dests in groups.values() for d in dests}
    stale = sorted((set(mf.BUILDER_FLAGS) | set(mf.CONFIG_DERIVED_FLAGS) | set(mf.TRAINING_FLAGS)
                    | refused) - all_dests)
    assert not stale, f"tables name flags Megatron's parser does not have: {stale}"


def _config_reads(module) -> set[str]:
    return set(re.findall(r"config\.([a-z_0-9]+)", inspect.getsource(module)))


def test_every_topk_router_setting_has_a_dirmoe_decision():
    """DirichletRouter replaces TopKRouter: each config field TopKRouter reads is honoured,
    inert as in Megatron, or refused; a new TopKRouter setting fails here."""
    import megatron.core.transformer.moe.router as megatron_router

    reads = {f for f in _config_reads(megatron_router) if f.startswith("moe_")}
    assert reads - set(mf.ROUTER_FLAGS) == set()
    refused = {r.dest for r in mf.REFUSALS}
    for dest, decision in mf.ROUTER_FLAGS.items():
        assert decision.split(":")[0] in ("honoured", "inert", "refused"), dest
        if decision.startswith("refused") and dest not in (
                "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity"):  # layout.py
            assert dest in refused, dest


def test_local_spec_modules_account_for_what_megatrons_read():
    """SDPAttention / TorchNorm stand in for DotProductAttention / WrappedTorchNorm in the local
    spec; every config field those read and ours do not is in LOCAL_SPEC_FLAGS."""
    import megatron.core.transformer.dot_product_attention as dpa
    import megatron.core.transformer.torch_norm as torch_norm

    import megatron_dirmoe.layers as ours

    theirs = _config_reads(dpa) | _config_reads(torch_norm)
    missing = theirs - _config_reads(ours) - set(mf.LOCAL_SPEC_FLAGS)
    assert not missing, missing


# ------------------------------------------------------------------ refusals, by name
REFUSED_VALUES = {
    "yaml_cfg": ["--yaml-cfg", "run.yaml"],
    "heterogeneous_layers_config_path": ["--heterogeneous-layers-config-path", "h.json"],
    "heterogeneous_layers_config_encoded_json": ["--heterogeneous-layers-config-encoded-json",
                                                 "{}"],
    "experimental_attention_variant": ["--experimental-attention-variant", "dsa"],
    "moe_use_upcycling": ["--moe-use-upcycling"],
    "overlap_moe_expert_parallel_comm": ["--overlap-moe-expert-parallel-comm"],
    "record_memory_history": ["--record-memory-history"],
    "moe_router_load_balancing_type": ["--moe-router-load-balancing-type", "seq_aux_loss"],
    "moe_router_dtype": ["--moe-router-dtype", "fp64"],
    "moe_router_enable_expert_bias": ["--moe-router-enable-expert-bias"],
    "moe_router_score_function": ["--moe-router-score-function", "sigmoid"],
    "moe_router_pre_softmax": ["--moe-router-pre-softmax"],
    "moe_router_topk_scaling_factor": ["--moe-router-topk-scaling-factor", "2.5"],
    "moe_router_num_groups": ["--moe-router-num-groups", "2"],
    "moe_router_group_topk": ["--moe-router-group-topk", "1"],
    "moe_router_force_load_balancing": ["--moe-router-force-load-balancing"],
    "moe_router_force_biased": ["--moe-router-force-biased", "0.5"],
    "moe_router_fusion": ["--moe-router-fusion"],
    "moe_input_jitter_eps": ["--moe-input-jitter-eps", "0.01"],
    "moe_enable_routing_replay": ["--moe-enable-routing-replay"],
    "window_size": ["--window-size", "(8,0)"],
    "window_attn_skip_freq": ["--window-attn-skip-freq", "2"],
    "softmax_type": ["--softmax-type", "off-by-one"],
    "layernorm_zero_centered_gamma": ["--apply-layernorm-1p"],
}


def test_refusal_table_and_values_agree():
    assert set(REFUSED_VALUES) == {r.dest for r in mf.REFUSALS}


@pytest.mark.parametrize("dest", sorted(REFUSED_VALUES))
def test_refused_flags_stop_start_up_by_name(dest, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*REFUSED_VALUES[dest], validate=False)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert REFUSED_VALUES[dest][0] in err and "not supported by the DirMoE entry point" in err


def test_topk_router_flags_are_fine_with_the_topk_baseline():
    args = parse("--dirmoe-router", "topk", "--moe-router-topk", "2",
                 "--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax",
                 validate=False)
    assert args.moe_router_score_function == "sigmoid"


# ------------------------------------------------------------------ builder flags change the model
def _build(*extra):
    from megatron_dirmoe.single_rank import init_single_rank
    from megatron_dirmoe.training.builders import build_model_from_args

    init_single_rank()
    args = parse(*extra)
    args.padded_vocab_size = 256  # what megatron.training's tokenizer set-up pads 255 to
    torch.manual_seed(0)
    return args, build_model_from_args(args)


def test_rotary_flags_reach_the_model():
    _, plain = _build()
    _, partial = _build("--rotary-percent", "0.5")
    # head dim 16: full RoPE rotates 16 dims (8 frequencies), 50% rotates 8 (4 frequencies)
    assert plain.rotary_pos_emb.inv_freq.numel() == 8
    assert partial.rotary_pos_emb.inv_freq.numel() == 4
    _, scaled = _build("--use-rope-scaling", "--rope-scaling-factor", "4")
    assert not torch.equal(scaled.rotary_pos_emb.inv_freq, plain.rotary_pos_emb.inv_freq)
    _, interp = _build("--rotary-seq-len-interpolation-factor", "2")
    assert interp.rotary_pos_emb.seq_len_interpolation_factor == 2
    assert plain.rotary_pos_emb.seq_len_interpolation_factor is None


def test_qk_l2_norm_and_fp16_lm_cross_entropy_reach_the_model():
    from megatron.core.transformer.torch_norm import L2Norm

    _, plain = _build()
    _, l2 = _build("--qk-l2-norm")
    attention = l2.decoder.layers[0].self_attention
    assert isinstance(attention.q_layernorm, L2Norm) and isinstance(attention.k_layernorm, L2Norm)
    assert not isinstance(plain.decoder.layers[0].self_attention.q_layernorm, L2Norm)
    # Megatron allows it with --fp16 only, which the CPU loop turns off: set it after parsing.
    from megatron_dirmoe.training.builders import build_model_from_args

    args, _ = _build()
    args.fp16_lm_cross_entropy = True
    assert build_model_from_args(args).fp16_lm_cross_entropy and not plain.fp16_lm_cross_entropy


@pytest.mark.parametrize("name", ["spec", "spec_for"])
def test_user_spec_gets_dirmoe_routers(name):
    from megatron_dirmoe.moe_layer import DirMoELayer
    from megatron_dirmoe.router import DirichletRouter

    _, model = _build("--spec", "dirmoe_user_spec", name)
    layer = model.decoder.layers[0]
    assert type(layer.pre_mlp_layernorm).__name__ == "MarkedRMSNorm"  # the user's spec
    assert isinstance(layer.mlp, DirMoELayer) and isinstance(layer.mlp.router, DirichletRouter)


def test_unimportable_spec_stops_at_start_up(capsys):
    with pytest.raises(SystemExit):
        parse("--spec", "no_such_module", "spec", validate=False)
    assert "--spec no_such_module spec: cannot import it" in capsys.readouterr().err


# ------------------------------------------------------------------ MTP with DirMoE layers
def test_mtp_block_has_dirmoe_moe_layers_and_trains(tmp_path):
    """--mtp-num-layers 1 died in Megatron's cross entropy (IndexError, no MTP block was
    built). Now the MTP layer is the decoder's last layer, a DirMoE MoE layer; its loss is
    logged and falls, and its weights train."""
    from megatron_dirmoe.moe_layer import DirMoELayer
    from megatron_dirmoe.pretrain import main
    from megatron_dirmoe.router import DirichletRouter

    _, model = _build("--mtp-num-layers", "1")
    mtp_layer = model.mtp.layers[0].mtp_model_layer
    assert isinstance(mtp_layer.mlp, DirMoELayer)
    assert isinstance(mtp_layer.mlp.router, DirichletRouter) and mtp_layer.mlp.router.is_mtp_layer

    ckpt = str(tmp_path)
    result = main([*BASE, "--mtp-num-layers", "1", "--train-iters", "16", "--lr", "3e-3",
                   "--log-interval", "8", "--eval-interval", "16", "--eval-iters", "1",
                   "--global-batch-size", "4", "--save", ckpt, "--load", ckpt,
                   "--save-interval", "16"])
    mtp = [row["mtp_losses"][0] for row in result.history]
    assert len(mtp) == 16 and all(math.isfinite(x) for x in mtp)
    assert mtp[0] == pytest.approx(math.log(256), abs=0.6)  # ~uniform over the vocabulary
    assert sum(mtp[-4:]) / 4 < sum(mtp[:4]) / 4 - 0.3
    # The MTP layer's router recorded routing metrics after the decoder's layers.
    trained = result.model
    assert any("mtp.layers.0.mtp_model_layer.mlp.router.weight" in n
               for n, _ in trained.named_parameters())
    init_proj = model.mtp.layers[0].eh_proj.weight
    assert not torch.equal(trained.mtp.layers[0].eh_proj.weight, init_proj)


# ------------------------------------------------------------------ the dry run rejects the same
@pytest.mark.parametrize("extra, message", [
    (["--context-parallel-size", "2"], "--context-parallel-size 2"),
    (["--overlap-moe-expert-parallel-comm"], "--overlap-moe-expert-parallel-comm"),
    (["--enable-cuda-graph"], "--enable-cuda-graph (--cuda-graph-impl 'local') would capture"),
    (["--external-cuda-graph"],
     "--external-cuda-graph (--cuda-graph-impl 'transformer_engine') would capture"),
    (["--moe-router-score-function", "sigmoid"], "--moe-router-score-function sigmoid"),
    (["--dirmoe-target-k", "9"], "--dirmoe-target-k"),
])
def test_dry_run_rejects_exactly_what_the_run_rejects(extra, message, capsys):
    """Findings: CP > 1 passed DRY_RUN=1 then died in training/gpu.py; the deprecated CUDA-graph
    flags bypassed the refusal; refused flags were unknown to the dry run."""
    from megatron_dirmoe.launch import main as launch_main

    gpu_job = [a for a in BASE if a not in ("--dirmoe-device", "cpu")] + [
        "--dirmoe-device", "cuda", "--moe-token-dispatcher-type", "alltoall"]
    with pytest.raises(SystemExit):  # the job's start-up (parse for another machine)
        from megatron_dirmoe.training.arguments import parse_pretrain_args

        parse_pretrain_args([*gpu_job, *extra], validate=False, this_machine=False,
                            world_size=4)
    run_error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in run_error
    assert launch_main(["check", "--world-size", "4", "--", *gpu_job, *extra]) == 2
    dry_error = capsys.readouterr().err
    assert message in dry_error and run_error.split(": error: ", 1)[1] in dry_error
    assert launch_main(["check", "--world-size", "4", "--", *gpu_job]) == 0


# ------------------------------------------------------------------ Megatron's loss checks
def test_cpu_loss_checks():
    from argparse import Namespace

    from megatron_dirmoe.training.loss import LossChecks

    checks = LossChecks(Namespace(check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=True))
    assert checks.check(5.0, 1) is None
    assert "spiky loss 60" in checks.check(60.0, 2)
    with pytest.raises(FloatingPointError, match="iteration 3: found NaN"):
        checks.check(float("nan"), 3)
    with pytest.raises(FloatingPointError, match="found Inf"):
        checks.check(float("inf"), 4)
    off = LossChecks(Namespace(check_for_nan_in_loss_and_grad=False, check_for_spiky_loss=False))
    assert off.check(float("nan"), 1) is None


def test_cuda_loss_func_runs_megatrons_checks(monkeypatch):
    """The CUDA path's loss_func validates through Megatron's rerun state machine, as
    pretrain_gpt does (the loss function had dropped those checks)."""
    from megatron.training.global_vars import set_args

    from megatron_dirmoe.training.gpu import loss_func

    args = parse(validate=False)
    args.check_for_nan_in_loss_and_grad, args.check_for_spiky_loss = True, False
    set_args(args)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # named in the error
    mask = torch.ones(2, 3)
    loss, tokens, report = loss_func(mask, torch.full((2, 3), 2.0))
    assert loss.item() == 12.0 and tokens.item() == 6
    with pytest.raises(RuntimeError, match="found NaN in local forward loss calculation"):
        loss_func(mask, torch.full((2, 3), float("nan")))
    with pytest.raises(RuntimeError, match="found Inf in local forward loss calculation"):
        loss_func(mask, torch.full((2, 3), float("inf")))
