#!/usr/bin/env python
"""Swap the DirMoE router into your own Megatron-Core GPT and train it in your own loop.

The story: you already build a Megatron-Core `GPTModel` from one of Megatron's layer specs and
train it with your own loop. Two lines make its MoE layers route with `DirichletRouter`, and two
calls per step drive the router's schedules and its count and load controllers:

    spec = swap_router(get_gpt_layer_local_spec(num_experts=8),     # your spec (TE spec on GPUs)
                       dirichlet_router_builder(DirMoEConfig(target_k=1, schedule_iters=steps)))
    ...
    set_router_iteration(model, step)          # every step: tau_z and lambda_p follow `step`
    ...
    optimizer.step()
    update_count_control(model)                # after every optimizer step: k per token, balanced load

The router's regularisers (Dirichlet KL, count penalty, aggregate spike prior) ride on the
activations through Megatron's `MoEAuxLossAutoScaler`: ``loss.backward()`` already includes them,
there is nothing to add to the loss. Their values and the routing statistics land in Megatron's
MoE metrics tracker as ``dirmoe/<name>`` per layer; this script prints them every few steps.

Runs on one CPU process (or one GPU) on a toy task whose loss must fall (sequences
x_{t+1} = (5 x_t + 3) mod V). On CPU, Megatron's local `DotProductAttention` allocates on CUDA,
so the script swaps in the package's drop-in `SDPAttention` (PyTorch's
scaled_dot_product_attention);
the one-rank torch.distributed world and Megatron's parallel state come from
`megatron_dirmoe.single_rank.init_single_rank`.

    python examples/swap_router_custom_loop.py                 # 2 layers, 8 experts, 200 steps
    python examples/swap_router_custom_loop.py --steps 30 --target-k 2
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--target-k", type=int, default=1, help="DirMoE's target active experts k")
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p


def toy_batch(gen: torch.Generator, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """[batch, seq + 1] token ids following x_{t+1} = (5 x_t + 3) mod vocab (learnable)."""
    tokens = [torch.randint(0, vocab, (batch, 1), generator=gen)]
    for _ in range(seq):
        tokens.append((tokens[-1] * 5 + 3) % vocab)
    return torch.cat(tokens, dim=1)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_dirmoe.training import startup_noise

    startup_noise.install()  # optional: Megatron's "TE/apex not installed" warnings -> one line

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_logging import set_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dirmoe import (
        DirMoEConfig,
        dirichlet_router_builder,
        set_router_iteration,
        swap_router,
        update_count_control,
    )
    from megatron_dirmoe.layers import SDPAttention
    from megatron_dirmoe.metrics import DirMoEMetricsTracker
    from megatron_dirmoe.single_rank import init_single_rank

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_single_rank("nccl" if device.type == "cuda" else "gloo")  # Megatron's parallel state
    torch.manual_seed(args.seed)

    # 1. The router's hyperparameters (validated; the schedules run over `steps` iterations).
    dirmoe = DirMoEConfig(target_k=args.target_k, schedule_iters=args.steps)

    # 2. Your own spec, with DirichletRouter swapped in for TopKRouter: the one-line swap.
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts)
    if device.type == "cpu":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec = swap_router(spec, dirichlet_router_builder(dirmoe))

    # 3. Megatron's config: the router picks 1..max_active experts per token, so topk is that cap
    #    (the dispatcher's upper bound); the allgather dispatcher handles a variable count.
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=4,
        ffn_hidden_size=2 * args.hidden_size,
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=2 * args.hidden_size,
        moe_router_topk=dirmoe.max_active_for(args.num_experts),
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",  # DirMoE balances with its own spike prior
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
                     max_sequence_length=args.seq_length,
                     position_embedding_type="learned_absolute").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)

    # 4. Where the router's values go: Megatron's global MoE metrics tracker, here the package's
    #    subclass that also keeps the last per-layer values. One micro-batch per step: the
    #    aux-loss gradient scale is 1.
    tracker = DirMoEMetricsTracker()
    set_moe_metrics_tracker(tracker)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=device))

    gen = torch.Generator().manual_seed(args.seed)
    position_ids = torch.arange(args.seq_length, device=device)[None].expand(args.batch_size, -1)
    losses, history = [], []
    for step in range(args.steps):
        set_router_iteration(model, step)  # tau_z, lambda_p at this step
        tokens = toy_batch(gen, args.batch_size, args.seq_length, args.vocab_size).to(device)
        # GPTModel returns the per-token LM loss when given labels.
        loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # LM loss + the routers' attached regularisers
        optimizer.step()
        update_count_control(model)  # the routed count of this step moves each layer's c
        losses.append(loss.item())
        # Mean over MoE layers of every dirmoe/* value (and the per-layer values), then clear.
        line = tracker.report(loss_scale=1.0, iteration=step + 1, num_layers=config.num_layers)
        per_layer = {name: values.tolist() for name, values in tracker.last_per_layer.items()}
        history.append(per_layer)
        if (step + 1) % args.log_interval == 0 or step + 1 == args.steps:
            active = ", ".join(f"{v:.2f}" for v in per_layer["dirmoe/active_experts"])
            print(f"step {step + 1:4d} | loss {loss.item():.4f} | active experts per layer "
                  f"[{active}] |{line}", flush=True)

    first = sum(losses[:5]) / min(5, len(losses))
    last = sum(losses[-5:]) / min(5, len(losses))
    print(f"loss {first:.3f} -> {last:.3f} over {args.steps} steps "
          f"(target k = {args.target_k}, {args.num_experts} experts)")
    return {"losses": losses, "metrics": history, "model": model}


if __name__ == "__main__":
    main()
