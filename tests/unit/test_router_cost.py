"""What the router costs per step: saved activations, host syncs and collectives (CPU).

Counted rather than timed: `sync_count.HostSyncCounter` counts the operations that would make the
host wait for a GPU, `sync_count.count_collectives` the torch.distributed calls (one gloo rank
here; the per-layer collectives of multi-rank layouts are counted in
tests/distributed/test_metrics_multirank.py).
"""

from __future__ import annotations

import pytest
import torch
from sync_count import HostSyncCounter, count_collectives
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig

E, T = 8, 256


def _routers(hidden: int, **overrides):
    from megatron_dirmoe.baselines import DeviceAgnosticTopKRouter
    from megatron_dirmoe.router import DirichletRouter

    config = tiny_transformer_config(hidden_size=hidden, num_moe_experts=E, moe_router_topk=2,
                                     moe_router_dtype="fp32", **overrides)
    torch.manual_seed(0)
    dirmoe = DirichletRouter(config, dirmoe_config=DirMoEConfig(schedule_iters=10, target_k=2))
    topk = DeviceAgnosticTopKRouter(config)
    for router in (dirmoe, topk):
        router.set_layer_number(1)
    return dirmoe, topk


def _saved_bytes(router, x) -> dict:
    """Bytes of the distinct tensors autograd saves in the router's forward, parameters aside:
    in total and in tensors with the hidden size as last dimension (copies of the input)."""
    params = {p.data_ptr() for p in router.parameters()}
    seen, total, of_input = set(), 0, 0
    # Every packed tensor is kept alive until the count is done: a tensor saved by a graph
    # branch that is dropped during the forward would otherwise free its storage, and a later
    # tensor at the same address would be taken for the same one (a count that depends on the
    # allocator).
    alive = []

    def pack(t):
        nonlocal total, of_input
        alive.append(t)
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            total += nbytes
            if t.dim() and t.shape[-1] == x.shape[-1]:
                of_input += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probs, _ = router(x)
    probs.sum().backward()  # the saved tensors really serve a backward
    return {"total": total, "input": of_input}


def test_router_saves_the_bf16_input_as_megatrons_topk_router_does(megatron_single_rank):
    """The gating GEMM runs in fp32, but what it keeps for the backward is the bf16 input
    itself (2 bytes per element), as Megatron's `router_gating_linear` in `TopKRouter`: an fp32
    copy would double the router's activation memory at large hidden sizes."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    sizes = {}
    for hidden in (512, 1024):
        dirmoe, topk = _routers(hidden)
        x = torch.randn(T // 2, 2, hidden).to(torch.bfloat16).requires_grad_()
        sizes[hidden] = {"dirmoe": _saved_bytes(dirmoe, x), "topk": _saved_bytes(topk, x)}
        for name in ("dirmoe", "topk"):
            assert sizes[hidden][name]["input"] == T * hidden * 2, (name, sizes[hidden])
        assert dirmoe.weight.grad is not None and torch.isfinite(dirmoe.weight.grad).all()
    # What grows with the hidden size grows alike: T x 2 bytes per hidden unit for both.
    for name in ("dirmoe", "topk"):
        slope = (sizes[1024][name]["total"] - sizes[512][name]["total"]) / 512
        assert slope == T * 2, (name, sizes)
    # The rest is routing state of size [T, E]: a few fp32 copies for DirMoE's richer routing.
    dirmoe_rest = sizes[1024]["dirmoe"]["total"] - sizes[1024]["dirmoe"]["input"]
    assert dirmoe_rest <= 40 * T * E * 4, sizes


def test_router_gating_is_exact_in_fp32_and_returns_bf16_input_grads(megatron_single_rank):
    dirmoe, _ = _routers(64)
    x = torch.randn(16, 2, 64).to(torch.bfloat16).requires_grad_()
    logits = dirmoe.gating(x)
    assert logits.dtype == torch.float32
    weight = dirmoe.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref.float(), weight)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    logits.backward(grad)
    ref.backward(grad)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(dirmoe.weight.grad, weight.grad, rtol=1e-6, atol=1e-6)


def test_topk_baseline_gates_with_megatrons_own_function(megatron_single_rank):
    """The TopK baseline is stock Megatron: its logits come from `router_gating_linear`."""
    _, topk = _routers(64)
    x = torch.randn(16, 2, 64).to(torch.bfloat16).requires_grad_()
    logits = topk.gating(x)
    assert logits.dtype == torch.float32
    assert type(logits.grad_fn).__name__ == "RouterGatingLinearFunctionBackward"


@pytest.mark.parametrize("padding", [False, True])
def test_router_forward_and_backward_never_wait_for_the_device(megatron_single_rank, padding):
    """No host sync and (one rank) no collective in a router's forward and backward: the
    metrics stay on the device until the step's report."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.metrics import install_metrics_tracker

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tracker = install_metrics_tracker()
    tracker.clear()
    dirmoe, _ = _routers(64)
    x = torch.randn(16, 2, 64, requires_grad=True)
    mask = torch.zeros(16, 2, dtype=torch.bool)
    if padding:
        mask[12:, 1] = True
    with count_collectives() as collectives, HostSyncCounter() as syncs:
        probs, _ = dirmoe(x, padding_mask=mask if padding else None)
        probs.sum().backward()
    assert syncs.count == 0, syncs.sites
    assert not collectives, collectives
    assert tracker.routing_sums[0, 0] == 32 - 4 * padding  # the real tokens were recorded
    tracker.clear()


def test_report_makes_one_collective_and_one_host_copy_per_step(megatron_single_rank):
    """Three MoE layers x two micro-batches recorded; the report writes every metric to the
    console, TensorBoard and per layer, with one all-reduce and one device-to-host copy (before:
    3 all-reduces and 2 host reads per metric: 42 and 28)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.metrics import METRIC_NAMES, install_metrics_tracker

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, name, value, step):
            assert isinstance(value, float)  # host numbers, not device tensors
            self.scalars[name] = value

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))
    tracker = install_metrics_tracker()
    tracker.clear()
    routers = []
    for layer in (1, 2, 4):  # layer 3 is dense
        router, _ = _routers(64, num_layers=4)
        router.set_layer_number(layer)
        routers.append(router)
    for _ in range(2):
        for router in routers:
            router(torch.randn(16, 2, 64))[0].sum().backward()
    writer = Writer()
    with count_collectives() as collectives, HostSyncCounter() as syncs:
        text = tracker.report(loss_scale=0.5, iteration=1, writer=writer, per_layer_logging=True,
                              num_layers=4, track_names=[], force_initialize=True)
    assert collectives["all_reduce"] == 1 and sum(
        v for k, v in collectives.items() if isinstance(k, str)) == 1, collectives
    assert syncs.count == 1 and syncs.sites["cpu"] == 1, syncs.sites
    # k = 2: the load controller balances, so there is no balance term to report.
    reported = [name for name in METRIC_NAMES if name != "dirmoe/balance_penalty"]
    assert all(f"{name}: " in text for name in reported)
    assert set(reported) <= set(writer.scalars)
    assert "dirmoe/balance_penalty" not in writer.scalars
    # Per layer only for the MoE layers (0-based index, Megatron's naming).
    assert {"moe/dirmoe/active_experts_layer_0", "moe/dirmoe/active_experts_layer_3"} <= set(
        writer.scalars) and "moe/dirmoe/active_experts_layer_2" not in writer.scalars
