"""GPU checks (skipped without CUDA): the TE spec in bf16 with the variable-k all-to-all
dispatcher, and the compiled routing step against the eager one."""

from __future__ import annotations

import pytest
import torch
from tiny_config import tiny_transformer_config

from megatron_dirmoe.config import DirMoEConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture
def cuda_rng(megatron_single_rank):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)


@pytest.mark.parametrize("grouped_gemm", [False, True])
def test_te_spec_dirmoe_gpt_forward_backward_bf16(cuda_rng, grouped_gemm):
    pytest.importorskip("transformer_engine")
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.model import build_gpt_model
    from megatron_dirmoe.router import DirichletRouter, set_router_iteration

    config = tiny_transformer_config(
        hidden_size=256, num_attention_heads=8, num_query_groups=4, moe_ffn_hidden_size=512,
        ffn_hidden_size=512, use_cpu_initialization=False, bf16=True, params_dtype=torch.bfloat16,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped_gemm,
        moe_router_dtype="fp32",
    )
    model = build_gpt_model(config, DirMoEConfig(target_k=2, schedule_iters=10), vocab_size=512,
                            max_sequence_length=128, use_te=True).cuda()
    assert "TE" in type(model.decoder.layers[0].self_attention.linear_qkv).__name__
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device="cuda"))
    set_router_iteration(model, 3)
    tokens = torch.randint(0, 512, (2, 129), device="cuda")
    position_ids = torch.arange(128, device="cuda")[None].expand(2, -1)
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and 5.0 < loss.item() < 8.0  # ~ln(512) at init
    for router in (m for m in model.modules() if isinstance(m, DirichletRouter)):
        assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0


def test_compiled_routing_step_matches_eager(cuda_rng):
    from megatron_dirmoe.router import DirichletRouter

    torch.manual_seed(0)
    routers = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = DirMoEConfig(target_k=2, schedule_iters=10, torch_compile=compiled)
        routers[compiled] = DirichletRouter(tiny_transformer_config(), dirmoe_config=cfg).cuda()
        routers[compiled].set_layer_number(1)
    hidden = torch.randn(64, 4, 64, device="cuda")
    outputs = {}
    for compiled, router in routers.items():
        router.eval()
        with torch.no_grad():
            outputs[compiled] = router(hidden)
    torch.testing.assert_close(outputs[True][0], outputs[False][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(outputs[True][1], outputs[False][1])


def test_get_dirmoe_layer_spec_and_swap_on_te_layer_spec(cuda_rng):
    pytest.importorskip("transformer_engine")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megatron_dirmoe import dirichlet_router_builder, get_dirmoe_layer_spec, swap_router
    from megatron_dirmoe.moe_layer import DirMoELayer
    from megatron_dirmoe.router import DirichletRouter

    cfg = DirMoEConfig(schedule_iters=10)
    config = tiny_transformer_config(use_cpu_initialization=False, bf16=True,
                                     params_dtype=torch.bfloat16)
    specs = {
        "ours": get_dirmoe_layer_spec(cfg, num_experts=8, use_te=True),
        "swapped": swap_router(get_gpt_layer_with_transformer_engine_spec(num_experts=8),
                               dirichlet_router_builder(cfg)),
    }
    for name, spec in specs.items():
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128,
                         max_sequence_length=64).cuda()
        layer = model.decoder.layers[0]
        assert isinstance(layer.mlp.router, DirichletRouter), name
        assert isinstance(layer.mlp, DirMoELayer) == (name == "ours")
        tokens = torch.randint(0, 128, (2, 64), device="cuda")
        position_ids = torch.arange(64, device="cuda")[None].expand(2, -1)
        # Without Megatron's Float16Module wrapper the embeddings are fp32; TE modules with
        # bf16 parameters need an autocast region then.
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, position_ids, None, labels=tokens).float().mean()
        loss.backward()
        assert torch.isfinite(loss)
