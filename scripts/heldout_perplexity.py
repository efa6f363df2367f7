#!/usr/bin/env python
"""Held-out perplexity of a Megatron DirMoE checkpoint on the embedded corpus' test split, counted
the way lm-evaluation-harness counts its ``dirmoe_shakespeare_ppl`` task (examples/lm_eval_tasks),
so the Megatron checkpoint and its Hugging Face export can be compared number for number.

    python scripts/heldout_perplexity.py --load runs/dirmoe_tiny
    python scripts/heldout_perplexity.py --load runs/dirmoe_tiny --gpt-samples 256 --json ppl.json

Prints the loss per token and the token / word / byte perplexities and bits per byte over whole
documents (`megatron_dirmoe.evaluation`). With ``--gpt-samples N`` it also prints the held-out
loss `scripts/compare_routers.py` reports: the first N samples of Megatron's `GPTDataset` on the
test split (fixed-length windows across document boundaries), through the same function.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True,
                        help="save directory (with latest_checkpointed_iteration.txt) or iter_*")
    parser.add_argument("--iteration", type=int, default=None)
    parser.add_argument("--split", choices=("train", "valid", "test"), default="test")
    parser.add_argument("--limit", type=int, default=None,
                        help="first N documents only (as lm_eval --limit N)")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens per window (default: the model's --max-position-embeddings, "
                        "the max_length lm-evaluation-harness reads from the export)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpt-samples", type=int, default=0,
                        help="also the loss on the first N GPTDataset samples of the split, as "
                        "compare_routers.py computes it (needs the run's data files)")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def gpt_sample_loss(model, args, split: str, samples: int) -> tuple[float, int]:
    """(mean loss, tokens) over the first `samples` samples of the split's GPTDataset, batched
    and scored as `scripts/compare_routers.py` does."""
    from megatron_dirmoe.data.tokenizer import load_tokenizer
    from megatron_dirmoe.datasets import build_gpt_datasets, num_samples_per_split
    from megatron_dirmoe.routing_analysis import record_routing
    from megatron_dirmoe.training.cpu_loop import batch_from_dataset

    index = ("train", "valid", "test").index(split)
    sizes = num_samples_per_split(args)
    sizes[index] = max(sizes[index], samples)
    dataset = build_gpt_datasets(args, load_tokenizer(args.tokenizer_model), sizes,
                                 create_attention_mask=False)[index]
    count = min(samples, len(dataset))
    mbs = args.micro_batch_size
    batches = [batch_from_dataset(dataset, start, min(mbs, count - start))
               for start in range(0, count, mbs)]
    _, loss = record_routing(model, batches)
    return loss, count * args.seq_length


def main(argv=None) -> dict:
    opts = build_parser().parse_args(argv)
    from megatron_dirmoe.training import startup_noise

    startup_noise.install()
    from megatron_dirmoe.convert.megatron_checkpoint import load_megatron_model
    from megatron_dirmoe.data.corpus import iter_documents
    from megatron_dirmoe.data.tokenizer import load_tokenizer
    from megatron_dirmoe.evaluation import document_perplexity

    model, args, iteration, ckpt_dir = load_megatron_model(opts.load, opts.iteration)
    if not getattr(args, "tokenizer_model", None):
        raise SystemExit(f"{ckpt_dir}: the run has no --tokenizer-model to tokenize text with")
    tokenizer = load_tokenizer(args.tokenizer_model)
    # The prefix lm-evaluation-harness puts before a document: the tokenizer's BOS, else EOS.
    bos = getattr(tokenizer, "bos", None)
    prefix_id = bos if bos is not None and bos >= 0 else tokenizer.eod
    documents = [doc["text"] for doc in iter_documents(opts.split)][: opts.limit]
    window = opts.window or args.max_position_embeddings
    result = document_perplexity(model, documents, tokenizer.tokenize, prefix_id=prefix_id,
                                 window=window, batch_size=opts.batch_size)
    summary = dict(checkpoint=str(ckpt_dir), iteration=iteration, split=opts.split,
                   window=window, prefix_id=prefix_id, **result.to_dict())
    print(f"{ckpt_dir} (iteration {iteration}), {opts.split} split: {result.documents} documents, "
          f"{result.tokens:,} tokens, {result.words:,} words, {result.bytes:,} bytes; "
          f"windows of {window} tokens")
    print(f"  loss/token {result.loss:.4f} | token_perplexity {result.token_perplexity:.3f} | "
          f"word_perplexity {result.word_perplexity:.3f} | byte_perplexity "
          f"{result.byte_perplexity:.4f} | bits_per_byte {result.bits_per_byte:.4f}")
    if opts.gpt_samples:
        loss, tokens = gpt_sample_loss(model, args, opts.split, opts.gpt_samples)
        summary.update(gpt_samples=opts.gpt_samples, gpt_sample_loss=loss, gpt_sample_tokens=tokens)
        print(f"  GPTDataset samples (compare_routers.py's held-out loss): {opts.gpt_samples} x "
              f"{args.seq_length} tokens, loss/token {loss:.4f} | token_perplexity "
              f"{math.exp(loss):.3f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
