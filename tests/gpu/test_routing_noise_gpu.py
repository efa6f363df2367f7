"""The CUDA side of the routing-noise streams (skipped without CUDA): a named state of Megatron's
CUDA RNG tracker, per stream key, reproducible, re-keyed when a checkpoint restores another DP
rank's state, and replayed by activation recompute. The multi-rank behaviour on CPU is in
tests/distributed/test_routing_noise.py."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SHAPE = (256, 8)


@pytest.fixture
def streams(megatron_single_rank):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dirmoe.router import reset_routing_noise, seed_routing_noise

    model_parallel_cuda_manual_seed(1234)
    reset_routing_noise()
    seed_routing_noise(1234)
    yield
    reset_routing_noise()


def _draw(stream: int) -> torch.Tensor:
    from megatron_dirmoe.router import routing_noise_rng

    with routing_noise_rng(torch.device("cuda", torch.cuda.current_device()), stream):
        return torch.rand(SHAPE, device="cuda")


def test_streams_differ_reproduce_and_leave_the_default_generator(streams):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_dirmoe.router import ROUTING_NOISE_RNG, reset_routing_noise, seed_routing_noise

    default = torch.cuda.get_rng_state()
    a0, a1 = _draw(0), _draw(0)
    assert ROUTING_NOISE_RNG in get_cuda_rng_tracker().get_states()
    assert not torch.equal(a0, a1)  # the stream advances
    assert torch.equal(default, torch.cuda.get_rng_state())
    reset_routing_noise()
    seed_routing_noise(1234)
    b0 = _draw(1)
    assert not torch.equal(a0, b0)  # another key (DP rank), other noise
    reset_routing_noise()
    seed_routing_noise(1234)
    assert torch.equal(_draw(0), a0)  # same seed and key: same draws


def test_a_restored_state_of_another_rank_is_rekeyed_keeping_its_position(streams):
    """megatron.training saves DP rank 0's tracker states and every DP rank loads them."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_dirmoe.router import reset_routing_noise, seed_routing_noise

    tracker = get_cuda_rng_tracker()
    _draw(1)
    uninterrupted = _draw(1)  # rank 1's second draw
    reset_routing_noise()
    seed_routing_noise(1234)
    _draw(0)  # rank 0 saves after one draw
    saved = {name: state.clone() for name, state in tracker.get_states().items()}
    reset_routing_noise()
    seed_routing_noise(1234)
    tracker.set_states(saved)  # rank 1 resumes from rank 0's states
    assert torch.equal(_draw(1), uninterrupted)


def test_activation_recompute_replays_the_noise(streams):
    from megatron.core import tensor_parallel

    from megatron_dirmoe.router import routing_noise_rng

    device = torch.device("cuda", torch.cuda.current_device())

    def noisy(x):
        with routing_noise_rng(device, 0):
            return x * torch.rand_like(x)

    x = torch.rand(SHAPE, device="cuda") + 0.5
    x.requires_grad_(True)
    out = tensor_parallel.checkpoint(noisy, False, x)
    out.sum().backward()
    # d(x * u)/dx = u: the recomputed forward must draw the forward's u.
    torch.testing.assert_close(x.grad, out.detach() / x.detach(), rtol=1e-6, atol=0)
