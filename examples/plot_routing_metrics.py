#!/usr/bin/env python
"""Plot the DirMoE routing metrics of a run from its TensorBoard logs.

`dirmoe-pretrain --tensorboard-dir DIR` (CPU loop and megatron.training alike) writes every
routing metric, the mean over MoE layers, as ``dirmoe/<name>`` (active_experts, expected_k,
effective_experts, fallback_frac, kl, tau, ...), and with ``--moe-per-layer-logging`` each layer's
value as ``moe/dirmoe/<name>_layer_<i>`` (i from 0). This script reads them back with
TensorBoard's `EventAccumulator` (all event files of the folder, e.g. a run and its resumes) and
draws one panel per metric, the layers as thin lines under the mean, into one PNG:

    dirmoe-pretrain --preset tiny --tensorboard-dir runs/dirmoe_tiny/tb --moe-per-layer-logging
    python examples/plot_routing_metrics.py runs/dirmoe_tiny/tb --out routing.png
    python examples/plot_routing_metrics.py runs/dirmoe_tiny/tb --metrics active_experts kl tau

Needs tensorboard (a dependency of megatron_dirmoe) and matplotlib (`pip install matplotlib`, in
the package's ``dev`` and ``compare`` extras).
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

# What a reader looks at first: the count against k, the spread of the load, the regularisers and
# the schedules. `--metrics all` plots every dirmoe/* tag found.
DEFAULT_METRICS = ("active_experts", "eval_active_experts", "expected_k", "effective_experts",
                   "fallback_frac", "max_load", "kl", "sparsity_penalty", "balance_penalty", "tau")
_PER_LAYER = re.compile(r"^moe/dirmoe/(?P<name>.+)_layer_(?P<layer>\d+)$")


def read_routing_scalars(logdir: str | Path) -> tuple[dict, dict]:
    """``({name: [(step, value), ...]}, {name: {layer: [(step, value), ...]}})`` for every
    ``dirmoe/<name>`` and ``moe/dirmoe/<name>_layer_<i>`` scalar in the event files of `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    means, layers = {}, defaultdict(dict)
    for tag in acc.Tags()["scalars"]:
        points = [(e.step, e.value) for e in acc.Scalars(tag)]
        if tag.startswith("dirmoe/"):
            means[tag.removeprefix("dirmoe/")] = points
        elif match := _PER_LAYER.match(tag):
            layers[match["name"]][int(match["layer"])] = points
    return means, dict(layers)


def plot(means: dict, layers: dict, metrics: Sequence[str], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, metrics):
        for layer, points in sorted(layers.get(name, {}).items()):
            ax.plot(*zip(*points), lw=0.8, alpha=0.6, label=f"layer {layer + 1}")
        ax.plot(*zip(*means[name]), color="black", lw=1.6, label="mean")
        ax.set_title(f"dirmoe/{name}", fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logdir", type=Path, help="the run's --tensorboard-dir")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG to write (default: <logdir>/routing_metrics.png)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                   help="names after dirmoe/ to plot, or 'all'")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)

    means, layers = read_routing_scalars(args.logdir)
    if not means:
        raise SystemExit(f"no dirmoe/* scalars under {args.logdir}: was the run started with "
                         "--tensorboard-dir (and tensorboard installed)?")
    metrics = sorted(means) if args.metrics == ["all"] else [m for m in args.metrics if m in means]
    missing = [] if args.metrics == ["all"] else sorted(set(args.metrics) - set(means))
    if missing:
        print(f"not in the logs (skipped): {', '.join(missing)}")
    if not metrics:
        raise SystemExit(f"none of the metrics asked for are in the logs; found: {sorted(means)}")
    out = args.out or args.logdir / "routing_metrics.png"
    steps = sorted({s for points in means.values() for s, _ in points})
    num_layers = len(next(iter(layers.values()), {}))
    plot(means, layers, metrics, out,
         f"{args.logdir}: iterations {steps[0]}-{steps[-1]}, {num_layers} layers logged")
    print(f"found {len(means)} dirmoe/* tags ({len(layers)} with per-layer values); "
          f"plotted {len(metrics)}: {out}")
    return {"out": out, "tags": sorted(f"dirmoe/{m}" for m in means), "plotted": metrics,
            "per_layer": {name: sorted(v) for name, v in layers.items()}}


if __name__ == "__main__":
    main()
