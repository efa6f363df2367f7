"""Launch-time checks for the Slurm scripts: resolve a `python -m megatron_dirmoe.pretrain`
command line against a world size and refuse impossible layouts before any GPU time is spent.

``slurm/common.sh`` runs ``python -m megatron_dirmoe.launch check --world-size N -- ARGS...``
on the batch host (and for ``DRY_RUN=1`` on the login node) with exactly the arguments it will
hand to every rank. The check prints the resolved layout, batch arithmetic and model size, and
exits with status 2 and a message naming the flag to change when the layout cannot work.

Pure Python (no torch, no Megatron), so it runs in a second on any Python >= 3.10 with the
repository on ``PYTHONPATH``, including a login node or the host side of a container job.
Defaults are resolved like the entry point does (Megatron's < the paper's < ``--preset`` < the
command line) by reading ``megatron_dirmoe.training.arguments``' tables.

Rules (Megatron-Core 0.19 ``parallel_state.initialize_model_parallel`` and
``megatron.training.arguments.validate_args``, plus DirMoE's ``layout.validate_layout``):

* dense grid: world = TP x PP x CP x DP, so world % (TP x PP x CP) == 0;
* expert grid: world = ETP x EP x EDP x PP (ETP defaults to TP), so world % (ETP x EP x PP) == 0;
  with ETP = TP this is "EP divides CP x DP";
* experts split evenly: num_experts % EP == 0;
* batch: global % (micro x DP) == 0; the quotient is the number of micro-batches per step;
* num_layers % PP == 0 (no uneven first/last stage), num_attention_heads % TP == 0;
* DirMoE: a variable-k token dispatcher, sequence parallelism when TP > 1, no Megatron capacity
  factor, no CUDA graphs over the MoE layer (see `megatron_dirmoe.layout`).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from megatron_dirmoe.config import add_dirmoe_args, config_from_args

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


class LayoutError(ValueError):
    """A parallel layout or batch size Megatron cannot run."""


@dataclass(frozen=True)
class Layout:
    """A resolved parallel layout and the batch arithmetic of one training step."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    etp: int
    expert_dp: int
    num_experts: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    seq_length: int

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


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
                 "--untie-embeddings-and-output-weights", "--moe-pad-expert-input-to-capacity"):
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


# ---------------------------------------------------------------------- the check
def _require(flag: str, value) -> int:
    if value is None:
        raise LayoutError(f"{flag} is required (no preset or default sets it)")
    if value < 1:
        raise LayoutError(f"{flag} = {value} must be >= 1")
    return value


