#!/usr/bin/env python
"""Full MoE layer forward+backward: DirMoE vs Megatron's TopKRouter, side by side in one run.

One MoE layer = router + dispatch (permute) + experts + combine, as Megatron's `MoELayer` runs it
in training. DirMoE is `DirMoELayer` + `DirichletRouter` + the variable-k dispatcher; the baseline
is Megatron's stock `MoELayer` + `TopKRouter` (softmax top-k, aux load-balancing loss) + the stock
dispatcher of the same type. Same tokens, hidden size, experts, FFN size, dtype and expert
implementation (TE grouped GEMM when Transformer Engine imports, else Megatron's local
SequentialMLP).

Matched sparsity: DirMoE's realised mean number of active experts per token is measured first
(training mode, same tokens); TopK then runs with k = floor and ceil of it, and the ratio column
compares DirMoE with TopK at k = round(mean).

    python scripts/bench_moe_layer.py                                  # CPU, small sizes
    python scripts/bench_moe_layer.py --device cuda --tokens 32768 --hidden 1024 \\
        --experts 8 --ffn-hidden 2816 --target-k 2                     # H100, bf16, TE if present
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step T (default "
                   "32768 on CUDA, 2048 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="default 1024 CUDA, 256 CPU")
    p.add_argument("--ffn-hidden", type=int, default=None, help="expert FFN size (default 2816 "
                   "CUDA, 512 CPU)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--target-k", type=int, default=2, help="DirMoE's target k")
    p.add_argument("--iteration", type=int, default=0,
                   help="schedule iteration of the DirMoE router (tau, lambda_p)")
    p.add_argument("--dispatcher", choices=["alltoall", "allgather"], default=None,
                   help="token dispatcher for both layers (default alltoall on CUDA; allgather "
                   "on CPU, where Megatron's all-to-all dispatcher needs CUDA streams)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-te", action="store_true", help="local spec even if TE imports")
    p.add_argument("--warmup", type=int, default=None, help="default 10 CUDA, 2 CPU")
    p.add_argument("--iters", type=int, default=None, help="default 30 CUDA, 9 CPU")
    args = p.parse_args()
    gpu = args.device == "cuda"
    defaults = dict(tokens=(32768, 2048), hidden=(1024, 256), ffn_hidden=(2816, 512),
                    dispatcher=("alltoall", "allgather"), dtype=("bf16", "fp32"),
                    warmup=(10, 2), iters=(30, 9))
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    return args


def init_single_rank(device: str) -> None:
    from megatron_dirmoe.single_rank import init_single_rank as init_world

    init_world("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        # GPU initialisation draws from Megatron's model-parallel CUDA RNG tracker.
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)


def transformer_config(args, dtype, topk: int, dirmoe: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=args.hidden,
        num_attention_heads=8,
        num_moe_experts=args.experts,
        moe_ffn_hidden_size=args.ffn_hidden,
        ffn_hidden_size=args.ffn_hidden,
        moe_router_topk=topk,
        moe_token_dispatcher_type=args.dispatcher,
        moe_router_load_balancing_type="none" if dirmoe else "aux_loss",
        # Megatron requires softmax before top-k when k = 1.
        moe_router_pre_softmax=not dirmoe and topk == 1,
        moe_aux_loss_coeff=0.0 if dirmoe else 1e-2,
        moe_router_dtype="fp32",
        moe_grouped_gemm=args.te,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        use_cpu_initialization=args.device != "cuda",
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )


def moe_layer_spec(args, dirmoe_config=None):
    """The MoE (mlp) submodule spec of a GPT layer: DirMoE's or Megatron's stock TopK one."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_dirmoe.baselines import DeviceAgnosticTopKRouter
    from megatron_dirmoe.specs import get_dirmoe_layer_spec, swap_router

    if dirmoe_config is not None:
        spec = get_dirmoe_layer_spec(dirmoe_config, num_experts=args.experts, use_te=args.te,
                                     moe_grouped_gemm=args.te, normalization="RMSNorm")
    else:
        if args.te:
            spec = get_gpt_layer_with_transformer_engine_spec(num_experts=args.experts,
                                                              moe_grouped_gemm=True)
        else:
            spec = get_gpt_layer_local_spec(num_experts=args.experts, normalization="RMSNorm")
        # Megatron's TopKRouter with gating that runs where its weights are (CPU or CUDA).
        spec = swap_router(spec, DeviceAgnosticTopKRouter)
    return spec.submodules.mlp


