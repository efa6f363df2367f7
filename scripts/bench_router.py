#!/usr/bin/env python
"""Router forward+backward: DirichletRouter vs Megatron's TopKRouter, side by side in one run.

Both routers see the same tokens (same hidden states, same T, E, hidden size and dtype). The
TopK baseline is Megatron's softmax top-k with the load-balancing aux loss; DirMoE runs its
training path (Gumbel-Sigmoid spike, Dirichlet slab, KL + count + balance losses).

    python scripts/bench_router.py                         # CPU, small sizes
    python scripts/bench_router.py --device cuda --tokens 32768 --experts 8 64 --hidden 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per forward (T)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--topk", type=int, default=2, help="k of TopKRouter and DirMoE's target k")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="hidden-state dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args()


def build_routers(num_experts: int, hidden: int, k: int, device: str,
                  dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dirmoe.baselines import DeviceAgnosticTopKRouter
    from megatron_dirmoe.config import DirMoEConfig
    from megatron_dirmoe.router import DirichletRouter

    common = dict(
        num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=num_experts,
        use_cpu_initialization=True, moe_router_dtype="fp32", add_bias_linear=False,
    )
    topk_config = TransformerConfig(
        moe_router_topk=k, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        **common,
    )
    dir_config = TransformerConfig(
        moe_router_topk=min(num_experts, 4 * k), moe_router_load_balancing_type="none", **common
    )
    topk = DeviceAgnosticTopKRouter(topk_config)
    dirmoe = DirichletRouter(dir_config, dirmoe_config=DirMoEConfig(target_k=k, schedule_iters=1000))
    for router in (topk, dirmoe):
        router.set_layer_number(1)
        # Weights in the hidden states' dtype, as Megatron's Float16Module holds them in a bf16
        # run (both routers still compute their logits in fp32: --moe-router-dtype fp32).
        router.to(device=device, dtype=dtype)
    dirmoe.set_iteration(500)
    return {"TopKRouter (softmax, aux loss)": topk, "DirichletRouter": dirmoe}


def time_fwd_bwd(router, hidden: torch.Tensor, grad: torch.Tensor, warmup: int, iters: int) -> float:
    """Median milliseconds of one forward+backward."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    cuda = hidden.is_cuda
    times = []
    for i in range(warmup + iters):
        hidden.grad = None
        router.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        probs, _ = router(hidden)
        (probs * grad).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        get_moe_metrics_tracker().clear()
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")
    ]
    from megatron_dirmoe.single_rank import init_single_rank

    init_single_rank("nccl" if device == "cuda" else "gloo")
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=device))
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name} | torch {torch.__version__} | T={args.tokens} hidden={args.hidden} "
          f"k={args.topk} dtype={dtype} | median of {args.iters} after {args.warmup} warm-up")
    print(f"{'E':>4} {'router':<32} {'fwd+bwd ms':>11} {'ratio':>7}")
    for num_experts in args.experts:
        torch.manual_seed(0)
        hidden = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype,
                             requires_grad=True)
        routers = build_routers(num_experts, args.hidden, args.topk, device, dtype)
        grad = torch.randn(args.tokens, num_experts, device=device)
        results = {label: time_fwd_bwd(r, hidden, grad, args.warmup, args.iters)
                   for label, r in routers.items()}
        base = results["TopKRouter (softmax, aux loss)"]
        for label, ms in results.items():
            print(f"{num_experts:>4} {label:<32} {ms:>11.3f} {ms / base:>6.2f}x")


if __name__ == "__main__":
    main()