def check_layout(args: argparse.Namespace, world_size: int) -> Layout:
    """Resolve the layout of ``args`` on ``world_size`` ranks; raise `LayoutError` naming the
    flag to change when Megatron (or DirMoE) cannot run it."""
    if world_size < 1:
        raise LayoutError(f"world size {world_size} must be >= 1")
    tp = _require("--tensor-model-parallel-size", args.tensor_model_parallel_size)
    pp = _require("--pipeline-model-parallel-size", args.pipeline_model_parallel_size)
    cp = _require("--context-parallel-size", args.context_parallel_size)
    ep = _require("--expert-model-parallel-size", args.expert_model_parallel_size)
    etp = _require("--expert-tensor-parallel-size", args.expert_tensor_parallel_size or tp)
    num_experts = _require("--num-experts", args.num_experts)
    mbs = _require("--micro-batch-size", args.micro_batch_size)
    num_layers = _require("--num-layers", args.num_layers)
    heads = _require("--num-attention-heads", args.num_attention_heads)
    seq = _require("--seq-length", args.seq_length)

    if world_size % (tp * pp * cp):
        raise LayoutError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size x --context-parallel-size ({tp} x {pp} x {cp} = "
            f"{tp * pp * cp})"
        )
    dp = world_size // (tp * pp * cp)
    if num_experts % ep:
        raise LayoutError(
            f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep}"
        )
    if world_size % (etp * ep * pp):
        raise LayoutError(
            f"world size {world_size} is not divisible by --expert-tensor-parallel-size x "
            f"--expert-model-parallel-size x --pipeline-model-parallel-size ({etp} x {ep} x {pp}"
            f" = {etp * ep * pp}): Megatron lays the experts out as ETP x EP x expert-DP x PP "
            f"over the same {world_size} ranks"
        )
    expert_dp = world_size // (etp * ep * pp)
    gbs = args.global_batch_size if args.global_batch_size is not None else mbs * dp
    if gbs % (mbs * dp):
        raise LayoutError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size x data-parallel "
            f"size ({mbs} x {dp} = {mbs * dp}; DP = world {world_size} / (TP {tp} x PP {pp} x "
            f"CP {cp}))"
        )
    uneven = (args.decoder_first_pipeline_num_layers is not None
              or args.decoder_last_pipeline_num_layers is not None)
    if not uneven and num_layers % pp:
        raise LayoutError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
        )
    if heads % tp:
        raise LayoutError(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if args.num_query_groups is not None and args.group_query_attention and args.num_query_groups % tp:
        raise LayoutError(
            f"--num-query-groups {args.num_query_groups} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if args.dirmoe_router == "dirichlet":
        _check_dirmoe(args, world_size)
    return Layout(
        world_size=world_size, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp, expert_dp=expert_dp,
        num_experts=num_experts, micro_batch_size=mbs, global_batch_size=gbs,
        num_microbatches=gbs // (mbs * dp), seq_length=seq,
    )


def _check_dirmoe(args: argparse.Namespace, world_size: int) -> None:
    from megatron_dirmoe.layout import validate_layout

    try:
        cfg = config_from_args(args, num_experts=args.num_experts)
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc
    view = argparse.Namespace(**vars(args))
    if view.moe_router_topk is None:  # the entry point sets it to max_active
        view.moe_router_topk = cfg.max_active_for(args.num_experts)
    elif view.moe_router_topk < cfg.max_active_for(args.num_experts):
        raise LayoutError(
            f"--moe-router-topk {view.moe_router_topk} is below DirMoE's max_active "
            f"{cfg.max_active_for(args.num_experts)}; leave it unset"
        )
    view.moe_router_topk = cfg.max_active_for(args.num_experts)
    view.sequence_parallel = bool(view.sequence_parallel)
    try:
        validate_layout(view, cfg, world_size=world_size)
    except ValueError as exc:
        raise LayoutError(str(exc)) from exc


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
    moe_layers = _moe_layer_count(args.moe_layer_freq, L)
    norms = 2 * h
    embeddings = vocab * h * (2 if args.untie_embeddings_and_output_weights else 1)
    total = (L * (attention + norms) + moe_layers * (num_experts * expert + router)
             + (L - moe_layers) * dense_mlp + embeddings + h)
    active = (L * (attention + norms) + moe_layers * (k * expert + router)
              + (L - moe_layers) * dense_mlp + embeddings + h)
    return total, active, vocab


def _moe_layer_count(freq, num_layers: int) -> int:
    """MoE layers under ``--moe-layer-freq``: an int (every n-th layer) or Megatron's pattern
    string such as ``"([1]*3+[0]*1)*3"``."""
    if isinstance(freq, int) or (isinstance(freq, str) and freq.isdigit()):
        return len(range(0, num_layers, int(freq)))
    if isinstance(freq, str):
        freq = _eval_pattern(ast.parse(freq, mode="eval").body)
    return int(sum(freq))


def _eval_pattern(node: ast.AST):
    """Evaluate a list/int expression built from literals, ``+`` and ``*`` only."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_eval_pattern(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_pattern(node.left), _eval_pattern(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise LayoutError(f"--moe-layer-freq: cannot read {ast.dump(node)}")


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
        layout = check_layout(args, opts.world_size)
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
