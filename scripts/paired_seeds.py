"""Pair two sets of `compare_routers.py` runs seed by seed, e.g. a probe against the default.

`compare_routers.py` pairs DirMoE with TopK inside one comparison. A probe (the same router with
other flags after `--`) lands in its own `--work` directory under the same router name; this
pairs it with the reference runs of the same seeds and prints the mean difference ± standard
error of held-out loss and OOD effective experts, the per-seed values, each side's effective
experts per MoE layer (mean over seeds, held-out and OOD) and, for DirMoE, its count, its
least-loaded expert and its fallback share at the end:

    python scripts/paired_seeds.py runs/compare/probe:dirmoe-k4 runs/compare/default:dirmoe-k4

`--windows N` adds where in training a gap opens: the paired difference of the training loss
over N equal windows of steps, and each side's effective experts over training (mean over
seeds, layers and the window's steps). Both sides may be any router, DirMoE or TopK.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

_SCRIPT = Path(__file__).resolve().parent / "compare_routers.py"


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_routers", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_runs(spec: str) -> dict[int, dict]:
    """Records of `WORK:ROUTER` keyed by seed (`WORK/records/ROUTER_seed*.json`)."""
    work, sep, router = spec.rpartition(":")
    if not sep or not work or not router:
        raise SystemExit(f"paired_seeds: {spec!r} is not WORK:ROUTER "
                         "(e.g. runs/compare/cpu-fine:dirmoe-k4)")
    paths = sorted((Path(work) / "records").glob(f"{router}_seed*.json"))
    if not paths:
        raise SystemExit(f"paired_seeds: no records {Path(work) / 'records' / router}_seed*.json")
    records = [json.loads(path.read_text()) for path in paths]
    return {record["seed"]: record for record in records}


def layer_means(runs: dict[int, dict], part: str) -> list[float]:
    """Effective experts per MoE layer, mean over seeds ('layers' held-out, 'ood')."""
    per_seed = [(r["layers"] if part == "layers" else r["ood"]["layers"]) for r in runs.values()]
    return [sum(layers[i]["effective_experts"] for layers in per_seed) / len(per_seed)
            for i in range(len(per_seed[0]))]


def _layer_mean_curve(record: dict, metric: str) -> list[float]:
    """A DirMoE metric (`dirmoe/<metric>`) per training step, mean over MoE layers; [] for a
    router that does not log it (TopK routes exactly k and has no fallback)."""
    history = record.get("history") or []
    key = f"dirmoe/{metric}"
    if not history or not all(row.get(key) for row in history):
        return []
    return [statistics.fmean(row[key]) for row in history]


def _fallback_curve(record: dict) -> list[float]:
    """Share of tokens on DirMoE's top-k fallback per training step, mean over MoE layers."""
    return _layer_mean_curve(record, "fallback_frac")


def routing_end(runs: dict[int, dict], compare) -> str:
    """Count in training (last 10% of steps) and held out, the least-loaded expert / uniform
    (mean over seeds, and the lowest seed), the fallback share at the end, and the count's
    standard deviation over the last 100 training steps (mean over seeds): DirMoE only."""
    records = list(runs.values())
    if not all(r.get("dirmoe") for r in records):
        return ""
    mean = statistics.fmean
    lowest = [compare._min_expert_load(r) for r in records]
    curves = [_layer_mean_curve(r, "active_experts") for r in records]
    return (f"count train {mean(r['train_active_end'] for r in records):.3f} (held out "
            f"{mean(mean(l['active_experts'] for l in r['layers']) for r in records):.3f}, "
            f"standard deviation over the last 100 steps "
            + (f"{mean(statistics.pstdev(c[-100:]) for c in curves):.3f}" if all(curves)
               else "n/a")
            + f"), least-loaded expert {mean(lowest):.2f} (lowest seed {min(lowest):.2f}), "
            f"fallback at the end {mean(r['fallback_end'] for r in records):.3f}")


