"""``python -m megatron_dirmoe.convert``: Megatron DirMoE checkpoint <-> Hugging Face folder.

    # Megatron -> HF (any saved TP/PP/EP layout; runs on one CPU process)
    python -m megatron_dirmoe.convert to-hf --load /ckpts/run1 --out /export/run1-hf --verify

    # HF -> Megatron (model weights only; architecture and arguments from a template run)
    python -m megatron_dirmoe.convert to-megatron --hf /export/run1-hf --template /ckpts/run1 \\
        --save /ckpts/run1-from-hf
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dirmoe.convert",
        description="Convert DirMoE checkpoints between Megatron (distributed) and Hugging Face.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    to_hf = sub.add_parser("to-hf", help="Megatron distributed checkpoint -> Hugging Face folder")
    to_hf.add_argument("--load", required=True,
                       help="save directory (with latest_checkpointed_iteration.txt) or an "
                       "iter_* directory")
    to_hf.add_argument("--out", required=True, help="output folder for the Hugging Face model")
    to_hf.add_argument("--iteration", type=int, default=None,
                       help="iteration to convert (default: latest)")
    to_hf.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                       help="dtype of the written weights (default float32)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors shard, e.g. 2GB")
    to_hf.add_argument("--tokenizer", default=None,
                       help="tokenizer to export: a SentencePiece .model (written as "
                       "tokenizer.json for AutoTokenizer, and copied) or a Hugging Face tokenizer "
                       "directory (default: the checkpoint's --tokenizer-model)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="do not export a tokenizer")
    to_hf.add_argument("--verify", action="store_true",
                       help="after writing, compare HF and Megatron logits on random sequences")
    to_hf.add_argument("--verify-sequences", type=int, default=4)
    to_hf.add_argument("--verify-length", type=int, default=32)
    to_hf.add_argument("--atol", type=float, default=1e-4,
                       help="largest allowed |logit difference| for --verify in float32")

    to_mg = sub.add_parser("to-megatron", help="Hugging Face folder -> Megatron checkpoint")
    to_mg.add_argument("--hf", required=True, help="Hugging Face folder written by to-hf")
    to_mg.add_argument("--template", required=True,
                       help="Megatron checkpoint of the same architecture (its args are reused)")
    to_mg.add_argument("--save", required=True, help="save directory for the new checkpoint")
    to_mg.add_argument("--iteration", type=int, default=None,
                       help="iteration to save at (default: the HF config's router_iteration)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_dirmoe.convert.hf_export import convert_to_hf, convert_to_megatron

    if args.command == "to-hf":
        summary = convert_to_hf(
            args.load,
            args.out,
            iteration=args.iteration,
            tokenizer=args.tokenizer,
            copy_tokenizer=not args.no_tokenizer,
            max_shard_size=args.max_shard_size,
            dtype=getattr(torch, _DTYPES[args.dtype]),
            verify=args.verify,
            verify_sequences=args.verify_sequences,
            verify_length=args.verify_length,
            atol=args.atol,
        )
        print(json.dumps(summary, indent=2))
    else:
        path = convert_to_megatron(args.hf, args.template, args.save, iteration=args.iteration)
        print(json.dumps({"checkpoint": str(path)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
