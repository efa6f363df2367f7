#!/usr/bin/env python
"""Router comparison: the same GPT, data order, seeds, steps and tokens, once per router.

Every run goes through the pretraining entry point's own argument parser and training loop
(`megatron_dirmoe.training`), with the router chosen by flags (``--dirmoe-router``, Megatron's
``--moe-router-*``), so the models differ only in the router module of their MoE layers. After
training, each run is analysed on held-out tokens (the embedded corpus' *test* split, which no
run and no setting here ever looked at) with `megatron_dirmoe.routing_analysis`.

    python scripts/compare_routers.py --preset cpu-small     # 2 CPU cores, < 20 min
    python scripts/compare_routers.py --preset gpu-small     # one GPU (not run yet)

Writes ``<out>/results.md`` (the table), ``results.json`` and five PNGs (loss curves, active
experts over training, tau_z / lambda_p, per-layer expert load, every router's effective experts
over training); ``<out>`` defaults to
``docs/router_comparison/<preset>``. Each run's record and log are kept in
``runs/compare/<preset>/records/`` (``--work``) and reused when the script is rerun, so an
interrupted comparison resumes with the runs it has not finished (delete a record to retrain
it); ``--render-only`` redraws the table and pictures from the records.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RouterSpec:
    label: str
    target_k: int
    flags: tuple[str, ...]
    dirmoe: bool = False


# Balancing strength shared by every router that uses the mechanism, so no router gets a
# coefficient the others do not: Megatron's usual aux-loss coefficient, and an expert-bias
# update rate that moves a bias by O(1) within a few hundred steps (Megatron's default 1e-3 is
# for runs 100x longer).
AUX_LOSS = ("--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2")


def _bias(rate: str) -> tuple[str, ...]:
    return ("--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", rate)


def routers(bias_rate: str) -> dict[str, RouterSpec]:
    """Every router the comparison knows, by name (k = 1..8 where the name carries a k)."""
    topk = ("--dirmoe-router", "topk", "--moe-router-score-function")

    def dirmoe(k: int, *extra: str) -> tuple[str, ...]:
        return ("--dirmoe-router", "dirichlet", "--dirmoe-target-k", str(k)) + extra

    specs: dict[str, RouterSpec] = {}
    for k in range(1, 9):
        specs.update({
            # The default recipe: only the target k is given.
            f"dirmoe-k{k}": RouterSpec(f"DirMoE k={k} (default: calibrated)", k, dirmoe(k), True),
            f"dirmoe-k{k}-paper": RouterSpec(
                f"DirMoE k={k} (paper recipe)", k, dirmoe(k, "--dirmoe-recipe", "paper"), True),
            f"dirmoe-k{k}-paper-notes": RouterSpec(
                f"DirMoE k={k} (paper notes, literal)", k,
                dirmoe(k, "--dirmoe-recipe", "paper-notes"), True),
            f"dirmoe-k{k}-paper-aux": RouterSpec(
                f"DirMoE k={k} (paper recipe) + aux loss", k,
                dirmoe(k, "--dirmoe-recipe", "paper", *AUX_LOSS), True),
            # Megatron requires pre-softmax with top-1 (else the one probability is always 1).
            f"softmax-top{k}": RouterSpec(
                f"TopK softmax k={k} + aux loss", k,
                topk + ("softmax", "--moe-router-topk", str(k))
                + (("--moe-router-pre-softmax",) if k == 1 else ()) + AUX_LOSS),
            f"sigmoid-top{k}-bias": RouterSpec(
                f"TopK sigmoid k={k} + expert bias", k,
                topk + ("sigmoid", "--moe-router-topk", str(k), "--moe-router-load-balancing-type",
                        "none") + _bias(bias_rate)),
        })
    specs["sinkhorn-top1"] = RouterSpec(
        "Sinkhorn k=1", 1,
        ("--dirmoe-router", "topk", "--moe-router-topk", "1",
         "--moe-router-load-balancing-type", "sinkhorn"))
    return specs


@dataclass(frozen=True)
class Preset:
    description: str
    device: str
    pretrain_flags: tuple[str, ...]
    seeds: tuple[int, ...]
    jobs: int  # runs trained at the same time (each with cores / jobs threads)
    heldout_sequences: int
    bias_rate: str


PRESETS = {
    # The README's tiny model: 4 layers, hidden 128, 8 experts, seq 128, 300 steps of 1024
    # tokens, lr 2e-3 with cosine decay. Two runs at a time on one core each.
    "cpu-small": Preset(
        "tiny GPT (4 layers x 8 experts, hidden 128), 300 steps x 1,024 tokens, embedded "
        "Shakespeare corpus",
        "cpu", ("--preset", "tiny"), seeds=(1234, 1235, 1236), jobs=2, heldout_sequences=256,
        bias_rate="1e-2",
    ),
    # Fine-grained experts (DeepSeekMoE / Qwen3 style): the tiny model with 32 experts of a
    # quarter of cpu-small's expert width, so k=4 has the active expert width of cpu-small's k=1.
    "cpu-fine": Preset(
        "tiny GPT (4 layers x 32 experts of width 64, hidden 128), 300 steps x 1,024 tokens, "
        "embedded Shakespeare corpus",
        "cpu", ("--preset", "tiny", "--num-experts", "32", "--moe-ffn-hidden-size", "64"),
        seeds=(1234, 1235, 1236), jobs=2, heldout_sequences=256, bias_rate="1e-2",
    ),
    # The same plus one always-on shared expert of the routed experts' width.
    "cpu-fine-shared": Preset(
        "tiny GPT (4 layers x 32 experts of width 64 + 1 shared expert of width 64, hidden "
        "128), 300 steps x 1,024 tokens, embedded Shakespeare corpus",
        "cpu", ("--preset", "tiny", "--num-experts", "32", "--moe-ffn-hidden-size", "64",
                "--moe-shared-expert-intermediate-size", "64"),
        seeds=(1234, 1235, 1236), jobs=2, heldout_sequences=256, bias_rate="1e-2",
    ),
    # 8 layers, hidden 512, 8 experts, seq 256, 600 steps of 8,192 tokens; four runs share the
    # GPU at a time (small models leave most of an H100 idle). Sized to fit the 8 routers in one
    # 10-minute device call by estimate; not measured yet.
    "gpu-small": Preset(
        "8 layers x 8 experts, hidden 512, seq 256, 600 steps x 8,192 tokens, embedded "
        "Shakespeare corpus",
        "cuda",
        ("--preset", "tiny", "--num-layers", "8", "--hidden-size", "512",
         "--num-attention-heads", "8", "--ffn-hidden-size", "1408",
         "--moe-ffn-hidden-size", "1408", "--seq-length", "256",
         "--max-position-embeddings", "256", "--micro-batch-size", "32",
         "--global-batch-size", "32", "--train-iters", "600", "--lr", "1e-3",
         "--min-lr", "1e-4", "--eval-interval", "200", "--log-interval", "50"),
        seeds=(1234,), jobs=4, heldout_sequences=256, bias_rate="1e-2",
    ),
}


# ---------------------------------------------------------------------- one run (worker)
def run_worker(record_path: Path, device: str, heldout_sequences: int, argv: list[str],
               meta: dict, heldout_split: str = "test") -> None:
    """Train one router through the pretraining entry's parser and loop, analyse it on the
    held-out split (test, or valid while choosing settings), write the run's record."""
    from megatron.training.global_vars import (
        get_tokenizer,
        set_global_variables,
        unset_global_variables,
    )

    from megatron_dirmoe.data.ood import ood_sequences
    from megatron_dirmoe.datasets import build_gpt_datasets, num_samples_per_split
    from megatron_dirmoe.routing_analysis import record_routing, summarize_layer, token_classes
    from megatron_dirmoe.training.arguments import parse_pretrain_args
    from megatron_dirmoe.training.cpu_loop import batch_from_dataset, train_on_cpu

    # The single-process loop on `device`; "--dirmoe-device cpu" selects that loop (fp32, local
    # spec, allgather dispatcher) whatever the hardware, so every router trains identically.
    args = parse_pretrain_args(argv + ["--dirmoe-device", "cpu"])
    unset_global_variables()
    set_global_variables(args)
    t0 = time.time()
    result = train_on_cpu(args, device=device, follow_load=True)
    train_seconds = time.time() - t0

    # Settings are chosen on the validation split; the test split is for the final table only.
    split = 1 if heldout_split == "valid" else 2
    sizes = num_samples_per_split(args)
    sizes[split] = max(sizes[split], heldout_sequences)
    heldout_ds = build_gpt_datasets(args, get_tokenizer(), sizes,
                                    create_attention_mask=False)[split]
    count = min(heldout_sequences, len(heldout_ds))
    mbs = args.micro_batch_size
    batches = [batch_from_dataset(heldout_ds, start, min(mbs, count - start), device)
               for start in range(0, count, mbs)]
    layers, heldout_loss = record_routing(result.model, batches)
    classes_T = token_classes(layers[0].token_ids_T)  # the same tokens reach every layer
    summaries = [summarize_layer(layer, classes_T=classes_T) for layer in layers]

    # Out of domain: modern English prose the model never saw anything like.
    windows = ood_sequences(get_tokenizer(), args.seq_length)
    ood_batches = [_window_batch(windows[start:start + mbs], device)
                   for start in range(0, len(windows), mbs)]
    ood_layers, ood_loss = record_routing(result.model, ood_batches)
    ood_classes_T = token_classes(ood_layers[0].token_ids_T)
    ood_summaries = [summarize_layer(layer, classes_T=ood_classes_T) for layer in ood_layers]

    history = result.history
    tail = history[-max(1, len(history) // 10):]  # the last 10% of the schedule
    steps_per_s = [1.0 / row["step_seconds"] for row in history[len(history) // 10:]]
    tokens_per_step = args.global_batch_size * args.seq_length

    def tail_mean(name: str) -> Optional[float]:
        values = [sum(row[name]) / len(row[name]) for row in tail if name in row]
        return sum(values) / len(values) if values else None

    record = dict(
        meta,
        seed=args.seed,
        device=device,
        train_iters=args.train_iters,
        tokens_per_step=tokens_per_step,
        train_seconds=train_seconds,
        tokens_per_s=tokens_per_step * sorted(steps_per_s)[len(steps_per_s) // 2],
        valid_losses={str(k): v for k, v in result.valid_losses.items()},
        heldout_loss=heldout_loss,
        heldout_tokens=int(classes_T.numel()),
        heldout_split=heldout_split,
        train_active_end=tail_mean("dirmoe/active_experts"),
        train_expected_k_end=tail_mean("dirmoe/expected_k"),
        fallback_end=tail_mean("dirmoe/fallback_frac"),
        capped_end=tail_mean("dirmoe/capped_frac"),
        layers=summaries,
        ood=dict(loss=ood_loss, tokens=int(ood_classes_T.numel()), layers=ood_summaries),
        history=history,
    )
    record_path.write_text(json.dumps(record))


def _window_batch(windows: list[list[int]], device: str) -> dict:
    """Next-token batch from id windows of length s + 1 (see `ood_sequences`)."""
    import torch

    ids = torch.tensor(windows, dtype=torch.long, device=device)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens).float(),
            "position_ids": positions}


# ---------------------------------------------------------------------- orchestration
def _run_all(preset_name: str, preset: Preset, specs: dict[str, RouterSpec], work_root: Path,
             extra: list[str], jobs: int, heldout_split: str = "test",
             threads: Optional[int] = None) -> None:
    """Train every (router, seed) without a record under ``work_root/records``, `jobs` at a
    time, each in its own process (Megatron's global state is per process)."""
    runs_dir = work_root / "records"
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in preset.seeds:
        for name, spec in specs.items():
            path = runs_dir / f"{name}_seed{seed}.json"
            if path.exists():
                print(f"[compare] reuse {path.relative_to(work_root)}", flush=True)
                continue
            work = work_root / "checkpoints" / path.stem
            # A run without a record restarts from scratch (a partial checkpoint would make
            # its history and tokens/s cover only part of the run).
            shutil.rmtree(work, ignore_errors=True)
            argv = list(preset.pretrain_flags) + list(spec.flags) + [
                "--seed", str(seed), "--save", str(work / "ckpt"), "--load", str(work / "ckpt"),
                "--dirmoe-data-cache", str(work_root / "data"),
            ] + extra
            meta = {"router": name, "label": spec.label, "target_k": spec.target_k,
                    "dirmoe": spec.dirmoe, "preset": preset_name, "argv": argv}
            todo.append((path, argv, meta))
    if not todo:
        return
    (work_root / "data").mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    running: list[tuple[subprocess.Popen, Path, float]] = []
    t_start = time.time()
    while todo or running:
        while todo and len(running) < jobs:
            path, argv, meta = todo.pop(0)
            log = path.with_suffix(".log")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path),
                   "--device", preset.device, "--heldout-sequences",
                   str(preset.heldout_sequences), "--heldout-split", heldout_split,
                   "--meta", json.dumps(meta), "--"] + argv
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
            with log.open("w") as log_file:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                        env=env, cwd=REPO)
            running.append((proc, path, time.time()))
            print(f"[compare] start {path.stem} (log {log.relative_to(work_root)})", flush=True)
        time.sleep(2)
        for item in list(running):
            proc, path, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0 or not path.exists():
                for other, _, _ in running:
                    other.kill()
                tail = path.with_suffix(".log").read_text().splitlines()[-15:]
                raise SystemExit(f"[compare] {path.stem} failed (exit {proc.returncode}):\n"
                                 + "\n".join(tail))
            left = len(todo) + len(running)
            elapsed = time.time() - t_start
            print(f"[compare] done {path.stem} in {time.time() - started:.0f} s; {left} left, "
                  f"elapsed {elapsed / 60:.1f} min", flush=True)


