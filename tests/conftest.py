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
