"""DirMoEConfig validation and its mapping to --dirmoe-* flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_dirmoe.config import (
    DEFAULT_PRIOR_RATIO,
    DirMoEConfig,
    add_dirmoe_args,
    dirmoe_config_from_args,
    flag_name,
)


def test_paper_defaults():
    cfg = DirMoEConfig(recipe="paper")
    assert (cfg.target_k, cfg.route_threshold, cfg.tau_start, cfg.tau_end) == (1, 0.125, 2.0, 0.3)
    assert (cfg.prior_scale_start, cfg.prior_scale_end, cfg.posterior_scale) == (0.5, 0.3, 20.0)
    assert (cfg.alpha_lo, cfg.alpha_floor, cfg.kl_weight, cfg.sparsity_weight) == (0.05, 0.005, 1e-2, 1e-2)
    assert cfg.renormalize is True and cfg.slab == "gated"
    assert (cfg.recon_variance, cfg.leak) == (1.0, 1e-3)
    assert cfg.max_active_for(8) == 4 and cfg.max_active_for(2) == 2
    assert cfg.prior_ratio_for(8) == DEFAULT_PRIOR_RATIO == 39.7
    # alpha_hi = r * alpha_lo ~ 1.99 as the paper notes say
    assert cfg.prior_ratio_for(8) * cfg.alpha_lo == pytest.approx(1.985)
    # r derived from the prior mass: m (E - k) / ((1 - m) k)
    assert DirMoEConfig(prior_mass=0.9).prior_ratio_for(8) == pytest.approx(63.0)
    assert DirMoEConfig(prior_mass=0.85).prior_ratio_for(8) == pytest.approx(39.6667, rel=1e-4)


def test_calibrated_recipe_defaults_depend_on_k():
    """The default recipe trains near the posterior mean without the Dirichlet KL, renormalises
    the weights over the active set from k = 2 on, holds the count with the count controller,
    and sets the count penalty by those choices."""
    one, two = DirMoEConfig(), DirMoEConfig(target_k=2)
    assert one.recipe == "calibrated" and one.slab == "gate"
    assert (one.posterior_scale, one.kl_weight, one.balance_weight) == (1000.0, 0.0, 0.1)
    assert one.count_control_rate == two.count_control_rate == 0.03
    # From k = 2 on the load controller balances the load and the balance term is off; a
    # floor-only controller (given) leaves the balancing to the balance term. Its step waits
    # for E (0.01 next to the fine-grained aux loss, else 0.03) unless the aux loss is given.
    assert (one.load_control_rate, two.load_control_rate) == (0.0, None)
    assert (two.calibrated_for(8).load_control_rate,
            two.calibrated_for(32).load_control_rate) == (0.03, 0.01)
    assert DirMoEConfig(target_k=2, aux_loss_coeff=0.0).load_control_rate == 0.03
    assert DirMoEConfig(target_k=2, aux_loss_coeff=0.03).load_control_rate == 0.01
    assert DirMoEConfig(target_k=2, load_control_rate=0.05).calibrated_for(
        32).load_control_rate == 0.05
    assert one.load_control_floor == two.load_control_floor == 1.0
    assert two.balance_weight == 0.0
    assert DirMoEConfig(target_k=2, load_control_rate=0.0).balance_weight == 0.1
    assert DirMoEConfig(target_k=1, load_control_rate=0.05).balance_weight == 0.0
    assert DirMoEConfig(target_k=2, load_control_floor=0.5).balance_weight == 0.1
    assert DirMoEConfig(target_k=1, load_control_rate=0.03,
                        load_control_floor=0.5).balance_weight == 0.1
    assert DirMoEConfig(target_k=2, balance_weight=0.02).balance_weight == 0.02
    assert (one.renormalize, one.count_weight) == (False, 0.1)
    assert (two.renormalize, two.count_weight) == (True, 0.0)
    # A given value wins; the count weight follows a renormalisation or controller given.
    assert DirMoEConfig(target_k=2, renormalize=False).count_weight == 0.1
    assert DirMoEConfig(target_k=1, renormalize=True).count_weight == 0.0
    assert DirMoEConfig(target_k=2, count_control_rate=0.0).count_weight == 0.01
    assert DirMoEConfig(target_k=1, renormalize=True, count_control_rate=0).count_weight == 0.01
    assert DirMoEConfig(target_k=2, count_weight=0.05).count_weight == 0.05
    # Resolved once: the stored dict holds numbers and rebuilds the same config.
    assert DirMoEConfig(**dataclasses.asdict(two)) == two
    resolved = two.calibrated_for(32)
    assert DirMoEConfig(**dataclasses.asdict(resolved)) == resolved


@pytest.mark.parametrize("num_experts, k, coeff, count_on", [
    (8, 2, 0.0, "routed"), (16, 4, 0.0, "routed"), (31, 4, 0.0, "routed"),
    (32, 4, 0.03, "partial"), (64, 8, 0.03, "partial"), (256, 8, 0.03, "partial"),
    (256, 3, 0.03, "partial"), (32, 2, 0.03, "partial"),
    (64, 1, 0.0, "routed"),  # k = 1 keeps its balance term
])
def test_fine_grained_defaults_depend_on_the_number_of_experts(num_experts, k, coeff, count_on):
    """From 32 experts on (k >= 2) the calibrated recipe adds its own Switch loss on the
    posterior mean; its count controller then counts the gates' own choice and its load
    controller steps 0.01 instead of 0.03. All are resolved once E is known, and a value given
    wins."""
    cfg = DirMoEConfig(target_k=k)
    assert (cfg.aux_loss_coeff, cfg.count_control_on) == (None, None)  # E not known yet
    assert cfg.aux_loss_scores == "posterior-mean"
    resolved = cfg.calibrated_for(num_experts)
    assert resolved.aux_loss_coeff == pytest.approx(coeff)
    assert resolved.count_control_on == count_on
    assert resolved.load_control_rate == (0.0 if k == 1 else 0.01 if coeff else 0.03)
    # The gates' count is stepped in proportion to its miss, the routed count by its sign.
    assert cfg.count_control_gain is None
    assert resolved.count_control_gain == (4.0 if count_on == "partial" else 0.0)
    assert resolved.calibrated_for(num_experts) == resolved
    assert DirMoEConfig(**dataclasses.asdict(resolved)) == resolved  # stored, then rebuilt
    given = DirMoEConfig(target_k=k, aux_loss_coeff=0.01, count_control_on="routed")
    assert (given.calibrated_for(num_experts).aux_loss_coeff,
            given.calibrated_for(num_experts).count_control_on,
            given.calibrated_for(num_experts).count_control_gain) == (0.01, "routed", 0.0)
    assert DirMoEConfig(target_k=k, count_control_gain=1.5).calibrated_for(
        num_experts).count_control_gain == 1.5
    # An aux loss given below 32 experts counts the gates too, unless told otherwise.
    assert DirMoEConfig(target_k=k, aux_loss_coeff=0.01).calibrated_for(
        num_experts).count_control_on == "partial"
    gates = DirMoEConfig(target_k=k, count_control_on="gates").calibrated_for(num_experts)
    assert gates.count_control_gain == 4.0
    off = DirMoEConfig(target_k=k, aux_loss_coeff=0.0).calibrated_for(num_experts)
    assert (off.aux_loss_coeff, off.count_control_on) == (0.0, "routed")
    # The paper recipes have no aux loss of their own, at any E.
    paper = DirMoEConfig(recipe="paper", target_k=k).calibrated_for(num_experts)
    assert (paper.aux_loss_coeff, paper.aux_loss_scores) == (0.0, "gates")


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DirMoEConfig().target_k = 2  # type: ignore[misc]


BAD_VALUES = [
    ("target_k", 0),
    ("aux_loss_coeff", -1e-2),
    ("route_threshold", 0.0),
    ("route_threshold", 1.0),
    ("tau_start", 0.0),
    ("tau_end", -1.0),
    ("prior_scale_start", 0.0),
    ("prior_scale_end", -0.1),
    ("posterior_scale", 0.0),
    ("posterior_scale", 5000.0),
    ("alpha_lo", 0.0),
    ("alpha_floor", 0.0),
    ("alpha_floor", -1.0),
    ("alpha_ceiling", 0.001),
    ("recon_variance", 0.0),
    ("leak", 0.0),
    ("kl_weight", -1e-3),
    ("sparsity_weight", -1.0),
    ("schedule_iters", 0),
    ("prior_scale_schedule", "linear"),
    ("prior_ratio", 0.5),
    ("prior_mass", 1.0),
    ("capacity_factor", 0.0),
    ("tau_start", float("nan")),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_bad_values_name_the_flag(name, value):
    with pytest.raises(ValueError, match=flag_name(name)) as err:
        DirMoEConfig(**{name: value})
    assert "allowed" in str(err.value)


def test_max_active_and_k_against_experts():
    with pytest.raises(ValueError, match="--dirmoe-max-active"):
        DirMoEConfig(target_k=2, max_active=1)
    with pytest.raises(ValueError, match="--dirmoe-target-k.*--num-experts \\(8\\)"):
        DirMoEConfig(target_k=9).validate_for(8)
    with pytest.raises(ValueError, match="--dirmoe-max-active.*--num-experts \\(8\\)"):
        DirMoEConfig(max_active=9).validate_for(8)
    with pytest.raises(ValueError, match="prior-ratio.*prior-mass"):
        DirMoEConfig(prior_ratio=10.0, prior_mass=0.9)
    assert DirMoEConfig(target_k=8).validate_for(8).max_active_for(8) == 8


def test_every_field_has_a_flag_and_round_trips():
    parser = add_dirmoe_args(argparse.ArgumentParser())
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    for f in dataclasses.fields(DirMoEConfig):
        assert flag_name(f.name) in flags, f.name
    args = parser.parse_args(
        [
            "--dirmoe-recipe", "paper",
            "--dirmoe-target-k", "2", "--dirmoe-max-active", "3", "--dirmoe-route-threshold", "0.2",
            "--dirmoe-no-renormalize", "--dirmoe-tau-start", "1.5", "--dirmoe-prior-scale-schedule",
            "exponential", "--dirmoe-schedule-iters", "77", "--dirmoe-prior-mass", "0.8",
            "--dirmoe-capacity-factor", "1.25",
        ]
    )
    cfg = dirmoe_config_from_args(args, num_experts=8)
    assert (cfg.target_k, cfg.max_active, cfg.route_threshold, cfg.renormalize) == (2, 3, 0.2, False)
    assert (cfg.tau_start, cfg.prior_scale_schedule, cfg.schedule_iters) == (1.5, "exponential", 77)
    assert (cfg.prior_mass, cfg.capacity_factor) == (0.8, 1.25)
    # Flags not given keep the dataclass defaults (the one place defaults live).
    assert cfg.tau_end == DirMoEConfig().tau_end
    assert dirmoe_config_from_args(parser.parse_args([])) == DirMoEConfig()


def test_cli_rejects_bad_value_with_flag_name():
    parser = add_dirmoe_args(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="--dirmoe-route-threshold"):
        dirmoe_config_from_args(parser.parse_args(["--dirmoe-route-threshold", "1.5"]))
    with pytest.raises(ValueError, match="--dirmoe-target-k"):
        dirmoe_config_from_args(parser.parse_args(["--dirmoe-target-k", "16"]), num_experts=8)


def test_recipes_select_rule_fallback_and_weights():
    calibrated = DirMoEConfig(target_k=2, count_weight=0.2, balance_weight=0.3)
    assert calibrated.recipe == "calibrated"  # the default
    assert (calibrated.routing_rule, calibrated.fallback_k, calibrated.slab) == ("gate", 2, "gate")
    assert (calibrated.effective_count_weight, calibrated.effective_balance_weight) == (0.2, 0.3)
    assert DirMoEConfig(slab_mean="head").slab == "head"  # release 0.1's calibrated recipe
    for recipe, slab in (("paper", "gated"), ("paper-notes", "head")):
        paper = DirMoEConfig(recipe=recipe, target_k=2, sparsity_weight=0.05)
        assert (paper.routing_rule, paper.fallback_k, paper.slab) == ("weight", 1, slab)
        assert (paper.effective_count_weight, paper.effective_balance_weight) == (0.05, 0.0)
        assert paper.count_on_sample == (recipe == "paper")
    with pytest.raises(ValueError, match="--dirmoe-recipe"):
        DirMoEConfig(recipe="topk")
    with pytest.raises(ValueError, match="--dirmoe-count-weight"):
        DirMoEConfig(count_weight=float("inf"))


def _release_01_config(**changes) -> dict:
    """A resolved config as release 0.1 stored it: no fields added since, concrete values."""
    stored = dataclasses.asdict(DirMoEConfig(target_k=2, schedule_iters=50, posterior_scale=20.0,
                                             kl_weight=0.01, count_weight=0.1, renormalize=True))
    for name in ("slab_mean", "tau_schedule", "tau_decay", "prior_simpson",
                 "prior_mass_variance", "posterior_simpson"):
        del stored[name]
    stored.update(changes)
    return stored


def test_stored_config_wins_and_older_checkpoints_keep_their_recipe():
    """A checkpoint's args carry the resolved config, and the flags in the same namespace do not
    override it. One written before `recipe` existed trained with the notes-literal recipe; one
    whose "paper" predates the three-head recipe too; release 0.1's "calibrated" had its own
    slab head."""
    stored = _release_01_config()
    del stored["recipe"]
    args = argparse.Namespace(dirmoe_config=stored, dirmoe_target_k=1, num_experts=8,
                              train_iters=999)
    cfg = dirmoe_config_from_args(args)
    assert (cfg.recipe, cfg.target_k, cfg.schedule_iters) == ("paper-notes", 2, 50)
    args.dirmoe_config = _release_01_config(recipe="paper")
    assert dirmoe_config_from_args(args).recipe == "paper-notes"
    args.dirmoe_config = _release_01_config(recipe="calibrated")
    old = dirmoe_config_from_args(args)
    assert (old.recipe, old.slab, old.posterior_scale, old.count_weight) == (
        "calibrated", "head", 20.0, 0.1)
    # A run stored before the router's own aux loss had none, and Megatron's aux loss (if any)
    # read the gate probabilities, whatever its number of experts.
    before_aux = dataclasses.asdict(DirMoEConfig(target_k=2, schedule_iters=50))
    del before_aux["aux_loss_coeff"], before_aux["aux_loss_scores"]
    del before_aux["count_control_gain"]
    before_aux["count_control_on"] = "routed"
    args.dirmoe_config, args.num_experts = before_aux, 32
    resumed = dirmoe_config_from_args(args)
    assert (resumed.aux_loss_coeff, resumed.aux_loss_scores, resumed.count_control_on,
            resumed.count_control_gain) == (0.0, "gates", "routed", 0.0)
    args.num_experts = 8
    # Today's stored configs round-trip as they are.
    args.dirmoe_config = dataclasses.asdict(DirMoEConfig(recipe="paper", schedule_iters=5))
    assert dirmoe_config_from_args(args) == DirMoEConfig(recipe="paper", schedule_iters=5)
    # From flags, the horizon defaults to --train-iters.
    parser = add_dirmoe_args(argparse.ArgumentParser())
    flags = parser.parse_args(["--dirmoe-target-k", "2"])
    flags.train_iters, flags.num_experts = 30, 8
    assert dirmoe_config_from_args(flags).schedule_iters == 30
    with pytest.raises(ValueError, match="--dirmoe-target-k"):
        dirmoe_config_from_args(parser.parse_args(["--dirmoe-target-k", "9"]), num_experts=8)