# ---------------------------------------------------------------------- aggregation
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var) if len(values) > 1 else 0.0


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error sd / sqrt(n) of paired differences (nan below two values)."""
    mean, std = _mean_std(values)
    n = sum(1 for v in values if v is not None and not math.isnan(v))
    return mean, std / math.sqrt(n) if n > 1 else float("nan")


def _layer_mean(record: dict, key: str, part: str = "layers") -> Optional[float]:
    layers = record[part] if part == "layers" else (record.get("ood") or {}).get("layers")
    if not layers:
        return None
    values = [layer[key] for layer in layers]
    return sum(values) / len(values)


def _min_expert_load(record: dict) -> float:
    """The least-loaded expert of any layer on held-out tokens, relative to uniform (1/E)."""
    return min(min(layer["load_fraction"]) * len(layer["load_fraction"])
               for layer in record["layers"])


def _min_layer_effective(record: dict) -> float:
    return min(layer["effective_experts"] for layer in record["layers"])


def summarize(records: list[dict]) -> list[dict]:
    """One row per router: means (and standard deviations over seeds) of the table's columns."""
    by_router: dict[str, list[dict]] = {}
    for record in records:
        by_router.setdefault(record["router"], []).append(record)
    rows = []
    for name, recs in by_router.items():
        k = recs[0]["target_k"]
        train_active = [r["train_active_end"] if r["train_active_end"] is not None else float(k)
                        for r in recs]
        cols = {
            "heldout_loss": [r["heldout_loss"] for r in recs],
            "heldout_ppl": [math.exp(r["heldout_loss"]) for r in recs],
            "tokens_per_s": [r["tokens_per_s"] for r in recs],
            "train_active": train_active,
            "active_error_pct": [100.0 * (a - k) / k for a in train_active],
            "eval_active": [_layer_mean(r, "active_experts") for r in recs],
            "load_cv": [_layer_mean(r, "load_cv") for r in recs],
            "effective_experts": [_layer_mean(r, "effective_experts") for r in recs],
            "min_layer_effective": [_min_layer_effective(r) for r in recs],
            "min_expert_load": [_min_expert_load(r) for r in recs],
            "ood_loss": [(r.get("ood") or {}).get("loss") for r in recs],
            "ood_effective_experts": [_layer_mean(r, "effective_experts", "ood") for r in recs],
            "ood_active": [_layer_mean(r, "active_experts", "ood") for r in recs],
            "mi_bits": [_layer_mean(r, "mi_bits") for r in recs],
            "mi_normalized": [_layer_mean(r, "mi_normalized") for r in recs],
            "routing_entropy_bits": [_layer_mean(r, "routing_entropy_bits") for r in recs],
            "fallback": [r["fallback_end"] for r in recs],
            "capped": [r["capped_end"] for r in recs],
        }
        row = {"router": name, "label": recs[0]["label"], "target_k": k, "seeds": len(recs),
               "dirmoe": recs[0]["dirmoe"]}
        for key, values in cols.items():
            row[key], row[key + "_std"] = _mean_std(values)
        rows.append(row)
    return rows


