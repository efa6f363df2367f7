"""Preprocessing: JSONL or plain text in, Megatron indexed dataset (``.bin``/``.idx``) out.

Input formats (``input_format``):
    jsonl   one JSON object per line; the document is the string under ``json_key``
            (default "text"). Blank lines are ignored.
    text    plain UTF-8 text; ``text_docs="line"`` (default): one document per line;
            ``text_docs="blank-line"``: documents are separated by one or more blank lines
            (single newlines stay inside the document).
    auto    ``jsonl`` for ``*.jsonl``/``*.json``/``*.jsonl.gz``, ``text`` otherwise.
Files ending in ``.gz`` are read through gzip.

Output: ``<output_prefix>_<key>_document.{bin,idx}`` (``..._sentence`` with sentence
splitting), where key is ``json_key`` for JSONL and "text" for plain text, as Megatron-LM's
``tools/preprocess_data.py`` names them. Each document is one Megatron "document"; each of its
sentences (the whole document without splitting) is one sequence; the end-of-document token
is appended to the last sequence of every document. Files are written under a temporary name
and renamed when complete, so an existing prefix is always a finished dataset.

Malformed input (invalid JSON, missing key, a value that is not a string, invalid UTF-8)
raises :class:`MalformedInputError` naming ``file:line``; with ``skip_malformed=True`` such
documents are skipped and counted instead (``PreprocessStats.malformed``). Documents that are
empty or whitespace only are skipped and counted as ``empty``.

Sentence splitting uses NLTK's Punkt English model when the ``punkt_tab`` data is installed
(``nltk.download('punkt_tab')``, done by the user beforehand: nothing is downloaded here), and
otherwise an untrained ``PunktSentenceTokenizer`` that knows a list of common English
abbreviations. Each sentence keeps the whitespace that follows it, so decoding the sequences
one by one and concatenating gives the exact text back (decoding a whole document at once
with a SentencePiece model adds one space at each sentence start after the first, because
SentencePiece starts every encoded sequence as a new word; byte-level BPE has no such prefix).

Workers (``workers > 1``) tokenise chunks of documents in a process pool; the results are
consumed in input order, so the output is byte-identical to a single-process run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_dirmoe.data.tokenizer import (
    MEGATRON_TOKENIZER_TYPE,
    default_tokenizer_model,
    detect_tokenizer_kind,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "MalformedInputError",
    "PreprocessStats",
    "encode_texts",
    "output_prefix_for",
    "preprocess_files",
    "read_documents",
    "main",
]

INPUT_FORMATS = ("auto", "jsonl", "text")
TEXT_DOCS = ("line", "blank-line")

# Abbreviations the data-free Punkt fallback must not split after (lower case, no final dot).
_ENGLISH_ABBREVIATIONS = (
    "mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al fig no vol pp ed eds inc ltd co corp "
    "jan feb mar apr jun jul aug sep sept oct nov dec gen col capt lt sgt rev hon gov sen rep"
).split()


class MalformedInputError(ValueError):
    """An input line that cannot be turned into a document; the message starts with file:line."""


@dataclass
class PreprocessStats:
    """What one preprocessing run wrote and skipped."""

    output_prefix: str
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    malformed: int = 0
    empty: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"wrote {self.output_prefix}.{{bin,idx}}: {self.documents} documents, "
            f"{self.sequences} sequences, {self.tokens} tokens in {self.seconds:.1f} s; "
            f"skipped {self.malformed} malformed and {self.empty} empty documents"
        )


def output_prefix_for(output_prefix: str | os.PathLike, key: str, split_sentences: bool) -> str:
    """Megatron-LM's naming: ``<output_prefix>_<key>_<document|sentence>``."""
    level = "sentence" if split_sentences else "document"
    return f"{output_prefix}_{key}_{level}"


# --------------------------------------------------------------------------------------------
# Reading: raw items carrying their location, decoded and validated in the workers
# --------------------------------------------------------------------------------------------

# An item is (location, kind, payload): kind "json" -> payload is one raw JSONL line (bytes);
# "bytes" -> raw text bytes of one document; "str" -> an already decoded document.
_Item = tuple[str, str, object]


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _resolve_format(path: Path, input_format: str) -> str:
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    if input_format != "auto":
        return input_format
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return "jsonl" if suffixes and suffixes[-1] in (".jsonl", ".json") else "text"


