"""GPU checks (skipped without CUDA) of what the router costs: no device-to-host sync in its
forward and backward (CUDA's own sync detector), one in the step's metrics report, and the same
saved input as Megatron's stock `TopKRouter` (bf16, TE GEMM path when TE is installed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

E, H, T = 64, 1024, 8192


def _config():
    return tiny_transformer_config(hidden_size=H, num_attention_heads=8, num_moe_experts=E,
                                   moe_router_topk=8, moe_router_dtype="fp32",
                                   use_cpu_initialization=False, bf16=True,
                                   params_dtype=torch.bfloat16)


@pytest.fixture
def cuda_rng(megatron_single_rank):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    model_parallel_cuda_manual_seed(1234)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device="cuda"))


def _syncs(fn) -> int:
    """Device-to-host synchronisations inside `fn()`, as CUDA's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing operation" in str(w.message) for w in caught)


def test_router_step_never_syncs_and_report_syncs_once(cuda_rng):
    from megatron_dirmoe.metrics import install_metrics_tracker
    from megatron_dirmoe.router import DirichletRouter

    tracker = install_metrics_tracker(num_experts=E)
    router = DirichletRouter(_config(), dirmoe_config=DirMoEConfig(target_k=2, schedule_iters=10))
    router.set_layer_number(1)
    router.cuda()
    x = torch.randn(T // 2, 2, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        probs, _ = router(x)
        probs.float().sum().backward()

    step()  # compile and warm up
    tracker.clear()
    assert _syncs(step) == 0
    assert _syncs(lambda: tracker.report(loss_scale=1.0, iteration=1, num_layers=2)) == 1


def test_router_saves_what_megatrons_topk_router_saves(cuda_rng):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dirmoe.router import DirichletRouter

    def saved_input_bytes(router):
        params = {p.data_ptr() for p in router.parameters()}
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            if t.dim() and t.shape[-1] == H and t.data_ptr() not in params:
                if t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
            return t

        x = torch.randn(T // 2, 2, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probs, _ = router(x)
        probs.float().sum().backward()
        return total

    dirmoe = DirichletRouter(_config(), dirmoe_config=DirMoEConfig(target_k=2, schedule_iters=10))
    topk = TopKRouter(config=_config(), pg_collection=get_default_pg_collection())
    for router in (dirmoe, topk):
        router.set_layer_number(1)
        router.cuda()
    assert saved_input_bytes(dirmoe) == saved_input_bytes(topk) == T * H * 2