_COLUMNS = (
    ("heldout_loss", "held-out loss", "{:.3f}"),
    ("heldout_ppl", "ppl", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("train_active", "active/token (train, end)", "{:.2f}"),
    ("active_error_pct", "error vs k", "{:+.1f}%"),
    ("eval_active", "active/token (held-out)", "{:.2f}"),
    ("load_cv", "load CV", "{:.2f}"),
    ("effective_experts", "eff. experts (1/Simpson)", "{:.2f}"),
    ("min_layer_effective", "lowest layer eff.", "{:.2f}"),
    ("min_expert_load", "min expert load / uniform", "{:.2f}"),
    ("mi_bits", "MI(token class; expert) bits", "{:.3f}"),
    ("routing_entropy_bits", "routing entropy bits", "{:.2f}"),
    ("fallback", "fallback", "{:.3f}"),
    ("capped", "capped", "{:.3f}"),
    ("ood_loss", "OOD loss", "{:.3f}"),
    ("ood_effective_experts", "OOD eff. experts", "{:.2f}"),
    ("ood_active", "OOD active/token", "{:.2f}"),
)


def markdown_table(rows: list[dict]) -> str:
    head = "| router | k | " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
    sep = "|" + "---|" * (len(_COLUMNS) + 2)
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in _COLUMNS:
            value, std = row[key], row[key + "_std"]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("–")
                continue
            text = fmt.format(value)
            if row["seeds"] > 1 and std and not math.isnan(std) and key != "tokens_per_s":
                text += " ± " + fmt.format(std).lstrip("+").rstrip("%") + (
                    "%" if fmt.endswith("%") else "")
            cells.append(text)
        lines.append(f"| {row['label']} | {row['target_k']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Metrics of the paired comparison: (record key or OOD column, title, format, better).
_PAIRED_METRICS = (
    ("heldout_loss", "held-out loss", "{:+.3f}", "lower"),
    ("ood_effective_experts", "OOD eff. experts", "{:+.2f}", "higher"),
)


def _record_metric(record: dict, key: str) -> Optional[float]:
    if key == "ood_effective_experts":
        return _layer_mean(record, "effective_experts", "ood")
    return record.get(key)


def paired_stats(recs: dict[int, dict], other_recs: dict[int, dict]) -> dict:
    """Per-seed differences `recs - other_recs` (records keyed by seed) of `_PAIRED_METRICS`
    over the seeds both hold: {"seeds", metric: {"per_seed", "mean", "se"}}."""
    seeds = sorted(set(recs) & set(other_recs))
    stats = {"seeds": seeds}
    for key, *_ in _PAIRED_METRICS:
        values = [(_record_metric(recs[s], key), _record_metric(other_recs[s], key))
                  for s in seeds]
        diffs = [a - b for a, b in values if a is not None and b is not None]
        mean, se = mean_se(diffs)
        stats[key] = {"per_seed": diffs, "mean": mean, "se": se}
    return stats


def paired_differences(records: list[dict]) -> list[dict]:
    """Each DirMoE router against each TopK router of the same k, seed by seed.

    Runs of one seed share the initialisation and the data order, so the difference of a
    metric within a seed removes most of the seed-to-seed spread that the table's means carry:
    the standard error of the mean difference, sd(d) / sqrt(n), is what says whether a gap of a
    few hundredths is more than the seeds. Only seeds that both routers ran are paired.
    """
    by_router: dict[str, dict[int, dict]] = {}
    for record in records:
        by_router.setdefault(record["router"], {})[record["seed"]] = record
    first = {name: next(iter(recs.values())) for name, recs in by_router.items()}
    pairs = []
    for name, recs in by_router.items():
        for other, other_recs in by_router.items():
            if (not first[name]["dirmoe"] or first[other]["dirmoe"]
                    or first[other]["target_k"] != first[name]["target_k"]):
                continue
            stats = paired_stats(recs, other_recs)
            if stats["seeds"]:
                pairs.append({"router": name, "label": first[name]["label"], "baseline": other,
                              "baseline_label": first[other]["label"], **stats})
    return pairs


def paired_table(pairs: list[dict]) -> str:
    """Markdown table of `paired_differences`: mean difference ± standard error, per seed."""
    if not pairs:
        return ""
    head = "| DirMoE router | minus | seeds | " + " | ".join(
        f"{title} ({better} is better for DirMoE)" for _, title, _, better in _PAIRED_METRICS
    ) + " |"
    lines = [head, "|" + "---|" * (len(_PAIRED_METRICS) + 3)]
    for pair in pairs:
        cells = []
        for key, _, fmt, _ in _PAIRED_METRICS:
            stat = pair[key]
            if not stat["per_seed"]:
                cells.append("–")
                continue
            text = fmt.format(stat["mean"])
            if not math.isnan(stat["se"]):
                text += " ± " + fmt.format(stat["se"]).lstrip("+")
            cells.append(text + " (" + " / ".join(fmt.format(d) for d in stat["per_seed"]) + ")")
        lines.append(f"| {pair['label']} | {pair['baseline_label']} | {len(pair['seeds'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- pictures
def _smooth(values: list[float], alpha: float = 0.05) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _save(fig, path: Path, files: list[str], tight: bool = True) -> None:
    """Write one picture and close it (`tight`: unless the figure lays itself out)."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(path.name)


def plot_all(records: list[dict], rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [row["router"] for row in rows]
    labels = {row["router"]: row["label"] for row in rows}
    colors = {name: plt.cm.tab10(i) for i, name in enumerate(order)}
    seeds = sorted({r["seed"] for r in records})
    first = {name: next(r for r in records if r["router"] == name and r["seed"] == seeds[0])
             for name in order}
    files = []

    # 1. Loss curves: training loss (EMA, mean over seeds) and validation points.
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in order:
        recs = [r for r in records if r["router"] == name]
        n = min(len(r["history"]) for r in recs)
        mean = [sum(r["history"][i]["loss"] for r in recs) / len(recs) for i in range(n)]
        its = [recs[0]["history"][i]["iteration"] for i in range(n)]
        ax.plot(its, _smooth(mean), color=colors[name], label=labels[name])
        vits = sorted(int(i) for i in recs[0]["valid_losses"])
        vmean = [sum(r["valid_losses"][str(i)] for r in recs) / len(recs) for i in vits]
        ax.plot(vits, vmean, "o", color=colors[name], markersize=4)
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss (line: train, EMA; dots: validation)")
    lows = [min(_smooth([h["loss"] for h in first[n]["history"]])) for n in order]
    ax.set_ylim(min(lows) - 0.2, min(lows) + 2.0)
    ax.legend(fontsize=8)
    ax.set_title("Loss curves (mean over seeds)")
    _save(fig, out / "loss_curves.png", files)

    # 2. Active experts per token over training vs the target k (DirMoE; TopK is exactly k).
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in order:
        if not first[name]["dirmoe"]:
            continue
        for r in (r for r in records if r["router"] == name):
            its = [h["iteration"] for h in r["history"]]
            act = [sum(h["dirmoe/active_experts"]) / len(h["dirmoe/active_experts"])
                   for h in r["history"]]
            ek = [sum(h["dirmoe/expected_k"]) / len(h["dirmoe/expected_k"]) for h in r["history"]]
            tag = labels[name] if r["seed"] == seeds[0] else None
            ax.plot(its, _smooth(act, 0.1), color=colors[name], label=tag and f"{tag}: realised")
            ax.plot(its, _smooth(ek, 0.1), ":", color=colors[name],
                    label=tag and f"{tag}: expected sum(pi)")
        k = first[name]["target_k"]
        ax.axhline(k, color=colors[name], linestyle="--", linewidth=0.8)
        ax.axhspan(0.9 * k, 1.1 * k, color=colors[name], alpha=0.08)
    ax.set_xlabel("iteration")
    ax.set_ylabel("experts per token (mean over MoE layers)")
    ax.set_title("DirMoE: active experts per token vs target k (band: +-10%)")
    ax.legend(fontsize=8)
    _save(fig, out / "active_experts.png", files)

    # 3. Schedules.
    dir_first = next((first[n] for n in order if first[n]["dirmoe"]), None)
    if dir_first is not None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        its = [h["iteration"] for h in dir_first["history"]]
        ax.plot(its, [h["dirmoe/tau"][0] for h in dir_first["history"]],
                label="tau_z (spike temperature)")
        ax.plot(its, [h["dirmoe/prior_scale"][0] for h in dir_first["history"]],
                label="lambda_p (prior scale)")
        ax.set_xlabel("iteration")
        ax.set_title("DirMoE schedules (cosine)")
        ax.legend()
        _save(fig, out / "schedules.png", files)

    # 4. Per-layer expert load on held-out tokens, one heatmap per router.
    cols = min(3, len(order))
    nrows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.0 * nrows), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes.flat, order):
        layers = first[name]["layers"]
        grid = [layer["load_fraction"] for layer in layers]
        num_experts = len(grid[0])
        im = ax.imshow(grid, vmin=0, vmax=max(0.5, max(max(g) for g in grid)), cmap="viridis",
                       aspect="auto")
        ax.set_title(labels[name], fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.3 else "black")
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of routed tokens (uniform = 1/E)")
    fig.suptitle(f"Expert load per layer on held-out tokens (seed {seeds[0]})")
    _save(fig, out / "expert_load.png", files, tight=False)

    # 5. Effective experts over training, every router (records from before the load was
    #    followed for every router have none: then the picture is left out).
    followed = [name for name in order
                if all(training_effective_experts(r) for r in records if r["router"] == name)]
    if followed:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in followed:
            curves = [training_effective_experts(r) for r in records if r["router"] == name]
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(range(1, n + 1), _smooth(mean, 0.2), color=colors[name], label=labels[name])
        num_experts = len(first[followed[0]]["layers"][0]["load_fraction"])
        ax.axhline(num_experts, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel("effective experts (1 / Simpson of the routed load)")
        ax.set_ylim(0, num_experts * 1.05)
        ax.set_title("Expert load over training (mean over MoE layers and seeds; dashed: E)")
        ax.legend(fontsize=8)
        _save(fig, out / "load_over_training.png", files)
    return files


def training_effective_experts(record: dict) -> list[float]:
    """Effective experts per training step, mean over MoE layers, from a run's history:
    every router's routed load (`router/effective_experts`) or, in DirMoE records from before
    that was followed, the DirMoE metrics' own; [] when the history has neither."""
    for key in ("router/effective_experts", "dirmoe/effective_experts"):
        if record["history"] and all(row.get(key) for row in record["history"]):
            return [sum(row[key]) / len(row[key]) for row in record["history"]]
    return []


def render(out: Path, work_root: Path, preset_name: str, command: str) -> str:
    records = [json.loads(p.read_text()) for p in sorted((work_root / "records").glob("*.json"))]
    if not records:
        raise SystemExit(f"[compare] no run records under {work_root / 'records'}")
    preset = PRESETS.get(preset_name)
    order = list(routers("0"))
    records.sort(key=lambda r: (order.index(r["router"]) if r["router"] in order else 99,
                                r["seed"]))
    rows = summarize(records)
    if importlib.util.find_spec("matplotlib") is None:  # e.g. a bare GPU image
        print("[compare] matplotlib is not installed (pip install 'megatron-dirmoe[compare]'): "
              "table only; redraw with --render-only where it is", flush=True)
        files = []
    else:
        files = plot_all(records, rows, out)
    device = _device_name(records[0]["device"])
    seeds = sorted({r["seed"] for r in records})
    table = markdown_table(rows)
    pairs = paired_differences(records)
    paired = paired_table(pairs)
    setup = preset.description if preset else preset_name
    iters = sorted({r["train_iters"] for r in records if r.get("train_iters")})
    if iters and not all(f"{n} steps" in setup for n in iters):
        # Flags after `--` (e.g. --train-iters 1200) override the preset's step count.
        setup += f"; steps trained: {', '.join(map(str, iters))} (flags after `--`)"
    split = records[0].get("heldout_split", "test")
    heldout = ("the embedded corpus' test split "
               f"({records[0]['heldout_tokens']:,} tokens), never used for any decision"
               if split == "test" else
               f"the embedded corpus' {split} split ({records[0]['heldout_tokens']:,} tokens), "
               "for choosing settings")
    text = "\n".join([
        f"# Router comparison: {preset_name}",
        "",
        f"- Command: `{command}`",
        f"- Setup: {setup}; seeds {seeds}",
        f"- Device: {device}; date {datetime.date.today().isoformat()}",
        f"- Held-out: {heldout}",
        "- Mean over seeds ± standard deviation. *active/token (train, end)*: realised experts "
        "per token in training mode over the last 10% of steps; TopK routers are exactly k. "
        "Load, MI and entropy are means over MoE layers on held-out tokens (eval mode).",
        "",
        table,
        "",
        *(["Paired by seed (same initialisation and data order): DirMoE minus each TopK "
           "router of the same k, mean ± standard error of the per-seed differences, then the "
           "differences per seed.", "", paired, ""] if paired else []),
        *[f"![{f}]({f})" for f in files],
        "",
    ])
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "paired": pairs,
                                                  "command": command, "device": device},
                                                 indent=1))
    print(table, flush=True)
    if paired:
        print(paired, flush=True)
    print(f"[compare] wrote {out / 'results.md'} and {', '.join(files)}", flush=True)
    return text


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by the README test, without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--routers", nargs="+", default=None,
                        help="subset of: " + ", ".join(routers("0")))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None, help="runs trained at the same time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: CPU cores / jobs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="table and pictures (default docs/router_comparison/<preset>)")
    parser.add_argument("--work", type=Path, default=None,
                        help="run records, logs, checkpoints, tokenised data (default "
                             "runs/compare/<preset>)")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--heldout-split", choices=("test", "valid"), default="test",
                        help="split the routing analysis and held-out loss use: 'valid' while "
                             "choosing settings, 'test' (untouched by tuning) for the table")
    # Worker mode (one run), started by the orchestrator.
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--heldout-sequences", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--meta", default="{}", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    opts = parser.parse_args(argv)

    if opts.worker is not None:
        run_worker(opts.worker, opts.device, opts.heldout_sequences, extra,
                   json.loads(opts.meta), opts.heldout_split)
        return

    preset = PRESETS[opts.preset]
    if opts.seeds:
        preset = Preset(**{**preset.__dict__, "seeds": tuple(opts.seeds)})
    specs = routers(preset.bias_rate)
    if opts.routers:
        unknown = sorted(set(opts.routers) - set(specs))
        if unknown:
            parser.error(f"unknown router(s) {unknown}; choose from {sorted(specs)}")
        specs = {name: specs[name] for name in opts.routers}
    out = opts.out or REPO / "docs" / "router_comparison" / opts.preset
    out.mkdir(parents=True, exist_ok=True)
    work_root = (opts.work or REPO / "runs" / "compare" / opts.preset).resolve()
    shown = [a for a in argv if a != "--render-only"]  # the command that trained the runs
    command = "python scripts/compare_routers.py " + " ".join(
        shown + (["--"] + extra if extra else []))
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"[compare] preset {opts.preset} needs a CUDA GPU; none is visible")
    if not opts.render_only:
        t0 = time.time()
        _run_all(opts.preset, preset, specs, work_root, extra, opts.jobs or preset.jobs,
                 opts.heldout_split, opts.threads)
        print(f"[compare] all runs done in {(time.time() - t0) / 60:.1f} min", flush=True)
    render(out, work_root, opts.preset, command.strip())


if __name__ == "__main__":
    main()
