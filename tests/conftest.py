"""Shared fixtures: a one-process gloo world with Megatron's parallel state, tiny configs."""

from __future__ import annotations

import os
import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Initialise torch.distributed (gloo, world size 1) and Megatron's model-parallel state once
    per test session; CPU tests build Megatron modules inside it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    yield
    # Leave the world up: several test modules share it within one session.
