"""Router schedules as pure functions of the training iteration.

Because they depend on nothing but the iteration, resuming from a checkpoint at iteration t
reproduces tau_z(t) and lambda_p(t) exactly.
"""

from __future__ import annotations

from megatron_dirmoe.config import DirMoEConfig
from megatron_dirmoe.routing import cosine_schedule, exponential_schedule

__all__ = ["temperature_at", "prior_scale_at"]


def _horizon(config: DirMoEConfig) -> int:
    if config.schedule_iters is None:
        raise ValueError(
            "--dirmoe-schedule-iters (DirMoEConfig.schedule_iters) is unset: give it, or build the "
            "config with DirMoEConfig.with_schedule_horizon(train_iters)"
        )
    return config.schedule_iters


def temperature_at(config: DirMoEConfig, iteration: int) -> float:
    """Spike temperature tau_z: cosine from `tau_start` to `tau_end` over the horizon, or
    exponential, max(tau_end, tau_start * rho^t) (rho = `tau_decay`, by default the rate that
    reaches tau_end at the horizon)."""
    horizon = _horizon(config)
    if config.tau_schedule == "cosine":
        return cosine_schedule(config.tau_start, config.tau_end, iteration, horizon)
    if config.tau_decay is None:
        return exponential_schedule(config.tau_start, config.tau_end, iteration, horizon)
    return max(config.tau_end, config.tau_start * config.tau_decay ** max(int(iteration), 0))


def prior_scale_at(config: DirMoEConfig, iteration: int) -> float:
    """Dirichlet prior scale lambda_p: cosine (or exponential) from start to end."""
    fn = cosine_schedule if config.prior_scale_schedule == "cosine" else exponential_schedule
    return fn(config.prior_scale_start, config.prior_scale_end, iteration, _horizon(config))
