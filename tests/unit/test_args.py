"""The pretrain command line: every DirMoEConfig field is a flag, bad values name their flag,
the paper's defaults apply unless overridden, presets and the CPU adjustments."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_dirmoe.config import DirMoEConfig, flag_name

BASE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--train-iters", "10", "--mock-data", "--dirmoe-device", "cpu",
]

# A valid non-default value for every field (given as command-line text).
NON_DEFAULT = {
    "recipe": "paper",
    "target_k": "2",
    "max_active": "5",
    "route_threshold": "0.2",
    "renormalize": None,  # boolean: --dirmoe-no-renormalize
    "tau_start": "1.5",
    "tau_end": "0.5",
    "prior_scale_start": "0.6",
    "prior_scale_end": "0.2",
    "prior_scale_schedule": "exponential",
    "schedule_iters": "7",
    "posterior_scale": "10",
    "prior_ratio": "20",
    "prior_mass": "0.8",
    "alpha_lo": "0.1",
    "alpha_floor": "0.01",
    "alpha_ceiling": "2000",
    "kl_weight": "0.02",
    "sparsity_weight": "0.03",
    "count_weight": "0.3",
    "count_control_rate": "0.05",
    "count_control_on": "gates",
    "count_control_gain": "2.5",
    "load_control_rate": "0.02",
    "load_control_floor": "0.7",
    "balance_weight": "0.2",
    "recon_variance": "2",
    "leak": "0.01",
    "torch_compile": None,  # boolean: --dirmoe-no-torch-compile
    "capacity_factor": "1.5",
    "tau_schedule": "exponential",
    "tau_decay": "0.9",
    "prior_simpson": "0.9",
    "prior_mass_variance": "0.01",
    "posterior_simpson": "0.8",
    "slab_mean": "head",
    "unnormalized_weight": "posterior-mean",
    "aux_loss_scores": "gates",
    "aux_loss_coeff": "0.05",
}


def parse(*extra, validate=False):
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    return parse_pretrain_args([*BASE, *extra], validate=validate)


def test_table_covers_every_field():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(DirMoEConfig)}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_every_field_reachable_from_the_cli(name):
    value = NON_DEFAULT[name]
    if value is None:
        argv = ["--dirmoe-no-" + name.replace("_", "-")]
        expected = False
    else:
        argv = [flag_name(name), value]
        expected = (value if name in ("prior_scale_schedule", "recipe", "tau_schedule",
                                      "slab_mean", "unnormalized_weight", "count_control_on",
                                      "aux_loss_scores") else float(value))
    kwargs = {}
    if name in ("route_threshold", "sparsity_weight"):  # flags of the paper recipe only
        argv += ["--dirmoe-recipe", "paper"]
        kwargs["recipe"] = "paper"
    if name == "aux_loss_scores":  # what Megatron's aux loss reads: needs that loss on
        argv += ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2"]
    if name == "load_control_floor":  # a setting of the load controller, on from k = 2
        argv += ["--dirmoe-target-k", "2"]
        kwargs["target_k"] = 2
    if name == "tau_decay":  # a parameter of the exponential schedule only
        argv += ["--dirmoe-tau-schedule", "exponential"]
        kwargs["tau_schedule"] = "exponential"
    args = parse(*argv)
    got = args.dirmoe_config[name]
    assert got == pytest.approx(expected) if isinstance(got, float) else got == expected
    # ... and every other field keeps its default given this one (some defaults depend on the
    # recipe and on k, and a calibrator sets its target: DirMoEConfig resolves them the same
    # way for the parser's 8 experts).
    kwargs[name] = got
    defaults = dataclasses.asdict(DirMoEConfig(**kwargs).calibrated_for(8))
    for other, default in defaults.items():
        if other not in (name, "schedule_iters"):
            assert args.dirmoe_config[other] == default, other


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--dirmoe-route-threshold", "1.5"], "--dirmoe-route-threshold"),
        (["--dirmoe-route-threshold", "0.2"], "--dirmoe-route-threshold"),  # calibrated: no effect
        (["--dirmoe-recipe", "paper", "--dirmoe-balance-weight", "0.2"], "--dirmoe-balance-weight"),
        (["--dirmoe-recipe", "topk"], "--dirmoe-recipe"),
        (["--dirmoe-balance-weight", "-1"], "--dirmoe-balance-weight"),
        (["--dirmoe-target-k", "2", "--dirmoe-load-control-floor", "0"],
         "--dirmoe-load-control-floor"),
        (["--dirmoe-load-control-floor", "0.5"], "--dirmoe-load-control-floor"),  # no controller
        (["--dirmoe-target-k", "0"], "--dirmoe-target-k"),
        (["--dirmoe-target-k", "9"], "--dirmoe-target-k"),  # > --num-experts (8)
        (["--dirmoe-max-active", "9"], "--dirmoe-max-active"),
        (["--dirmoe-tau-end", "-1"], "--dirmoe-tau-end"),
        (["--dirmoe-prior-scale-schedule", "linear"], "--dirmoe-prior-scale-schedule"),
        (["--dirmoe-prior-mass", "1.2"], "--dirmoe-prior-mass"),
        (["--dirmoe-prior-ratio", "20", "--dirmoe-prior-mass", "0.8"], "--dirmoe-prior-ratio"),
        (["--dirmoe-schedule-iters", "0"], "--dirmoe-schedule-iters"),
        (["--dirmoe-kl-weight", "nan"], "--dirmoe-kl-weight"),
        (["--dirmoe-target-k", "two"], "--dirmoe-target-k"),  # argparse type error
        (["--moe-router-topk", "2"], "--moe-router-topk"),  # not the DirMoE cap (4)
        (["--moe-router-topk", "6"], "--moe-router-topk"),
        (["--moe-expert-capacity-factor", "1.0"], "--dirmoe-capacity-factor"),  # layout rule
        (["--dirmoe-router", "softmax"], "--dirmoe-router"),
    ],
)
def test_bad_values_rejected_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_paper_defaults_and_cpu_adjustments():
    args = parse(validate=True)
    assert (args.optimizer, args.lr, args.min_lr, args.weight_decay) == ("adam", 1e-4, 1e-5, 1e-2)
    assert args.lr_decay_style == "cosine" and args.lr_warmup_fraction == 0.01
    assert args.clip_grad == 1.0 and args.seed == 1234
    assert args.moe_router_dtype == "fp32"
    # DirMoE: topk is the cap on active experts, schedules span the run.
    assert args.moe_router_topk == 4 and args.dirmoe_config["schedule_iters"] == 10
    # No GPU: fp32, allgather dispatcher, local spec, CPU initialisation.
    assert not args.dirmoe_use_cuda and not args.bf16
    assert args.moe_token_dispatcher_type == "allgather" and args.transformer_impl == "local"
    assert args.use_cpu_initialization and not args.gradient_accumulation_fusion


def test_user_flags_override_paper_defaults():
    args = parse("--lr", "3e-4", "--lr-warmup-iters", "2", "--seed", "7", "--clip-grad", "0.5",
                 "--dirmoe-schedule-iters", "5", "--moe-token-dispatcher-type", "alltoall",
                 "--bf16")
    assert (args.lr, args.lr_warmup_iters, args.lr_warmup_fraction) == (3e-4, 2, None)
    assert (args.seed, args.clip_grad) == (7, 0.5)
    assert args.dirmoe_config["schedule_iters"] == 5
    # The same GPU command runs on CPU: unsupported GPU settings are switched off.
    assert args.moe_token_dispatcher_type == "allgather" and not args.bf16


def test_bf16_default_on_cuda(monkeypatch):
    from megatron_dirmoe.training import arguments

    monkeypatch.setattr(arguments, "_cuda_available", lambda: True)
    base = [a for a in BASE if a not in ("--dirmoe-device", "cpu")]
    args = arguments.parse_pretrain_args(base, validate=False)
    assert args.dirmoe_use_cuda and args.bf16
    args = arguments.parse_pretrain_args([*base, "--fp16"], validate=False)
    assert args.fp16 and not args.bf16


def test_topk_baseline_keeps_megatron_topk():
    args = parse("--dirmoe-router", "topk", "--moe-router-topk", "2")
    assert args.dirmoe_router == "topk" and args.moe_router_topk == 2


def test_preset_tiny_and_override():
    from megatron_dirmoe.training.arguments import PRESETS

    args = parse("--preset", "tiny", "--num-layers", "3")
    assert args.num_layers == 3  # the flag wins over the preset
    assert args.hidden_size == 64  # BASE gives --hidden-size 64 explicitly
    args = parse("--preset", "tiny")
    assert args.num_experts == PRESETS["tiny"]["num_experts"]
    assert args.global_batch_size == PRESETS["tiny"]["global_batch_size"]


def test_train_iters_required(capsys):
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    argv = [a for a in BASE if a not in ("--train-iters", "10")]
    with pytest.raises(SystemExit):
        parse_pretrain_args(argv, validate=False)
    assert "--train-iters" in capsys.readouterr().err
