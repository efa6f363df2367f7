"""Ready-to-train indexed datasets for the embedded Shakespeare corpus.

:func:`prepare_embedded_corpus` tokenises the shipped corpus once per split into
``<out_dir>/shakespeare_<split>_text_document.{bin,idx}`` and records what it built in
``<out_dir>/shakespeare_data.json``. A later call with the same corpus, tokenizer and format
version returns the cached result without touching the files. Every file is written under a
temporary name and renamed when complete, and the output is deterministic, so two processes
preparing the same directory at once (e.g. every rank of a job) both end with valid files;
still, prefer calling it on one rank and barrier.

The result plugs into Megatron's arguments::

    info = prepare_embedded_corpus("runs/data")
    argv += info.megatron_args()
    # --train-data-path P_train --valid-data-path P_valid --test-data-path P_test
    # --tokenizer-type SentencePieceTokenizer --tokenizer-model <shipped .model>
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_dirmoe.data.corpus import CORPUS_NAME, SPLITS, asset_path, iter_documents
from megatron_dirmoe.data.tokenizer import (
    MEGATRON_TOKENIZER_TYPE,
    default_tokenizer_model,
    detect_tokenizer_kind,
    load_tokenizer,
)

__all__ = ["EmbeddedCorpus", "prepare_embedded_corpus"]

# Bump when the on-disk output of the same corpus + tokenizer changes.
FORMAT_VERSION = 1
_STAMP = f"{CORPUS_NAME}_data.json"


@dataclass(frozen=True)
class EmbeddedCorpus:
    """Where the preprocessed embedded corpus is and how to train on it."""

    train_prefix: str
    valid_prefix: str
    test_prefix: str
    tokenizer_model: str
    tokenizer_type: str  # Megatron's --tokenizer-type
    vocab_size: int  # unpadded; Megatron pads it with --make-vocab-size-divisible-by
    eod_id: int
    pad_id: int
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    cached: bool = False

    def prefix(self, split: str) -> str:
        return {"train": self.train_prefix, "valid": self.valid_prefix,
                "test": self.test_prefix}[split]

    def megatron_args(self) -> list[str]:
        """Megatron-LM command-line arguments that select this data and tokenizer."""
        return [
            "--train-data-path", self.train_prefix,
            "--valid-data-path", self.valid_prefix,
            "--test-data-path", self.test_prefix,
            "--tokenizer-type", self.tokenizer_type,
            "--tokenizer-model", self.tokenizer_model,
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _fingerprint(tokenizer_model: Path) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "corpus_sha256": _sha256(asset_path()),
        "tokenizer_model": str(tokenizer_model),
        "tokenizer_sha256": _sha256(tokenizer_model),
    }


def _cached(out_dir: Path, fingerprint: dict) -> EmbeddedCorpus | None:
    stamp = out_dir / _STAMP
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("fingerprint") != fingerprint:
        return None
    info = EmbeddedCorpus(**saved["corpus"], cached=True)
    for split in SPLITS:
        if not all(Path(info.prefix(split) + ext).is_file() for ext in (".bin", ".idx")):
            return None
    return info


def prepare_embedded_corpus(
    out_dir: str | os.PathLike,
    tokenizer_model: str | os.PathLike | None = None,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
) -> EmbeddedCorpus:
    """Tokenise the shipped corpus into train/valid/test indexed datasets under ``out_dir``.

    Args:
        out_dir: output directory (created if missing); re-used when up to date.
        tokenizer_model: SentencePiece model or HF tokenizer directory; default: the shipped
            SentencePiece model trained on this corpus.
        workers: tokenisation processes (1 is fastest for this small corpus).
        force: rebuild even when the cached output is up to date.
    """
    from megatron_dirmoe.data.preprocess import encode_texts

    out_dir = Path(out_dir)
    tok_path = Path(tokenizer_model) if tokenizer_model is not None else default_tokenizer_model()
    kind = detect_tokenizer_kind(tok_path)  # clear error for a missing tokenizer
    tok_path = tok_path.resolve()
    fingerprint = _fingerprint(tok_path)
    if not force:
        cached = _cached(out_dir, fingerprint)
        if cached is not None:
            return cached

    tokenizer = load_tokenizer(tok_path, kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefixes, documents, tokens = {}, {}, {}
    for split in SPLITS:
        texts = [d["text"] for d in iter_documents(split)]
        prefix = str(out_dir.resolve() / f"{CORPUS_NAME}_{split}_text_document")
        stats = encode_texts(texts, prefix, tok_path, kind, workers=workers,
                             progress=progress, total=len(texts))
        prefixes[split], documents[split], tokens[split] = prefix, stats.documents, stats.tokens
    info = EmbeddedCorpus(
        train_prefix=prefixes["train"],
        valid_prefix=prefixes["valid"],
        test_prefix=prefixes["test"],
        tokenizer_model=str(tok_path),
        tokenizer_type=MEGATRON_TOKENIZER_TYPE[kind],
        vocab_size=int(tokenizer.vocab_size),
        eod_id=int(tokenizer.eod),
        pad_id=int(tokenizer.pad) if tokenizer.pad is not None else -1,
        documents=documents,
        tokens=tokens,
    )
    record = {"fingerprint": fingerprint, "corpus": {k: v for k, v in info.to_dict().items()
                                                       if k != "cached"}}
    tmp = out_dir / f"{_STAMP}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out_dir / _STAMP)
    return info
