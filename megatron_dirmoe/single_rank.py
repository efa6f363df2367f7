"""A one-process torch.distributed world with Megatron's parallel state (all sizes 1).

Megatron-Core modules read their process groups from `parallel_state`, so even single-process
work (the CPU training loop, the checkpoint converter, benchmarks, tests) needs one.
"""

from __future__ import annotations

import socket

__all__ = ["init_single_rank"]


def init_single_rank(backend: str = "gloo") -> None:
    """Initialise a world of one rank (if none exists) and Megatron's model-parallel state.

    The rendezvous uses a free local port rather than MASTER_PORT: a port left in the
    environment by a launcher or a parent process may already be taken.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