def build_layer(args, dtype, topk: int, dirmoe_config=None):
    config = transformer_config(args, dtype, topk, dirmoe=dirmoe_config is not None)
    torch.manual_seed(0)
    layer = moe_layer_spec(args, dirmoe_config)(config=config, layer_number=1)
    layer.to(args.device).train()
    if dirmoe_config is not None:
        layer.router.set_iteration(args.iteration)
    return layer


def fwd_bwd_ms(layer, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Milliseconds of one forward+backward of the whole MoE layer."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    x.grad = None
    layer.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out, _ = layer(x)
    out.backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    get_moe_metrics_tracker().clear()
    return elapsed


def time_interleaved(layers: dict, x, grad, warmup: int, iters: int) -> dict:
    """Median ms per layer, the layers taking turns each iteration so that drifting machine
    load (a shared CPU, GPU clocks) hits all of them alike."""
    times = {label: [] for label in layers}
    for i in range(warmup + iters):
        for label, layer in layers.items():
            ms = fwd_bwd_ms(layer, x, grad)
            if i >= warmup:
                times[label].append(ms)
    return {label: statistics.median(t) for label, t in times.items()}


@torch.no_grad()
def mean_active_experts(layer, x: torch.Tensor, repeats: int = 3) -> float:
    """DirMoE's realised mean number of experts per token (training-mode routing)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    counts = []
    for _ in range(repeats):
        _, routing_map = layer.route(x)
        counts.append(routing_map.sum(dim=1).float().mean().item())
    get_moe_metrics_tracker().clear()
    return sum(counts) / len(counts)


def main() -> None:
    args = parse_args()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dirmoe.config import DirMoEConfig
    from megatron_dirmoe.layout import megatron_topk_for
    from megatron_dirmoe.specs import te_available

    args.te = te_available() and args.device == "cuda" and not args.no_te
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    init_single_rank(args.device)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=args.device))

    dirmoe_config = DirMoEConfig(target_k=args.target_k, schedule_iters=max(args.iteration, 1000))
    dirmoe = build_layer(args, dtype, megatron_topk_for(dirmoe_config, args.experts),
                         dirmoe_config)
    torch.manual_seed(1)
    x = torch.randn(args.tokens, 1, args.hidden, device=args.device, dtype=dtype,
                    requires_grad=True)
    grad = torch.randn_like(x)
    k_mean = mean_active_experts(dirmoe, x)
    topks = sorted({max(1, math.floor(k_mean)), min(args.experts, max(1, math.ceil(k_mean)))})

    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU ({os.cpu_count()} cores)")
    experts_impl = "TE grouped GEMM" if args.te else "local SequentialMLP"
    print(f"device: {name} | torch {torch.__version__} | T={args.tokens} hidden={args.hidden} "
          f"E={args.experts} ffn={args.ffn_hidden} {args.dtype} | experts: {experts_impl} | "
          f"dispatcher: {args.dispatcher} | median of {args.iters} interleaved after "
          f"{args.warmup} warm-up")
    print(f"DirMoE target k={args.target_k}, iteration {args.iteration}: realised mean active "
          f"experts {k_mean:.3f} -> TopK k in {topks}")

    layers = {f"DirMoE (mean k={k_mean:.2f})": dirmoe}
    for k in topks:
        layers[f"TopK k={k}"] = build_layer(args, dtype, k)
    results = time_interleaved(layers, x, grad, args.warmup, args.iters)
    base_k = min(topks, key=lambda k: (abs(k - k_mean), k))
    base = results[f"TopK k={base_k}"]
    print(f"{'MoE layer':<24} {'fwd+bwd ms':>11} {'vs TopK k=' + str(base_k):>13}")
    for label, ms in results.items():
        print(f"{label:<24} {ms:>11.2f} {ms / base:>12.2f}x")


if __name__ == "__main__":
    main()
