"""Shared fixtures: a one-process gloo world with Megatron's parallel state."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Initialise torch.distributed (gloo, world size 1) and Megatron's model-parallel state once
    per test session; CPU tests build Megatron modules inside it. The world stays up: several
    test modules share it within one session."""
    from megatron_dirmoe.single_rank import init_single_rank

    init_single_rank("gloo")


@pytest.fixture(autouse=True)
def fresh_moe_metrics_tracker():
    """Megatron's MoE metrics tracker is process-global and keeps each entry's per-layer shape
    from the first model that recorded it; a test building a model with another layer count must
    not see the previous test's entries."""
    yield
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()
