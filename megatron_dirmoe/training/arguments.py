"""Command line of `python -m megatron_dirmoe.pretrain`: Megatron-LM's own arguments (parsed by
`megatron.training`'s parser), the generated ``--dirmoe-*`` router flags, a few launcher flags,
presets, and the paper's defaults for everything the user does not set.

Precedence, lowest first: Megatron's defaults < the paper defaults (:data:`PAPER_DEFAULTS`) <
a ``--preset`` < flags on the command line. Defaults are installed with
``parser.set_defaults`` before parsing, so anything the user types wins and
``megatron.training.arguments.validate_args`` then checks the result as it would for
Megatron-LM's own ``pretrain_gpt.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_dirmoe.config import add_dirmoe_args, dirmoe_config_from_args
from megatron_dirmoe.layout import check_layout, megatron_topk_for

__all__ = [
    "PAPER_DEFAULTS",
    "PRESETS",
    "add_launcher_args",
    "build_parser",
    "parse_pretrain_args",
    "startup_checks",
]

# The paper's optimisation recipe (AdamW, lr 1e-4, weight decay 1e-2, 1% warm-up then cosine to
# 0.1x lr, clipping 1.0, seed 1234) plus the DirMoE GPT architecture defaults. Megatron's
# "adam" is AdamW (decoupled weight decay).
PAPER_DEFAULTS: dict = dict(
    optimizer="adam",
    lr=1e-4,
    min_lr=1e-5,
    weight_decay=1e-2,
    lr_decay_style="cosine",
    clip_grad=1.0,
    seed=1234,
    moe_router_dtype="fp32",
    moe_router_load_balancing_type="none",
    normalization="RMSNorm",
    swiglu=True,
    add_bias_linear=False,
    position_embedding_type="rope",
    untie_embeddings_and_output_weights=True,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    num_experts=8,
)
# Warm-up of 1% of the decay horizon when no --lr-warmup-* flag is given.
PAPER_WARMUP_FRACTION = 0.01

# Presets: Megatron argument values applied as defaults (flags still override them).
PRESETS: dict[str, dict] = {
    # 4.5M parameters (8 experts x 4 layers), 300 steps x 1024 tokens: ~2-5 min on 2 CPU cores; its
    # validation loss falls well below the unigram level. A higher lr than the paper's 1e-4 so a
    # few hundred steps are enough.
    "tiny": dict(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=256,
        moe_ffn_hidden_size=256,
        num_experts=8,
        seq_length=128,
        max_position_embeddings=128,
        micro_batch_size=8,
        global_batch_size=8,
        train_iters=300,
        lr=2e-3,
        min_lr=2e-4,
        eval_interval=100,
        eval_iters=5,
        log_interval=10,
        save_interval=100,
        save="runs/dirmoe_tiny",
        load="runs/dirmoe_tiny",
    ),
}

# Flags that select training data; when none is given the embedded corpus is used.
_DATA_FLAGS = ("--data-path", "--train-data-path", "--mock-data", "--data-args-path",
               "--per-split-data-args-path")
_WARMUP_FLAGS = ("--lr-warmup-iters", "--lr-warmup-fraction", "--lr-warmup-samples")


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--dirmoe-*`` router flags plus this launcher's own options."""
    add_dirmoe_args(parser)
    group = parser.add_argument_group("DirMoE launcher")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="model/batch/schedule preset applied as defaults; flags override it")
    group.add_argument("--dirmoe-router", choices=("dirichlet", "topk"), default="dirichlet",
                       help="router of every MoE layer: DirMoE, or Megatron's TopKRouter "
                            "(--moe-router-topk experts per token) as a baseline on the same "
                            "pipeline")
    group.add_argument("--dirmoe-device", choices=("auto", "cuda", "cpu"), default="auto",
                       help="auto: megatron.training on CUDA when a GPU is present, else the "
                            "CPU loop of megatron_dirmoe.training.cpu_loop")
    group.add_argument("--dirmoe-data-cache", default=None,
                       help="where the embedded corpus is tokenised when no data path is given "
                            "(default: <--save>/data, or ~/.cache/megatron_dirmoe/data)")
    group.add_argument("--dirmoe-allow-config-change", action="store_true",
                       help="resume even though the DirMoE router settings or schedule horizon "
                            "differ from the checkpoint's (by default that stops the run)")
    group.add_argument("--dirmoe-peak-tflops", type=float, default=None,
                       help="peak dense bf16 TFLOP/s of one device, for the MFU in the logs "
                            "(default: known GPUs by name, e.g. H100/H200 989; none on CPU)")
    group.add_argument("--dirmoe-no-fp32-training", dest="dirmoe_bf16_default",
                       action="store_false", default=True,
                       help="do not default to bf16 on CUDA when neither --bf16 nor --fp16 is "
                            "given (train in fp32)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's argument parser extended with the DirMoE flags."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(
        prog="python -m megatron_dirmoe.pretrain",
        description="Pretrain a Megatron-Core GPT with DirMoE routers (Megatron-LM arguments "
                    "plus --dirmoe-* flags)",
        allow_abbrev=False,
    )
    add_megatron_arguments(parser)
    add_launcher_args(parser)
    # Some Megatron 0.19.2 help texts contain a bare '%', which breaks argparse's --help.
    for action in parser._actions:
        if action.help and "%" in action.help and "%(" not in action.help:
            action.help = action.help.replace("%", "%%")
    return parser


def _given_flags(argv: Sequence[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_pretrain_args(
    argv: Optional[Sequence[str]] = None, *, validate: bool = True, this_machine: bool = True,
    world_size: Optional[int] = None,
) -> argparse.Namespace:
    """Parse, complete and check the command line: every start-up refusal of the entry point
    happens here, so ``python -m megatron_dirmoe.launch check`` (the Slurm scripts' ``DRY_RUN=1``)
    rejects exactly what a job would by calling this same function.

    ``this_machine=False`` checks a job for other machines (the dry run on a login node): it
    skips what depends on this one (is CUDA usable for the launcher's ranks, is Transformer
    Engine or apex importable, preparing the embedded corpus) and treats ``--dirmoe-device auto``
    as the GPU path. ``world_size`` overrides ``WORLD_SIZE``.

    Returns Megatron's namespace (validated by `validate_args` when ``validate``) with
    ``args.dirmoe_use_cuda`` (which path trains), ``args.dirmoe_config`` (the validated
    `DirMoEConfig` as a dict, so it is saved with the checkpoint's args) and, when the embedded
    corpus is used, its train/valid/test prefixes and tokenizer filled in.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = _given_flags(argv)
    parser = build_parser()

    pre, _ = parser.parse_known_args(argv)  # flags that decide the defaults
    defaults = dict(PAPER_DEFAULTS)
    if pre.preset is not None:
        defaults.update(PRESETS[pre.preset])
    auto = _cuda_available() if this_machine else True
    use_cuda = {"auto": auto, "cuda": True, "cpu": False}[pre.dirmoe_device]
    if use_cuda and pre.dirmoe_bf16_default and not ({"--fp16", "--bf16"} & given):
        defaults["bf16"] = True
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.dirmoe_use_cuda = use_cuda

    # Megatron expects these like its own parse_args sets them.
    args._is_global_batch_size_explicitly_specified = args.global_batch_size is not None
    args.rank = int(os.getenv("RANK", "0"))
    args.world_size = int(os.getenv("WORLD_SIZE", "1")) if world_size is None else world_size
    if this_machine:
        from megatron_dirmoe.training.world import LaunchError, check_device_for_world

        try:  # never N silent single-process CPU runs under a launcher
            check_device_for_world(pre.dirmoe_device, use_cuda, args.world_size)
        except LaunchError as exc:
            parser.error(str(exc))

    if args.train_iters is None:
        parser.error("--train-iters is required (the DirMoE schedules are defined over it)")
    if args.dirmoe_peak_tflops is not None and not args.dirmoe_peak_tflops > 0:
        parser.error(f"--dirmoe-peak-tflops {args.dirmoe_peak_tflops}: must be > 0")
    if not set(_WARMUP_FLAGS) & given:
        args.lr_warmup_fraction = PAPER_WARMUP_FRACTION
    try:
        cfg = dirmoe_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    args.dirmoe_config = dataclasses.asdict(cfg)
    if args.dirmoe_router == "dirichlet" and "--moe-router-topk" not in given:
        # The dispatcher sizes its buffers with topk as the cap on active experts per token.
        args.moe_router_topk = megatron_topk_for(cfg, args.num_experts)

    if not use_cuda:
        _cpu_overrides(args, given)
    elif (this_machine and args.transformer_impl == "transformer_engine"
          and not _te_available()):
        if args.rank == 0:
            print("[dirmoe] Transformer Engine not importable: --transformer-impl local",
                  flush=True)
        args.transformer_impl = "local"
    if args.transformer_impl == "local":
        args.apply_rope_fusion = False  # needs TE
    if (this_machine and args.gradient_accumulation_fusion
            and not _module_available("fused_weight_gradient_mlp_cuda")):
        args.gradient_accumulation_fusion = False  # needs apex's CUDA extension
    try:
        startup_checks(args)
    except ValueError as exc:
        parser.error(str(exc))
    if this_machine and not (set(_DATA_FLAGS) & given):
        _use_embedded_corpus(args, given)

    if validate:
        import contextlib
        import io

        from megatron.training.arguments import validate_args

        # Megatron prints every argument; keep that on clusters, not on a CPU try-out.
        quiet = contextlib.redirect_stdout(io.StringIO()) if not use_cuda else contextlib.nullcontext()
        with quiet:
            validate_args(args, {})
    return args


def startup_checks(args: argparse.Namespace) -> None:
    """What the entry point refuses before anything is built, beyond the parser's own errors:
    the parallel layout and batch arithmetic on ``args.world_size`` ranks
    (`megatron_dirmoe.layout.check_layout`), Megatron model flags it cannot honour
    (`megatron_dirmoe.training.model_flags`) and an unimportable ``--spec``. Raises
    `ValueError` naming the flag."""
    from megatron_dirmoe.training.model_flags import check_model_flags

    check_layout(args, args.world_size)
    check_model_flags(args)
    if getattr(args, "spec", None):
        import importlib

        if len(args.spec) != 2:
            raise ValueError(f"--spec {' '.join(args.spec)}: give a module path and a name")
        try:
            getattr(importlib.import_module(args.spec[0]), args.spec[1])
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--spec {' '.join(args.spec)}: cannot import it ({exc})") from exc


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken TE build
        return False
    return True


def _cpu_overrides(args: argparse.Namespace, given: set[str]) -> None:
    """What the CPU loop supports: one process, fp32, the allgather dispatcher, local specs."""
    notes = []
    if args.bf16 or args.fp16:
        notes.append("--bf16/--fp16 -> fp32")
        args.bf16 = args.fp16 = False
    if args.moe_token_dispatcher_type != "allgather":
        notes.append(f"--moe-token-dispatcher-type {args.moe_token_dispatcher_type} -> allgather")
        args.moe_token_dispatcher_type = "allgather"
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "context_parallel_size"):
        if getattr(args, name) != 1:
            notes.append(f"--{name.replace('_', '-')} {getattr(args, name)} -> 1")
            setattr(args, name, 1)
    for name in ("sequence_parallel", "use_distributed_optimizer", "moe_grouped_gemm",
                 "moe_permute_fusion", "overlap_grad_reduce", "overlap_param_gather"):
        if getattr(args, name, False):
            notes.append(f"--{name.replace('_', '-')} off")
            setattr(args, name, False)
    args.transformer_impl = "local"
    args.use_cpu_initialization = True
    # CUDA-only kernels.
    for name in ("masked_softmax_fusion", "bias_dropout_fusion", "bias_swiglu_fusion",
                 "bias_gelu_fusion", "persist_layer_norm", "cross_entropy_loss_fusion"):
        if hasattr(args, name):
            setattr(args, name, False)
    if notes and args.rank == 0:
        print("[dirmoe] no GPU: CPU loop with " + "; ".join(notes), flush=True)


def _use_embedded_corpus(args: argparse.Namespace, given: set[str]) -> None:
    """Point the data and tokenizer arguments at the shipped corpus (tokenised once, cached)."""
    from megatron_dirmoe.data import prepare_embedded_corpus

    cache = args.dirmoe_data_cache
    if cache is None:
        cache = (Path(args.save) / "data" if args.save
                 else Path.home() / ".cache" / "megatron_dirmoe" / "data")
    info = prepare_embedded_corpus(cache)
    args.train_data_path = [info.train_prefix]
    args.valid_data_path = [info.valid_prefix]
    args.test_data_path = [info.test_prefix]
    if "--tokenizer-type" not in given:
        args.tokenizer_type = info.tokenizer_type
        args.tokenizer_model = info.tokenizer_model
    args.dirmoe_embedded_corpus = True
