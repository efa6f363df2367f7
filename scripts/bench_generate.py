#!/usr/bin/env python
"""Greedy `generate()` throughput of an exported DirMoE model: the packed experts layout (each
`experts_implementation` transformers offers) against the layout exports had before it (one
module per expert and a Python loop over the experts a batch routes to, with a host sync).

    python scripts/bench_generate.py --model runs/dirmoe_tiny_hf
    python scripts/bench_generate.py --model runs/dirmoe_tiny_hf --batch 8 --json gen.json

Every variant runs the same weights, routing and attention (`--attn`); only the routed experts'
computation differs. Prints tokens/s (new tokens x batch / wall time; median of `--repeats`
runs after one warm-up, the layouts taking turns) per variant and checks that all variants
generate the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

NEW_LAYOUTS = ("grouped_mm", "batched_mm", "eager")


class PerExpertLoopBlock(nn.Module):
    """The MoE step of exports before packed experts: `experts` is a ModuleList of per-expert
    MLPs, run on the tokens each expert received (`nonzero`, `unique().tolist()`, `index_add_`
    in fp32). Built from a packed `DirMoESparseBlock` (same router, same weights)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.router = block.router
        packed = block.experts
        gated = hasattr(packed, "gate_up_proj")
        self.act_fn = packed.act_fn
        self.experts = nn.ModuleList()
        for e in range(packed.num_experts):
            mlp = nn.Module()
            if gated:
                gate, up = packed.gate_up_proj[e].detach().chunk(2, dim=0)
                mlp.gate_proj = _linear(gate)
            else:
                up = packed.up_proj[e].detach()
            mlp.up_proj = _linear(up)
            mlp.down_proj = _linear(packed.down_proj[e].detach())
            self.experts.append(mlp)
        for name in ("shared_expert", "shared_expert_gate"):
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.experts[e]
        if hasattr(mlp, "gate_proj"):
            return mlp.down_proj(self.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return mlp.down_proj(self.act_fn(mlp.up_proj(x)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        probs, routing_map = self.router(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        token_idx, expert_idx = routing_map.nonzero(as_tuple=True)
        for expert in expert_idx.unique().tolist():
            tokens = token_idx[expert_idx == expert]
            out.index_add_(0, tokens, self._expert(expert, x[tokens]).float()
                           * probs[tokens, expert, None])
        out = out.to(x.dtype)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate"):
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            out = out + shared
        return out.view_as(hidden_states)


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=False)
    return layer


def load(model_dir: str, attn: str, layout: str):
    """The exported model in eval mode with `layout`: one of NEW_LAYOUTS or "per_expert_loop"."""
    from transformers import AutoModelForCausalLM

    try:  # folders saved from the package's classes (no model code inside) load through it
        import megatron_dirmoe.hf  # noqa: F401
    except ImportError:
        pass
    packed = "grouped_mm" if layout == "per_expert_loop" else layout
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=torch.float32, attn_implementation=attn,
        experts_implementation=packed).eval()
    if layout == "per_expert_loop":
        for layer in model.model.layers:
            if type(layer.mlp).__name__ == "DirMoESparseBlock":
                layer.mlp = PerExpertLoopBlock(layer.mlp)
    return model


def _prompt(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(seconds, generated ids) of greedy generation of exactly `new_tokens` tokens."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, attention_mask=torch.ones_like(prompt),
                             pad_token_id=0)
    return time.perf_counter() - t0, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported Hugging Face folder")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (default sdpa)")
    parser.add_argument("--layouts", nargs="+", default=["per_expert_loop", *NEW_LAYOUTS],
                        choices=["per_expert_loop", *NEW_LAYOUTS])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {layout: load(args.model, args.attn, layout) for layout in args.layouts}
    prompt = _prompt(models[args.layouts[0]].config.vocab_size, args.batch, args.prompt_len,
                     args.seed)
    outputs = {layout: generate(m, prompt, args.new_tokens)[1] for layout, m in models.items()}
    # Round robin over the layouts, so a change in machine load hits all of them alike.
    times: dict[str, list[float]] = {layout: [] for layout in args.layouts}
    for _ in range(args.repeats):
        for layout, model in models.items():
            times[layout].append(generate(model, prompt, args.new_tokens)[0])
    results = {layout: args.batch * args.new_tokens / statistics.median(t)
               for layout, t in times.items()}
    base = args.layouts[0]
    same = all(torch.equal(outputs[base], o) for o in outputs.values())
    device = f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"greedy generate, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, attn {args.attn} ({device})")
    print(f"{'layout':<18}{'tokens/s':>10}{'vs ' + base:>24}")
    for layout, tps in results.items():
        print(f"{layout:<18}{tps:>10.1f}{tps / results[base]:>23.2f}x")
    print(f"same tokens in every layout: {'yes' if same else 'NO'}")
    summary = dict(vars(args), device=device, tokens_per_s=results, same_tokens=same)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if not same:
        raise SystemExit("the layouts generated different tokens")
    return summary


if __name__ == "__main__":
    main()
