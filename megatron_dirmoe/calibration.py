"""Closed-form calibration of Dirichlet concentration scales (pure Python, no torch).

The paper sets the Dirichlet scales lambda from interpretable targets instead of raw numbers.
For ``theta ~ Dir(lambda * b)`` with a base vector b (B = sum_i b_i, S2 = sum_i b_i^2):

* **Simpson index** ``H = sum_i theta_i^2`` (1 when all mass is on one expert, 1/E when spread
  evenly): ``E[H] = (lambda * S2 / B + 1) / (lambda * B + 1)``, strictly decreasing in lambda from
  1 (lambda -> 0, samples at the simplex corners) to ``S2 / B^2`` (lambda -> inf, the mean's own
  Simpson index). Solving for a target h: ``lambda = (1 - h) / (h * B - S2 / B)``.
* **Mass on a group** of experts S: ``T = sum_{i in S} theta_i ~ Beta(lambda * b_S, lambda *
  (B - b_S))`` with mean ``m = b_S / B`` and variance ``m (1 - m) / (lambda * B + 1)``. Solving for
  a target variance v: ``lambda = (m (1 - m) / v - 1) / B``.

DirMoE's reference shape is k experts "on" at ``alpha_hi`` and E - k "off" at ``alpha_lo``
(:func:`on_off_base`), the configuration the spike-dependent prior takes when exactly k gates fire.
"""

from __future__ import annotations

__all__ = [
    "on_off_base",
    "expected_simpson",
    "scale_for_simpson",
    "mass_mean_and_variance",
    "scale_for_mass_variance",
]


def on_off_base(num_experts: int, target_k: int, alpha_hi: float, alpha_lo: float) -> list[float]:
    """The base vector with k entries alpha_hi and E - k entries alpha_lo."""
    if not 1 <= target_k <= num_experts:
        raise ValueError(f"need 1 <= k ({target_k}) <= E ({num_experts})")
    return [alpha_hi] * target_k + [alpha_lo] * (num_experts - target_k)


def expected_simpson(scale: float, base: list[float]) -> float:
    """E[sum_i theta_i^2] for theta ~ Dir(scale * base)."""
    total = sum(base)
    squares = sum(b * b for b in base)
    return (scale * squares / total + 1.0) / (scale * total + 1.0)


def scale_for_simpson(target: float, base: list[float]) -> float:
    """The scale lambda with E[sum_i theta_i^2] = target for theta ~ Dir(lambda * base).

    Raises ValueError unless the target lies strictly between the mean's Simpson index
    S2 / B^2 (reached as lambda -> inf) and 1 (lambda -> 0)."""
    total = sum(base)
    squares = sum(b * b for b in base)
    floor = squares / (total * total)
    if not floor < target < 1.0:
        raise ValueError(f"a target Simpson index of {target!r} is unreachable: allowed "
                         f"({floor:.6g}, 1), the Simpson index of the mean and of a corner")
    return (1.0 - target) / (target * total - squares / total)


def mass_mean_and_variance(scale: float, base: list[float], group: int) -> tuple[float, float]:
    """Mean and variance of the mass sum_{i < group} theta_i, theta ~ Dir(scale * base)."""
    total = sum(base)
    mean = sum(base[:group]) / total
    return mean, mean * (1.0 - mean) / (scale * total + 1.0)


def scale_for_mass_variance(target: float, base: list[float], group: int) -> float:
    """The scale lambda with Var[sum_{i < group} theta_i] = target for theta ~ Dir(lambda * base).

    Raises ValueError unless 0 < target < m (1 - m), m the group's mean mass (the variance of a
    Bernoulli(m), reached as lambda -> 0)."""
    total = sum(base)
    mean = sum(base[:group]) / total
    ceiling = mean * (1.0 - mean)
    if not 0.0 < target < ceiling:
        raise ValueError(f"a target mass variance of {target!r} is unreachable: allowed "
                         f"(0, {ceiling:.6g}) = (0, m (1 - m)) for the mean mass m = {mean:.6g}")
    return (ceiling / target - 1.0) / total