def _iter_items(paths: Sequence[Path], input_format: str, text_docs: str) -> Iterator[_Item]:
    if text_docs not in TEXT_DOCS:
        raise ValueError(f"text_docs must be one of {TEXT_DOCS}, got {text_docs!r}")
    for path in paths:
        fmt = _resolve_format(path, input_format)
        with _open_binary(path) as f:
            if fmt == "jsonl":
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path}:{lineno}", "json", line
            elif text_docs == "line":
                for lineno, line in enumerate(f, 1):
                    yield f"{path}:{lineno}", "bytes", line.rstrip(b"\r\n")
            else:
                start, buf = 0, []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        if not buf:
                            start = lineno
                        buf.append(line)
                    elif buf:
                        yield f"{path}:{start}", "bytes", b"".join(buf).rstrip(b"\r\n")
                        buf = []
                if buf:
                    yield f"{path}:{start}", "bytes", b"".join(buf).rstrip(b"\r\n")


def _decode_item(item: _Item, json_key: str) -> str:
    """The document text of an item; raises MalformedInputError naming the location."""
    location, kind, payload = item
    if kind == "str":
        return payload
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedInputError(f"{location}: invalid UTF-8 ({e.reason} at byte {e.start})")
    if kind == "bytes":
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedInputError(f"{location}: invalid JSON ({e.msg}, column {e.colno})")
    if not isinstance(record, dict):
        raise MalformedInputError(
            f"{location}: expected a JSON object, got {type(record).__name__}"
        )
    if json_key not in record:
        keys = ", ".join(sorted(record)[:8])
        raise MalformedInputError(f"{location}: missing key {json_key!r} (keys: {keys})")
    value = record[json_key]
    if not isinstance(value, str):
        raise MalformedInputError(
            f"{location}: value of {json_key!r} is {type(value).__name__}, expected a string"
        )
    return value


def read_documents(
    inputs: Sequence[str | os.PathLike],
    input_format: str = "auto",
    json_key: str = "text",
    text_docs: str = "line",
) -> Iterator[str]:
    """Yield the document texts of ``inputs`` (raises MalformedInputError on bad lines)."""
    for item in _iter_items([Path(p) for p in inputs], input_format, text_docs):
        yield _decode_item(item, json_key)


# --------------------------------------------------------------------------------------------
# Encoding (runs in the worker processes, or in-process with workers=1)
# --------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _build_sentence_splitter():
    import nltk
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        from nltk.tokenize import PunktTokenizer

        return PunktTokenizer("english")
    except (LookupError, ImportError):
        params = PunktParameters()
        params.abbrev_types = set(_ENGLISH_ABBREVIATIONS)
        return PunktSentenceTokenizer(params)


def _split_with_whitespace(splitter, text: str) -> list[str]:
    """Sentences of ``text`` that concatenate back to ``text`` exactly."""
    starts = [start for start, _ in splitter.span_tokenize(text)]
    if not starts:
        return [text]
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def _init_worker(tokenizer_path: str, tokenizer_kind: str, json_key: str, split_sentences: bool,
                 append_eod: bool) -> None:
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path, tokenizer_kind)
    _WORKER["json_key"] = json_key
    _WORKER["splitter"] = _build_sentence_splitter() if split_sentences else None
    _WORKER["append_eod"] = append_eod


def _encode_chunk(items: list[_Item]) -> list[tuple]:
    """Per item: ("doc", [ids per sequence]) | ("empty",) | ("bad", message)."""
    tok, splitter = _WORKER["tokenizer"], _WORKER["splitter"]
    out = []
    for item in items:
        try:
            text = _decode_item(item, _WORKER["json_key"])
        except MalformedInputError as e:
            out.append(("bad", str(e)))
            continue
        if not text.strip():
            out.append(("empty",))
            continue
        pieces = _split_with_whitespace(splitter, text) if splitter else [text]
        seqs = [ids for ids in (tok.tokenize(p) for p in pieces) if len(ids) > 0]
        if not seqs:
            out.append(("empty",))
            continue
        if _WORKER["append_eod"]:
            seqs[-1] = list(seqs[-1]) + [tok.eod]
        out.append(("doc", seqs))
    return out


