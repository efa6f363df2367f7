"""Tokenizers: Megatron-Core's own tokenizer classes over a local SentencePiece model or a local
Hugging Face tokenizer directory, plus training of a small SentencePiece model for users who
have none.

The object returned by :func:`load_tokenizer` is a ``megatron.core.tokenizers`` tokenizer, the
same class ``megatron.training`` builds from ``--tokenizer-type SentencePieceTokenizer
--tokenizer-model <file>`` (or ``HuggingFaceTokenizer --tokenizer-model <dir>``), so the ids
written by preprocessing are the ids training would produce. It exposes ``vocab_size``,
``eod``, ``pad``, ``tokenize(text)`` and ``detokenize(ids)``, which is all ``GPTDataset`` needs.

Megatron is imported lazily (importing ``megatron.core`` costs seconds).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

__all__ = [
    "TOKENIZER_KINDS",
    "MEGATRON_TOKENIZER_TYPE",
    "DEFAULT_TOKENIZER_MODEL",
    "default_tokenizer_model",
    "detect_tokenizer_kind",
    "load_tokenizer",
    "train_sentencepiece",
]

TokenizerKind = Literal["sentencepiece", "huggingface"]
TOKENIZER_KINDS: tuple[str, ...] = ("sentencepiece", "huggingface")
# The value of Megatron's --tokenizer-type for each kind.
MEGATRON_TOKENIZER_TYPE = {
    "sentencepiece": "SentencePieceTokenizer",
    "huggingface": "HuggingFaceTokenizer",
}
DEFAULT_TOKENIZER_MODEL = "shakespeare_bpe4096.model"

# Special ids of models trained here (SentencePiece reserves them at the start of the vocab).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def default_tokenizer_model() -> Path:
    """The SentencePiece model shipped with the package (trained on the embedded corpus)."""
    from megatron_dirmoe.data.corpus import asset_path

    return asset_path(DEFAULT_TOKENIZER_MODEL)


def detect_tokenizer_kind(path: str | os.PathLike) -> TokenizerKind:
    """'sentencepiece' for a ``.model`` file, 'huggingface' for a directory with tokenizer files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {str(path)!r}. Pass a SentencePiece .model file or a local "
            f"Hugging Face tokenizer directory (one with tokenizer.json or tokenizer_config.json), "
            f"or train one with `python -m megatron_dirmoe.data.preprocess train-tokenizer "
            f"--input <corpus> --model-prefix <path>`."
        )
    if path.is_dir():
        if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return "huggingface"
        raise ValueError(
            f"{str(path)!r} is a directory without tokenizer.json or tokenizer_config.json; "
            f"it is not a Hugging Face tokenizer directory"
        )
    return "sentencepiece"


def load_tokenizer(path: str | os.PathLike | None = None, kind: TokenizerKind | None = None):
    """Build Megatron-Core's tokenizer for a local SentencePiece model or HF tokenizer directory.

    Args:
        path: a SentencePiece ``.model`` file or a Hugging Face tokenizer directory; None means
            the tokenizer shipped with the package.
        kind: 'sentencepiece' or 'huggingface'; detected from ``path`` when None.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says what to pass instead).
        ValueError: ``kind`` is unknown, or the tokenizer has no end-of-document token.
    """
    path = Path(path) if path is not None else default_tokenizer_model()
    detected = detect_tokenizer_kind(path)  # raises the clear "not found" error first
    kind = kind or detected
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")

    from megatron.core.tokenizers import MegatronTokenizer

    kwargs = {}
    if kind == "huggingface":
        # Documents get exactly one EOD appended by preprocessing; do not let the HF tokenizer
        # add its own BOS/EOS around every document or sentence.
        kwargs["include_special_tokens"] = False
    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(path), metadata_path={"library": kind}, **kwargs
    )
    if tokenizer.eod is None or tokenizer.eod < 0:
        raise ValueError(
            f"tokenizer {str(path)!r} has no end-of-document (eos) token; preprocessing needs one "
            f"to mark document boundaries"
        )
    return tokenizer


def _paragraphs(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    # SentencePiece trains on "sentences": feed paragraphs (newlines kept inside, so the model
    # learns pieces such as ".\n"), cut to the trainer's max sentence length.
    for text in texts:
        for para in text.split("\n\n"):
            para = para.strip("\n")
            for start in range(0, len(para), max_chars):
                yield para[start : start + max_chars]


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int = 4096,
    model_type: Literal["bpe", "unigram"] = "bpe",
    num_threads: int = 2,
    input_sentence_size: int = 2_000_000,
) -> Path:
    """Train a SentencePiece model on ``texts`` (documents) and write ``<model_prefix>.model``.

    The model is lossless: identity normalisation, whitespace kept as is, byte fallback (no
    text maps to ``<unk>``), so ``decode(encode(text)) == text`` for any UTF-8 text. Digits are
    split. Special ids: unk 0, bos 1, eos 2 (the end-of-document token), pad 3.
    Deterministic for a fixed input and thread count (checked for inputs of fewer than
    ``input_sentence_size`` paragraphs, where no sampling happens).
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(
            f"vocab_size must be >= 300 (256 byte pieces + specials), got {vocab_size}"
        )
    model_prefix = Path(model_prefix)
    max_chars = 16384
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_paragraphs(texts, max_chars),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        max_sentence_length=max_chars * 4,  # bytes
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        minloglevel=2,
    )
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    out = model_prefix.with_name(model_prefix.name + ".model")
    out.write_bytes(proto.getvalue())
    return out
