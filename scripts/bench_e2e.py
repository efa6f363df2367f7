#!/usr/bin/env python
"""End-to-end training throughput: a DirMoE GPT against the same GPT with Megatron's TopKRouter.

One run trains the same model twice through the real entry point (`python -m
megatron_dirmoe.pretrain`, so `megatron.training.pretrain` on a GPU, the CPU loop otherwise) on
synthetic tokens (`--mock-data`): first with DirMoE routers, then with Megatron's `TopKRouter` at
the integer k nearest DirMoE's realised mean active experts per token. Each run's numbers are the
entry point's own log line, computed at the realised k (`megatron_dirmoe/throughput.py`), over the
last logging interval (the first interval holds start-up and warm-up):

    tokens/s | TFLOP/s/device (k=...) | MFU

    python scripts/bench_e2e.py --size tiny --steps 2                 # CPU smoke run (CI)
    python scripts/bench_e2e.py --size small --steps 40               # 1 GPU, ~1B of slurm/small.sh

On a GPU the model uses Transformer Engine (when it imports), grouped GEMM, the all-to-all
dispatcher and bf16, as `slurm/small.sh` does, with EP = 1. ``--peak-tflops`` gives the device
peak for MFU (default: known GPUs by name, H100/H200 989). Extra flags after ``--`` go to both
runs (e.g. ``-- --recompute-granularity selective``). Results: a table on stdout and JSON with
``--json``.

Settings search: each ``--variant NAME="FLAGS"`` trains DirMoE once more with FLAGS added; the
variant with the highest TFLOP/s (MFU) wins and TopK runs with the same flags, so both routers
get the best settings found for DirMoE:

    python scripts/bench_e2e.py --size small --steps 30 --log-interval 10 \
        --variant mbs4="--micro-batch-size 4" --variant mbs16="--micro-batch-size 16" \
        --variant permute-fusion="--moe-permute-fusion"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

# Model sizes. `small` is slurm/small.sh's model (12 layers, hidden 1024, 8 experts, expert FFN
# 2816, ~0.95B parameters) on one GPU.
SIZES = {
    "tiny": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2",
             "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "128", "--num-experts", "4",
             "--seq-length", "64", "--max-position-embeddings", "64",
             "--micro-batch-size", "4", "--global-batch-size", "4"],
    "small": ["--num-layers", "12", "--hidden-size", "1024", "--num-attention-heads", "16",
              "--ffn-hidden-size", "2816", "--moe-ffn-hidden-size", "2816", "--num-experts", "8",
              "--seq-length", "1024", "--max-position-embeddings", "1024",
              "--micro-batch-size", "8", "--global-batch-size", "32"],
}
GPU_FLAGS = ["--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm", "--bf16",
             "--transformer-impl", "transformer_engine"]
LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ .*?tokens/s ([\d,.]+) \| TFLOP/s/device ([\d.e+-]+) "
    r"\(k=([\d.]+)\) \| MFU (n/a|[\d.]+%)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=2, help="training steps per router (>= 2)")
    p.add_argument("--log-interval", type=int, default=None,
                   help="steps per measured interval (default: steps // 2)")
    p.add_argument("--target-k", type=int, default=1, help="DirMoE's --dirmoe-target-k")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun) on the CUDA path")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="extra settings to try for DirMoE (repeatable); the best also runs "
                        "for TopK")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for both runs")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first interval is warm-up)")
    if args.extra[:1] == ["--"]:
        args.extra = args.extra[1:]
    variants = {}
    for item in args.variant:
        name, sep, flags = item.partition("=")
        if not sep or not name:
            p.error(f"--variant {item!r}: expected NAME=\"FLAGS\"")
        variants[name] = shlex.split(flags)
    args.variants = variants
    return args


def _use_cuda(device: str) -> bool:
    if device != "auto":
        return device == "cuda"
    import torch

    return torch.cuda.is_available()


def _last_value(flags: list[str], name: str) -> int:
    """The value a flag ends up with (argparse: the last occurrence wins)."""
    return int([flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name][-1])


def run_once(opts: argparse.Namespace, router_flags: list[str], workdir: str) -> dict:
    """Train once through the entry point; the numbers of its last log line."""
    cuda = _use_cuda(opts.device)
    interval = opts.log_interval or max(1, opts.steps // 2)
    flags = (SIZES[opts.size] + (GPU_FLAGS if cuda else []) + [
        "--train-iters", str(opts.steps), "--log-interval", str(interval),
        "--eval-interval", str(10 * opts.steps), "--eval-iters", "0",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
        "--dirmoe-device", "cuda" if cuda else "cpu", "--save-interval", str(10 * opts.steps),
        "--dirmoe-data-cache", os.path.join(workdir, "data"),
    ] + (["--dirmoe-peak-tflops", str(opts.peak_tflops)] if opts.peak_tflops else [])
        + router_flags + opts.extra)
    if cuda:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={opts.nproc}", "-m", "megatron_dirmoe.pretrain", *flags]
    else:
        cmd = [sys.executable, "-m", "megatron_dirmoe.pretrain", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    lines = LINE.findall(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"bench_e2e: training failed ({' '.join(router_flags)}), "
                         f"exit status {proc.returncode}")
    it, tokens_per_s, tflops, k, mfu = lines[-1]
    tokens_per_s = float(tokens_per_s.replace(",", ""))
    tokens_per_step = (_last_value(flags, "--global-batch-size")
                       * _last_value(flags, "--seq-length"))
    return dict(iteration=int(it), tokens_per_s=tokens_per_s,
                step_ms=1000.0 * tokens_per_step / tokens_per_s, tflops_per_device=float(tflops),
                active_experts=float(k),
                mfu=None if mfu == "n/a" else float(mfu.rstrip("%")) / 100.0)


def _row(name: str, r: dict) -> str:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{name:<16} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} "
            f"{r['tflops_per_device']:>12.4g} {r['active_experts']:>5.2f} {mfu:>7}")


HEADER = f"{'run':<16} {'tokens/s':>12} {'step ms':>9} {'TFLOP/s/dev':>12} {'k':>5} {'MFU':>7}"


def main(argv=None) -> int:
    opts = parse_args(argv)
    dirmoe_flags = ["--dirmoe-target-k", str(opts.target_k)]
    with tempfile.TemporaryDirectory() as workdir:
        dirmoe = run_once(opts, dirmoe_flags, workdir)
        tried = {"default": dirmoe}
        for name, flags in opts.variants.items():
            tried[name] = run_once(opts, dirmoe_flags + flags, workdir)
        winner = max(tried, key=lambda name: tried[name]["tflops_per_device"])
        if len(tried) > 1:
            print("DirMoE settings (the highest TFLOP/s wins):\n" + HEADER)
            for name, r in tried.items():
                print(_row(name + (" *" if name == winner else ""), r))
            print()
        dirmoe = tried[winner]
        best = opts.variants.get(winner, [])
        k = max(1, round(dirmoe["active_experts"]))
        # Megatron's usual top-k baseline: softmax scores with the aux load-balancing loss
        # (pre-softmax, which Megatron requires at k = 1), with the same settings.
        topk = run_once(opts, ["--dirmoe-router", "topk", "--moe-router-topk", str(k),
                               "--moe-router-load-balancing-type", "aux_loss"]
                        + (["--moe-router-pre-softmax"] if k == 1 else []) + best, workdir)
    print(HEADER)
    print(_row("DirMoE", dirmoe))
    print(_row(f"TopK k={k}", topk))
    ratio = dirmoe["tokens_per_s"] / topk["tokens_per_s"]
    print(f"DirMoE / TopK tokens/s: {ratio:.3f} (size {opts.size}, {opts.steps} steps, "
          f"interval {opts.log_interval or max(1, opts.steps // 2)}, settings {winner!r}: "
          f"{' '.join(best) or 'as given'})")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(size=opts.size, steps=opts.steps, dirmoe=dirmoe, topk=topk,
                           topk_k=k, tokens_per_s_ratio=ratio, variants=tried,
                           winner=winner, winner_flags=best), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
