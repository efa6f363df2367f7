#!/usr/bin/env python
"""Tokenise JSONL / plain text into Megatron indexed datasets (.bin/.idx).

Thin wrapper over ``python -m megatron_dirmoe.data.preprocess``; see that module for the
formats. Examples:

    # JSONL with a "text" field, the tokenizer shipped with the package, 2 workers
    python scripts/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --workers 2

    # your own SentencePiece model / Hugging Face tokenizer directory
    python scripts/preprocess_data.py --input a.jsonl b.jsonl.gz --output-prefix data/ab \\
        --tokenizer-model tok.model            # or --tokenizer-model ./hf_tokenizer_dir

    # no tokenizer yet: train a 8192-piece SentencePiece model on the inputs first
    python scripts/preprocess_data.py --input books.txt --text-docs blank-line \\
        --output-prefix data/books --tokenizer-model data/books_sp8192.model --train-tokenizer 8192

    # subcommands: train-tokenizer, prepare-embedded (the shipped Shakespeare corpus)
    python scripts/preprocess_data.py prepare-embedded --out-dir runs/data
"""

import sys

from megatron_dirmoe.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