def _chunks(items: Iterable[_Item], size: int) -> Iterator[list[_Item]]:
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _mp_context():
    # fork shares the already-imported Megatron/tokenizer modules with the workers (start-up in
    # milliseconds instead of seconds); fall back to the platform default where fork is missing.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _encode_items(
    items: Iterable[_Item],
    output_prefix: str,
    tokenizer_path: str | os.PathLike | None,
    tokenizer_kind: str | None,
    json_key: str,
    split_sentences: bool,
    append_eod: bool,
    workers: int,
    chunk_size: int,
    skip_malformed: bool,
    progress: bool,
    total: int | None = None,
) -> PreprocessStats:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if workers < 1 or chunk_size < 1:
        raise ValueError(f"workers and chunk_size must be >= 1, got {workers}, {chunk_size}")
    t0 = time.perf_counter()
    init_args = (
        str(tokenizer_path) if tokenizer_path is not None else None,
        tokenizer_kind, json_key, split_sentences, append_eod,
    )
    _init_worker(*init_args)  # also validates the tokenizer before any worker starts
    tokenizer = _WORKER["tokenizer"]

    stats = PreprocessStats(output_prefix=output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(
        f"{tmp_prefix}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size)
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="doc", desc=Path(output_prefix).name, mininterval=1.0,
                   file=sys.stderr)
    pool = None
    try:
        chunks = _chunks(items, chunk_size)
        if workers > 1:
            pool = _mp_context().Pool(workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_encode_chunk, chunks)
        else:
            results = map(_encode_chunk, chunks)
        for chunk_result in results:
            for result in chunk_result:
                if result[0] == "doc":
                    seqs = result[1]
                    lengths = [len(s) for s in seqs]
                    builder.add_document(np.concatenate(seqs), lengths)
                    stats.documents += 1
                    stats.sequences += len(seqs)
                    stats.tokens += sum(lengths)
                elif result[0] == "empty":
                    stats.empty += 1
                elif skip_malformed:
                    stats.malformed += 1
                    if stats.malformed <= 5:
                        print(f"skipping malformed input: {result[1]}", file=sys.stderr)
                else:
                    raise MalformedInputError(
                        result[1] + " (pass --skip-malformed / skip_malformed=True to skip "
                        "and count such lines)"
                    )
            if bar is not None:
                bar.update(len(chunk_result))
        builder.finalize(f"{tmp_prefix}.idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(tmp_prefix + ext).unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    os.replace(f"{tmp_prefix}.bin", f"{output_prefix}.bin")
    os.replace(f"{tmp_prefix}.idx", f"{output_prefix}.idx")
    stats.seconds = time.perf_counter() - t0
    return stats


def preprocess_files(
    inputs: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    tokenizer_kind: str | None = None,
    input_format: str = "auto",
    json_key: str = "text",
    text_docs: str = "line",
    split_sentences: bool = False,
    append_eod: bool = True,
    workers: int = 1,
    chunk_size: int = 64,
    skip_malformed: bool = False,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenise ``inputs`` into ``<output_prefix>_<key>_<document|sentence>.{bin,idx}``.

    ``tokenizer_path`` None uses the tokenizer shipped with the package. Returns the stats;
    ``stats.output_prefix`` is the prefix to hand to Megatron's ``--data-path``.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given")
    if text_docs not in TEXT_DOCS:
        raise ValueError(f"text_docs must be one of {TEXT_DOCS}, got {text_docs!r}")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {str(p)!r}")
    formats = {_resolve_format(p, input_format) for p in paths}
    key = json_key if formats == {"jsonl"} else "text"
    prefix = output_prefix_for(output_prefix, key, split_sentences)
    return _encode_items(
        _iter_items(paths, input_format, text_docs), prefix, tokenizer_path, tokenizer_kind,
        json_key, split_sentences, append_eod, workers, chunk_size, skip_malformed, progress,
    )


def encode_texts(
    texts: Iterable[str],
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    tokenizer_kind: str | None = None,
    split_sentences: bool = False,
    workers: int = 1,
    chunk_size: int = 64,
    progress: bool = False,
    total: int | None = None,
) -> PreprocessStats:
    """Tokenise in-memory documents into exactly ``<output_prefix>.{bin,idx}``."""
    items = ((f"<document {i}>", "str", t) for i, t in enumerate(texts))
    return _encode_items(
        items, str(output_prefix), tokenizer_path, tokenizer_kind, "text", split_sentences,
        True, workers, chunk_size, False, progress, total,
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help="JSONL or text files (.gz ok)")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.{bin,idx}")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file or Hugging Face tokenizer directory "
                        "(default: the tokenizer shipped with megatron_dirmoe)")
    p.add_argument("--tokenizer-type", default=None,
                   choices=sorted(MEGATRON_TOKENIZER_TYPE.values()),
                   help="Megatron tokenizer type (default: detected from --tokenizer-model)")
    p.add_argument("--input-format", default="auto", choices=INPUT_FORMATS)
    p.add_argument("--json-key", default="text", help="JSONL field holding the document text")
    p.add_argument("--text-docs", default="line", choices=TEXT_DOCS,
                   help="plain text: one document per line, or blank-line separated documents")
    p.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (NLTK Punkt)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not append the end-of-document token")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed lines instead of stopping at the first")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB_SIZE",
                   help="first train a SentencePiece model of this vocab size on the inputs and "
                        "write it to --tokenizer-model (which must not exist yet)")


