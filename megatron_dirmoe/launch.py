"""Launch-time checks for the Slurm scripts: resolve a `python -m megatron_dirmoe.pretrain`
command line against a world size and refuse impossible layouts before any GPU time is spent.

``slurm/common.sh`` runs ``python -m megatron_dirmoe.launch check --world-size N -- ARGS...``
on the batch host (and for ``DRY_RUN=1`` on the login node) with exactly the arguments it will
hand to every rank. The check prints the resolved layout, batch arithmetic and model size, and
exits with status 2 and a message naming the flag to change when the layout cannot work.

Where megatron-core is importable (the training environment), ``check`` runs the entry point's
own start-up parse and checks (`megatron_dirmoe.training.arguments.parse_pretrain_args`, minus
what depends on the machine it runs on), so the dry run rejects exactly what a job would: bad
layouts, bad ``--dirmoe-*`` values, Megatron flags the entry point refuses. Elsewhere (a bare
Python on the batch host of a container job) it falls back to the layout rules alone, in pure
Python, and says so. The parameter estimate below is always pure Python.

The layout rules live in `megatron_dirmoe.layout` (`check_layout`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from megatron_dirmoe.config import add_dirmoe_args
from megatron_dirmoe.layout import Layout, LayoutError, check_layout, moe_layer_numbers

__all__ = [
    "Layout",
    "LayoutError",
    "resolve_args",
    "check_layout",
    "parameter_counts",
    "parse_slurm_duration",
    "main",
]

# Vocabulary assumed for the parameter estimate when --vocab-size is not given (a tokenizer file
# decides it at run time); printed with the estimate.
ASSUMED_VOCAB_SIZE = 32000


# ---------------------------------------------------------------------- argument resolution
def _parser() -> argparse.ArgumentParser:
    """The subset of the entry point's flags that decides layout, batch and model size."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ints = {
        "--num-layers": None, "--hidden-size": None, "--num-attention-heads": None,
        "--ffn-hidden-size": None, "--moe-ffn-hidden-size": None, "--num-experts": None,
        "--num-query-groups": None, "--kv-channels": None, "--seq-length": None,
        "--micro-batch-size": None, "--global-batch-size": None, "--train-iters": None,
        "--tensor-model-parallel-size": 1, "--pipeline-model-parallel-size": 1,
        "--context-parallel-size": 1, "--expert-model-parallel-size": 1,
        "--expert-tensor-parallel-size": None, "--moe-router-topk": None, "--vocab-size": None,
        "--decoder-first-pipeline-num-layers": None, "--decoder-last-pipeline-num-layers": None,
        "--num-layers-per-virtual-pipeline-stage": None,
    }
    for flag, default in ints.items():
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--moe-layer-freq", default=1)
    p.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    p.add_argument("--moe-token-dispatcher-type", default="allgather")
    p.add_argument("--cuda-graph-impl", default="none")
    p.add_argument("--cuda-graph-modules", nargs="*", default=[])
    for flag in ("--sequence-parallel", "--group-query-attention", "--swiglu",
                 "--untie-embeddings-and-output-weights", "--moe-pad-expert-input-to-capacity",
                 "--enable-cuda-graph", "--external-cuda-graph"):
        p.add_argument(flag, action="store_true", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--dirmoe-router", default="dirichlet")
    p.add_argument("--dirmoe-device", default="auto")
    add_dirmoe_args(p)
    return p


def _entry_point_defaults(preset: Optional[str]) -> dict:
    """The entry point's paper defaults and preset, keyed by Megatron attribute name."""
    from megatron_dirmoe.training.arguments import PAPER_DEFAULTS, PRESETS

    defaults = dict(PAPER_DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise LayoutError(f"--preset {preset!r}: choose one of {sorted(PRESETS)}")
        defaults.update(PRESETS[preset])
    return defaults


def resolve_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the layout-relevant flags of a pretrain command line, with the entry point's
    defaults (paper, then ``--preset``) under whatever the command line gives."""
    parser = _parser()
    pre, _ = parser.parse_known_args(list(argv))
    known = set(vars(parser.parse_known_args([])[0]))
    parser.set_defaults(**{k: v for k, v in _entry_point_defaults(pre.preset).items() if k in known})
    args, _ = parser.parse_known_args(list(argv))
    if args.dirmoe_device == "cpu":
        # The CPU loop runs one process and forces every parallel size to 1.
        args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
        args.context_parallel_size = args.expert_model_parallel_size = 1
        args.expert_tensor_parallel_size = 1
        args.sequence_parallel = False
        args.moe_token_dispatcher_type = "allgather"
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = 4 * args.hidden_size  # Megatron's default
        args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
    return args


# ---------------------------------------------------------------------- model size
def parameter_counts(args: argparse.Namespace) -> tuple[int, int, int]:
    """(total, active per token, vocab size used) parameters of the DirMoE GPT ``args``
    describes: RMSNorm, no linear biases, RoPE, SwiGLU when ``--swiglu``; "active" counts the
    target k experts (``--dirmoe-target-k``) per MoE layer.

    Megatron pads the vocabulary to a multiple of 128 x TP; the estimate uses the unpadded size.
    """
    h, L, heads = args.hidden_size, args.num_layers, args.num_attention_heads
    vocab = args.vocab_size or ASSUMED_VOCAB_SIZE
    head_dim = args.kv_channels or h // heads
    groups = args.num_query_groups if args.group_query_attention and args.num_query_groups else heads
    attention = h * head_dim * heads * 2 + 2 * h * head_dim * groups  # q, o; k, v
    gated = 3 if args.swiglu else 2
    expert = gated * h * args.moe_ffn_hidden_size
    dense_mlp = gated * h * args.ffn_hidden_size
    num_experts = args.num_experts
    k = args.dirmoe_target_k or 1
    router = 2 * num_experts * h + num_experts  # DirMoE: stacked [2E, h] weight + spike bias
    moe_layers = len(moe_layer_numbers(args.moe_layer_freq, L))
    norms = 2 * h
    embeddings = vocab * h * (2 if args.untie_embeddings_and_output_weights else 1)
    total = (L * (attention + norms) + moe_layers * (num_experts * expert + router)
             + (L - moe_layers) * dense_mlp + embeddings + h)
    active = (L * (attention + norms) + moe_layers * (k * expert + router)
              + (L - moe_layers) * dense_mlp + embeddings + h)
    return total, active, vocab


# ---------------------------------------------------------------------- Slurm time strings
def parse_slurm_duration(text: str) -> Optional[int]:
    """Seconds in a Slurm duration (``squeue -o %L``/``%l``: ``[D-]HH:MM:SS``, ``MM:SS``,
    ``D-HH``...); None for ``UNLIMITED``/``NOT_SET``/``INVALID`` or anything unparsable."""
    text = text.strip()
    if "-" in text:
        days, rest = text.split("-", 1)
        if not days.isdigit():
            return None
        parts = rest.split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
            return None
        h, m, s = (list(map(int, parts)) + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    values = list(map(int, parts))
    if len(values) == 1:  # bare minutes
        return values[0] * 60
    if len(values) == 2:  # MM:SS
        return values[0] * 60 + values[1]
    return (values[0] * 60 + values[1]) * 60 + values[2]


# ---------------------------------------------------------------------- CLI
def _summary(layout: Layout, args: argparse.Namespace) -> str:
    total, active, vocab = parameter_counts(args)
    vocab_note = "" if args.vocab_size else f", vocab {vocab} assumed"
    lines = [
        f"layout: world {layout.world_size} = TP {layout.tp} x PP {layout.pp} x CP {layout.cp} "
        f"x DP {layout.dp}",
        f"experts: {layout.num_experts} over EP {layout.ep} ({layout.experts_per_rank} per rank); "
        f"expert grid ETP {layout.etp} x EP {layout.ep} x EDP {layout.expert_dp} x PP {layout.pp}",
        f"batch: global {layout.global_batch_size} = micro {layout.micro_batch_size} x DP "
        f"{layout.dp} x {layout.num_microbatches} micro-batches/step; "
        f"{layout.tokens_per_step} tokens/step (seq {layout.seq_length})",
        f"model: {total / 1e9:.2f}B parameters total, {active / 1e9:.2f}B active per token "
        f"(k={args.dirmoe_target_k or 1}{vocab_note})",
    ]
    if layout.pp > 1 and layout.num_microbatches < layout.pp:
        lines.append(
            f"warning: {layout.num_microbatches} micro-batches per step < PP {layout.pp}: most "
            "of each step is pipeline bubble"
        )
    return "\n".join(lines)


_NO_MEGATRON = "megatron-core not importable"


def entry_point_check(pretrain_args: Sequence[str], world_size: int):
    """Run the entry point's own start-up parse and checks
    (`megatron_dirmoe.training.arguments.parse_pretrain_args`, for another machine) on a command
    line: None when the job would start, the reason when it would refuse, or `_NO_MEGATRON`
    when megatron-core cannot be imported here."""
    import contextlib
    import io

    import importlib.util

    try:
        if importlib.util.find_spec("megatron.training") is None:
            return _NO_MEGATRON
    except ImportError:  # no `megatron` package at all
        return _NO_MEGATRON
    from megatron_dirmoe.training.arguments import parse_pretrain_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_pretrain_args(list(pretrain_args), validate=False, this_machine=False,
                                world_size=world_size)
    except SystemExit as exc:
        if not exc.code:
            return None
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        message = lines[-1] if lines else f"exit status {exc.code}"
        return message.split(": error: ", 1)[-1]
    except ValueError as exc:
        return str(exc)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_dirmoe.launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="resolve and check a pretrain command line")
    check.add_argument("--world-size", type=int, required=True)
    check.add_argument("--json", action="store_true", help="print the layout as JSON")
    check.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                       help="-- then the arguments of python -m megatron_dirmoe.pretrain")
    left = sub.add_parser("seconds", help="seconds in a Slurm duration (empty if unlimited)")
    left.add_argument("duration")
    opts = parser.parse_args(argv)

    if opts.command == "seconds":
        seconds = parse_slurm_duration(opts.duration)
        print("" if seconds is None else seconds)
        return 0

    pretrain_args = list(opts.pretrain_args)
    if pretrain_args[:1] == ["--"]:
        pretrain_args = pretrain_args[1:]
    try:
        args = resolve_args(pretrain_args)
        problem = entry_point_check(pretrain_args, opts.world_size)
        if problem is None:
            layout = check_layout(args, opts.world_size)
        elif problem is _NO_MEGATRON:
            layout = check_layout(args, opts.world_size)
            print("note: megatron-core is not importable by this Python: checked the layout "
                  "rules only; the job's start-up applies the entry point's other checks "
                  "(set CHECK_PYTHON to the training environment's python for all of them)",
                  file=sys.stderr)
        else:
            raise LayoutError(problem)
    except LayoutError as exc:
        print(f"layout check failed: {exc}", file=sys.stderr)
        return 2
    if opts.json:
        total, active, _ = parameter_counts(args)
        print(json.dumps(dict(asdict(layout), params_total=total, params_active=active,
                              train_iters=args.train_iters)))
    else:
        print(_summary(layout, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