def window_gaps(runs: dict[int, dict], reference: dict[int, dict], seeds: list[int],
                windows: int, compare) -> list[dict]:
    """Per window of training steps: the paired training-loss difference (mean, standard error
    over `seeds`), each side's mean effective experts and, for DirMoE, its share of tokens on
    the top-k fallback (None where a side's history has none); `compare` is the loaded
    `compare_routers` module."""
    steps = min(len(side[s].get("history") or []) for side in (runs, reference) for s in seeds)
    if not steps:
        raise SystemExit("paired_seeds: --windows needs the runs' training history; these "
                         "records hold none")
    if windows < 1 or windows > steps:
        raise SystemExit(f"paired_seeds: --windows must be in 1..{steps} (the steps both sides "
                         "trained)")
    rows = []
    for w in range(windows):
        lo, hi = w * steps // windows, (w + 1) * steps // windows

        def loss(record: dict) -> float:
            return sum(h["loss"] for h in record["history"][lo:hi]) / (hi - lo)

        def window_mean(side: dict[int, dict], curve) -> Optional[float]:
            curves = [curve(side[s]) for s in seeds]
            if not all(curves):
                return None
            return sum(sum(c[lo:hi]) / (hi - lo) for c in curves) / len(curves)

        mean, se = compare.mean_se([loss(runs[s]) - loss(reference[s]) for s in seeds])
        effective, fallback = compare.training_effective_experts, _fallback_curve
        rows.append({"steps": (lo + 1, hi), "loss_gap": mean, "se": se,
                     "effective": window_mean(runs, effective),
                     "reference_effective": window_mean(reference, effective),
                     "fallback": window_mean(runs, fallback),
                     "reference_fallback": window_mean(reference, fallback)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="WORK:ROUTER of the runs to measure")
    parser.add_argument("reference", help="WORK:ROUTER of the runs to subtract")
    parser.add_argument("--windows", type=int, default=0,
                        help="also the training-loss gap and effective experts over N windows "
                             "of steps")
    opts = parser.parse_args(argv)
    compare = _compare_module()
    runs, reference = load_runs(opts.runs), load_runs(opts.reference)
    stats = compare.paired_stats(runs, reference)
    if not stats["seeds"]:
        raise SystemExit("paired_seeds: the two sets share no seed")
    print(f"{opts.runs} minus {opts.reference}, seeds {stats['seeds']}")
    for key, title, fmt, better in compare._PAIRED_METRICS:
        stat = stats[key]
        if not stat["per_seed"]:
            continue
        print(f"  {title} ({better} is better): {fmt.format(stat['mean'])} ± "
              f"{fmt.format(stat['se']).lstrip('+')}  per seed "
              + " / ".join(fmt.format(d) for d in stat["per_seed"]))
    for spec, side in ((opts.runs, runs), (opts.reference, reference)):
        seeds = [side[s] for s in stats["seeds"]]
        common = {s: side[s] for s in stats["seeds"]}
        loss = sum(r["heldout_loss"] for r in seeds) / len(seeds)
        print(f"  {spec}: held-out loss {loss:.3f}; effective experts per layer "
              + " / ".join(f"{v:.2f}" for v in layer_means(common, "layers"))
              + (", OOD " + " / ".join(f"{v:.2f}" for v in layer_means(common, "ood"))
                 if all(r.get("ood") for r in seeds) else ""))
        end = routing_end(common, compare)
        if end:
            print(f"    {end}")
    if opts.windows:
        print("  training loss gap by window of steps (mean ± standard error), effective "
              "experts of each side")
        rows = window_gaps(runs, reference, stats["seeds"], opts.windows, compare)
        for row in rows:
            effs = " / ".join("n/a" if v is None else f"{v:.1f}"
                              for v in (row["effective"], row["reference_effective"]))
            fallbacks = " / ".join("n/a" if v is None else f"{v:.2f}"
                                   for v in (row["fallback"], row["reference_fallback"]))
            print(f"    steps {row['steps'][0]}-{row['steps'][1]}: {row['loss_gap']:+.4f} ± "
                  f"{row['se']:.4f}; effective experts {effs}; fallback {fallbacks}")
        stats["windows"] = rows
    return stats


if __name__ == "__main__":
    main()
