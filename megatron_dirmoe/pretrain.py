"""`python -m megatron_dirmoe.pretrain` (console script ``dirmoe-pretrain``): pretrain a GPT
with DirMoE routers.

Takes Megatron-LM's own arguments (parsed with `megatron.training`'s parser) plus the
``--dirmoe-*`` flags. On CUDA it trains with `megatron.training.pretrain` (launch with
``torchrun``); without a GPU the same command runs the CPU loop of
:mod:`megatron_dirmoe.training.cpu_loop` (one process). Without data flags it trains on the
public-domain corpus shipped in the package; ``--preset tiny`` fills in a small model::

    python -m megatron_dirmoe.pretrain --preset tiny
    torchrun --nproc-per-node 8 -m megatron_dirmoe.pretrain --num-layers 12 --hidden-size 1024 \\
        --num-attention-heads 16 --num-experts 8 --seq-length 2048 ... --dirmoe-target-k 1

Paper defaults where flags are not given: AdamW, lr 1e-4 (min 1e-5), weight decay 1e-2, 1%
warm-up then cosine, clipping 1.0, seed 1234, bf16 on CUDA with fp32 router math. See
:mod:`megatron_dirmoe.training.arguments`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "cli"]


def main(argv: Optional[Sequence[str]] = None):
    from megatron_dirmoe.training import startup_noise

    startup_noise.install()  # before Megatron is imported: its TE/apex warnings -> one line

    from megatron_dirmoe.training.arguments import parse_pretrain_args

    args = parse_pretrain_args(argv)
    _check_wandb(args)
    if args.dirmoe_use_cuda:
        from megatron_dirmoe.training.gpu import pretrain_on_cuda
        from megatron_dirmoe.training.world import single_process_rendezvous

        # No launcher: a world of one on this GPU (megatron.training rendezvouses via env://).
        if single_process_rendezvous():
            print(f"[dirmoe] no launcher (WORLD_SIZE unset): one process on cuda:0, rendezvous "
                  f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}; use torchrun "
                  "--nproc-per-node N for N GPUs", flush=True)
        return pretrain_on_cuda(args)

    from megatron.training.global_vars import set_global_variables, unset_global_variables

    from megatron_dirmoe.training.cpu_loop import train_on_cpu

    unset_global_variables()  # allow repeated calls in one process (tests)
    # one_logger tracks megatron.training's own loop; the CPU loop reports nothing to it (and
    # Megatron prints a warning on every start when the NVIDIA-internal package is missing).
    args.enable_one_logger = False
    set_global_variables(args)
    return train_on_cpu(args)


def _check_wandb(args) -> None:
    """``--wandb-project`` logs through Megatron's W&B writer (as megatron.training does), which
    needs the ``wandb`` package: say so up front rather than with an ImportError mid start-up."""
    import importlib.util

    if getattr(args, "wandb_project", "") and importlib.util.find_spec("wandb") is None:
        raise SystemExit(
            f"dirmoe-pretrain: --wandb-project {args.wandb_project!r} needs the wandb package, "
            "which is not installed: pip install wandb (then `wandb login`), or drop the "
            "--wandb-* flags; --tensorboard-dir logs the same scalars without it"
        )


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry (``dirmoe-pretrain``): exit status 0 on success. `main` returns the
    CPU loop's `TrainResult`, which ``sys.exit`` would print and turn into status 1."""
    main(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
