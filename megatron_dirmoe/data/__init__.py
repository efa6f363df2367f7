"""Data for megatron_dirmoe: the embedded corpus, tokenizers, and preprocessing into Megatron
indexed datasets (``.bin``/``.idx``) that ``GPTDataset``/blended datasets read.

Public API:
    prepare_embedded_corpus  tokenise the shipped Shakespeare corpus (cached) -> EmbeddedCorpus
    EmbeddedCorpus           prefixes per split, tokenizer path/type, vocab size, eod/pad ids,
                             and ``megatron_args()`` for Megatron's command line
    load_tokenizer           Megatron-Core tokenizer over a SentencePiece model / HF directory
    default_tokenizer_model  path of the shipped SentencePiece model (BPE, 4096 pieces)
    train_sentencepiece      train a small lossless SentencePiece model on documents
    preprocess_files         JSONL / text files -> <prefix>_<key>_document.{bin,idx}
    read_documents           iterate the documents of JSONL / text files
    iter_documents           iterate the embedded corpus (optionally one split)

Nothing here imports Megatron at module import time.
"""

from importlib import import_module

_LAZY = {
    "corpus_metadata": "corpus",
    "iter_documents": "corpus",
    "split_of": "corpus",
    "EmbeddedCorpus": "embedded",
    "prepare_embedded_corpus": "embedded",
    "MalformedInputError": "preprocess",
    "PreprocessStats": "preprocess",
    "encode_texts": "preprocess",
    "preprocess_files": "preprocess",
    "read_documents": "preprocess",
    "MEGATRON_TOKENIZER_TYPE": "tokenizer",
    "default_tokenizer_model": "tokenizer",
    "detect_tokenizer_kind": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
}


def __getattr__(name: str):
    # Lazy, so that `python -m megatron_dirmoe.data.preprocess` does not import itself twice.
    if name in _LAZY:
        return getattr(import_module(f"megatron_dirmoe.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EmbeddedCorpus",
    "MEGATRON_TOKENIZER_TYPE",
    "MalformedInputError",
    "PreprocessStats",
    "corpus_metadata",
    "default_tokenizer_model",
    "detect_tokenizer_kind",
    "encode_texts",
    "iter_documents",
    "load_tokenizer",
    "prepare_embedded_corpus",
    "preprocess_files",
    "read_documents",
    "split_of",
    "train_sentencepiece",
]
