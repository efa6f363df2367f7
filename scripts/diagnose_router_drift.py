#!/usr/bin/env python
"""Why does DirMoE routing collapse? Per-layer statistics of the spike gates' inputs.

Trains (or, when ``--load`` holds a finished run, just loads) a model with the pretraining
entry's flags, runs held-out tokens (the embedded corpus' test split) through it in eval mode
and prints, for every `DirichletRouter`:

- the norm of the mean router input over tokens against the mean per-token norm (a ratio near
  1 means one direction is shared by all tokens);
- the per-expert mean of the centred spike logits over tokens (a token-independent offset that
  acts like a bias) against their spread across tokens (std);
- the learned spike bias.

    python scripts/diagnose_router_drift.py --preset tiny --dirmoe-target-k 2 --train-iters 150 \\
        --save runs/drift_k2 --load runs/drift_k2
"""

from __future__ import annotations

import sys

HELDOUT_SEQUENCES = 64


def main(argv: list[str]) -> None:
    import torch
    from megatron.training.global_vars import get_tokenizer, set_global_variables

    from megatron_dirmoe.datasets import build_gpt_datasets, num_samples_per_split
    from megatron_dirmoe.router import iter_dirichlet_routers
    from megatron_dirmoe.training.arguments import parse_pretrain_args
    from megatron_dirmoe.training.cpu_loop import batch_from_dataset, train_on_cpu

    args = parse_pretrain_args(argv + ["--dirmoe-device", "cpu"])
    if args.dirmoe_router != "dirichlet":
        raise SystemExit("diagnose_router_drift.py: needs --dirmoe-router dirichlet")
    set_global_variables(args)
    model = train_on_cpu(args).model

    sizes = num_samples_per_split(args)
    sizes[2] = max(sizes[2], HELDOUT_SEQUENCES)
    _, _, test_ds = build_gpt_datasets(args, get_tokenizer(), sizes, create_attention_mask=False)
    inputs: dict[int, list[torch.Tensor]] = {}
    routers = list(iter_dirichlet_routers(model))
    hooks = [r.register_forward_hook(
        lambda mod, inp, _out: inputs.setdefault(mod.layer_number, []).append(inp[0].detach()))
        for r in routers]
    model.eval()
    with torch.no_grad():
        for start in range(0, HELDOUT_SEQUENCES, args.micro_batch_size):
            batch = batch_from_dataset(test_ds, start, args.micro_batch_size)
            model(batch["tokens"], batch["position_ids"], None)
    for handle in hooks:
        handle.remove()

    print(f"router inputs on {HELDOUT_SEQUENCES} held-out sequences (test split)")
    print(f"{'layer':>5} {'|mean h|':>9} {'mean |h|':>9} {'logit mean min..max':>21} "
          f"{'logit std min..max':>19} {'spike bias':>14}")
    for router in routers:
        chunks = inputs[router.layer_number]
        h_TD = torch.cat([x.reshape(-1, x.shape[-1]) for x in chunks]).float()
        u_TE = h_TD @ router.weight[: router.num_experts].float().T
        c_TE = u_TE - u_TE.mean(dim=-1, keepdim=True)
        mean_E, std_E = c_TE.mean(0), c_TE.std(0)
        bias = router.spike_bias.detach().float()
        print(f"{router.layer_number:>5} {h_TD.mean(0).norm():>9.2f} "
              f"{h_TD.norm(dim=-1).mean():>9.2f} {mean_E.min():>10.2f}..{mean_E.max():<9.2f} "
              f"{std_E.min():>9.2f}..{std_E.max():<8.2f} {bias.mean():>7.2f} +-{bias.std():.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
