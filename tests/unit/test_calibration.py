"""Closed-form calibrators of the Dirichlet scales against Monte Carlo, and their flags."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_dirmoe import calibration
from megatron_dirmoe.config import DirMoEConfig, add_dirmoe_args, dirmoe_config_from_args

E, K = 8, 2
ALPHA_LO = 0.05
ALPHA_HI = 39.7 * ALPHA_LO
BASE = calibration.on_off_base(E, K, ALPHA_HI, ALPHA_LO)


def _samples(scale: float, base: list[float], n: int = 100_000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    alpha = torch.tensor(base, dtype=torch.float64) * scale
    # Normalised Gammas, drawn here rather than with torch.distributions.Dirichlet, so the
    # reference does not share code with anything under test.
    gammas = torch._standard_gamma(alpha.expand(n, -1).contiguous(), generator=gen)
    return gammas / gammas.sum(-1, keepdim=True)


@pytest.mark.parametrize("scale", [0.3, 2.0, 20.0])
def test_expected_simpson_matches_monte_carlo(scale):
    theta = _samples(scale, BASE)
    simpson = (theta * theta).sum(-1)
    err = 4 * simpson.std().item() / simpson.numel() ** 0.5
    assert calibration.expected_simpson(scale, BASE) == pytest.approx(simpson.mean().item(),
                                                                      abs=err)


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
def test_scale_for_simpson_hits_the_target(target):
    scale = calibration.scale_for_simpson(target, BASE)
    assert calibration.expected_simpson(scale, BASE) == pytest.approx(target, rel=1e-12)
    theta = _samples(scale, BASE)
    simpson = (theta * theta).sum(-1)
    err = 4 * simpson.std().item() / simpson.numel() ** 0.5
    assert simpson.mean().item() == pytest.approx(target, abs=err)
    # A larger target (samples nearer the corners) needs a smaller scale.
    assert calibration.scale_for_simpson(min(target + 0.05, 0.95), BASE) < scale


def test_symmetric_simpson_closed_form():
    """The symmetric case of the formula: lambda = (1 - h) / (h E - 1) per unit base entry."""
    h = 0.4
    assert calibration.scale_for_simpson(h, [1.0] * E) == pytest.approx((1 - h) / (h * E - 1))


@pytest.mark.parametrize("target", [0.002, 0.01, 0.03])
def test_scale_for_mass_variance_hits_the_target(target):
    scale = calibration.scale_for_mass_variance(target, BASE, K)
    mean, var = calibration.mass_mean_and_variance(scale, BASE, K)
    assert var == pytest.approx(target, rel=1e-12)
    mass = _samples(scale, BASE)[:, :K].sum(-1)
    assert mass.mean().item() == pytest.approx(mean, abs=4 * mass.std().item() / mass.numel() ** 0.5)
    # The sample variance of 1e5 draws is within a few percent for these (skewed) Betas.
    assert mass.var().item() == pytest.approx(target, rel=0.06)


def test_unreachable_targets_raise():
    floor = sum(b * b for b in BASE) / sum(BASE) ** 2
    for bad in (floor * 0.99, 1.0, 1.5):
        with pytest.raises(ValueError, match="unreachable"):
            calibration.scale_for_simpson(bad, BASE)
    mean = sum(BASE[:K]) / sum(BASE)
    with pytest.raises(ValueError, match="unreachable"):
        calibration.scale_for_mass_variance(mean * (1 - mean), BASE, K)


def _parse(*flags: str):
    parser = add_dirmoe_args(argparse.ArgumentParser())
    args = parser.parse_args(list(flags))
    args.num_experts, args.train_iters = E, 100
    return dirmoe_config_from_args(args)


def test_calibrator_flags_set_the_scales():
    cfg = _parse("--dirmoe-target-k", str(K), "--dirmoe-prior-simpson", "0.5",
                 "--dirmoe-posterior-simpson", "0.45")
    assert cfg.prior_scale_end == pytest.approx(calibration.scale_for_simpson(0.5, BASE))
    assert cfg.posterior_scale == pytest.approx(calibration.scale_for_simpson(0.45, BASE))
    assert cfg.prior_scale_start == DirMoEConfig().prior_scale_start  # the schedule's start stays
    cfg = _parse("--dirmoe-target-k", str(K), "--dirmoe-prior-mass-variance", "0.01")
    assert calibration.mass_mean_and_variance(cfg.prior_scale_end, BASE, K)[1] == pytest.approx(0.01)
    # The resolved config is a fixed point (a stored config loads to the same numbers).
    assert cfg.calibrated_for(E) == cfg


@pytest.mark.parametrize("flags, message", [
    (("--dirmoe-prior-simpson", "0.5", "--dirmoe-prior-scale-end", "0.3"),
     "--dirmoe-prior-simpson sets --dirmoe-prior-scale-end"),
    (("--dirmoe-posterior-simpson", "0.5", "--dirmoe-posterior-scale", "20"),
     "--dirmoe-posterior-simpson sets --dirmoe-posterior-scale"),
    (("--dirmoe-prior-simpson", "0.5", "--dirmoe-prior-mass-variance", "0.01"),
     "give at most one"),
    (("--dirmoe-prior-simpson", "0.2",), "--dirmoe-prior-simpson: a target Simpson index"),
    (("--dirmoe-prior-mass-variance", "0.24",), "--dirmoe-prior-mass-variance: a target mass"),
    (("--dirmoe-posterior-simpson", "1.0",), "--dirmoe-posterior-simpson"),
])
def test_bad_calibrator_flags_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        _parse("--dirmoe-target-k", str(K), *flags)