def _add_train_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help="JSONL or text files (.gz ok)")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--input-format", default="auto", choices=INPUT_FORMATS)
    p.add_argument("--json-key", default="text")
    p.add_argument("--text-docs", default="line", choices=TEXT_DOCS)


def _kind_from_type(tokenizer_type: str | None) -> str | None:
    if tokenizer_type is None:
        return None
    return {v: k for k, v in MEGATRON_TOKENIZER_TYPE.items()}[tokenizer_type]


def main(argv: list[str] | None = None) -> int:
    from megatron_dirmoe.training import startup_noise

    startup_noise.install(summary=False)  # Megatron's TE/apex notices concern training only
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("preprocess", "train-tokenizer", "prepare-embedded")
    if not argv or argv[0] not in commands + ("-h", "--help"):
        argv = ["preprocess"] + argv  # the default command, as Megatron-LM's tools/ take it
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dirmoe.data.preprocess",
        description="Tokenise JSONL/text into Megatron indexed datasets (.bin/.idx).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_preprocess_args(sub.add_parser("preprocess", help="(default) tokenise files"))
    _add_train_tokenizer_args(sub.add_parser("train-tokenizer", help="train a SentencePiece model"))
    emb = sub.add_parser("prepare-embedded", help="preprocess the shipped Shakespeare corpus")
    emb.add_argument("--out-dir", required=True)
    emb.add_argument("--tokenizer-model", default=None)
    emb.add_argument("--workers", type=int, default=1)
    emb.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.command == "train-tokenizer":
            texts = read_documents(args.input, args.input_format, args.json_key, args.text_docs)
            path = train_sentencepiece(texts, args.model_prefix, args.vocab_size, args.model_type)
            print(f"wrote {path}")
        elif args.command == "prepare-embedded":
            from megatron_dirmoe.data.embedded import prepare_embedded_corpus

            info = prepare_embedded_corpus(args.out_dir, tokenizer_model=args.tokenizer_model,
                                           workers=args.workers, force=args.force)
            print(json.dumps(info.to_dict(), indent=2))
        else:
            kind = _kind_from_type(args.tokenizer_type)
            if args.train_tokenizer is not None:
                if args.tokenizer_model is None:
                    parser.error("--train-tokenizer needs --tokenizer-model <path>.model to write")
                if Path(args.tokenizer_model).exists():
                    parser.error(f"--tokenizer-model {args.tokenizer_model} exists; "
                                 f"refusing to overwrite it with --train-tokenizer")
                texts = read_documents(args.input, args.input_format, args.json_key,
                                       args.text_docs)
                prefix = str(args.tokenizer_model).removesuffix(".model")
                path = train_sentencepiece(texts, prefix, args.train_tokenizer)
                print(f"wrote {path}", file=sys.stderr)
                args.tokenizer_model, kind = str(path), "sentencepiece"
            stats = preprocess_files(
                args.input, args.output_prefix, args.tokenizer_model, kind, args.input_format,
                args.json_key, args.text_docs, args.split_sentences, args.append_eod,
                args.workers, args.chunk_size, args.skip_malformed, args.progress,
            )
            print(stats.summary())
            tok_model = args.tokenizer_model or str(default_tokenizer_model())
            tok_type = MEGATRON_TOKENIZER_TYPE[kind or detect_tokenizer_kind(tok_model)]
            print(f"train with: --data-path {stats.output_prefix} --tokenizer-type {tok_type} "
                  f"--tokenizer-model {tok_model}")
    except (MalformedInputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
