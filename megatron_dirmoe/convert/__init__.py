"""Checkpoint conversion between Megatron distributed checkpoints and Hugging Face folders.

    mapping      the one declarative table Megatron name <-> HF name (+ transform), torch only
    transforms   pure split/merge transforms (fused QKV, gated fc1), exact inverses
    megatron_checkpoint   read/write megatron.training checkpoints on one CPU rank (any layout)
    hf_export    convert_to_hf / convert_to_megatron / verify_logits
    hf_tokenizer a SentencePiece model as a Hugging Face fast tokenizer with the same ids

CLI: ``python -m megatron_dirmoe.convert --help`` (or ``scripts/convert_to_hf.py``).
"""

from megatron_dirmoe.convert.mapping import (
    TABLE,
    ConversionError,
    Layout,
    Rule,
    expand,
    hf_to_megatron,
    layout_from_hf_config,
    megatron_to_hf,
)

__all__ = [
    "TABLE",
    "ConversionError",
    "Layout",
    "Rule",
    "expand",
    "hf_to_megatron",
    "layout_from_hf_config",
    "megatron_to_hf",
]
