"""Start-up checks of the files a training run reads and writes, before Megatron touches them.

Megatron reports a missing tokenizer as ``tokenizer_type None is not supported`` (without naming
the data path that needs it), a missing tokenizer file as ``tokenizer_path: ... is invalid``, and a
missing data prefix deep inside its dataset builder. :func:`check_input_files` finds these first
and raises one `UserError` that lists every problem with its flag, file and fix:

* tokenizer: ``--tokenizer-type`` given whenever data flags are, and the files that type reads
  (``--tokenizer-model``, ``--vocab-file``, ``--merge-file``) present; ``--vocab-size`` for
  ``NullTokenizer``;
* data: every prefix of ``--data-path`` / ``--train-data-path`` / ``--valid-data-path`` /
  ``--test-data-path`` / ``--data-args-path`` / ``--per-split-data-args-path`` has its ``.bin``
  and ``.idx`` (a prefix given with its suffix, or a directory, is named as such);
* outputs: ``--save`` and ``--tensorboard-dir`` can be created and written.

Pure Python at import time (Megatron's blend parser is imported inside).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import struct
from pathlib import Path
from typing import Optional

from megatron_dirmoe.errors import UserError

__all__ = ["check_input_files", "output_dir_problem", "TOKENIZER_FILES"]

# Which flags each Megatron tokenizer type reads files from.
TOKENIZER_FILES = {
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "Llama2Tokenizer": ("tokenizer_model",),
    "TikTokenizer": ("tokenizer_model",),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "BertWordPieceLowerCase": ("vocab_file",),
    "BertWordPieceCase": ("vocab_file",),
}
_FLAG = {"tokenizer_model": "--tokenizer-model", "vocab_file": "--vocab-file",
         "merge_file": "--merge-file"}
_PREPROCESS_HINT = ("dirmoe-preprocess prints the exact flags for the files it writes "
                    "(`train with: --data-path ... --tokenizer-type ... --tokenizer-model ...`)")


class _Problems(list):
    def add(self, message: str, fix: str) -> None:
        self.append((message, fix))

    def raise_if_any(self) -> None:
        if len(self) == 1:
            raise UserError(*self[0])
        if self:
            lines = [f"{len(self)} problems with the run's input files:"]
            for message, fix in self:
                lines.append(f"  - {message}\n    fix: {fix}")
            raise UserError("\n".join(lines))


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.sep + os.sep in value


def _data_flags_given(args: argparse.Namespace) -> Optional[str]:
    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path",
                 "data_args_path", "per_split_data_args_path"):
        if getattr(args, name, None):
            return "--" + name.replace("_", "-")
    return None


def _check_tokenizer(args: argparse.Namespace, problems: _Problems) -> None:
    kind = getattr(args, "tokenizer_type", None)
    data_flag = _data_flags_given(args)
    if kind is None:
        if args.mock_data:
            problems.add("--mock-data needs a tokenizer and none is set",
                         "add --tokenizer-type NullTokenizer --vocab-size N (or a real "
                         "tokenizer: --tokenizer-type SentencePieceTokenizer --tokenizer-model "
                         "FILE.model)")
        elif data_flag:
            problems.add(
                f"--tokenizer-type is not set; {data_flag} needs the tokenizer its .bin/.idx "
                "files were written with",
                "add --tokenizer-type SentencePieceTokenizer --tokenizer-model FILE.model (or "
                "--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR); "
                f"{_PREPROCESS_HINT}. Without data flags the shipped corpus and its tokenizer "
                "are used")
        return
    if kind == "NullTokenizer" and not getattr(args, "vocab_size", None):
        problems.add("--tokenizer-type NullTokenizer needs --vocab-size",
                     "add --vocab-size N (one more than the largest token id in the data)")
    for name in TOKENIZER_FILES.get(kind, ()):
        value = getattr(args, name, None)
        flag = _FLAG[name]
        if not value:
            what = ("a SentencePiece .model file" if name == "tokenizer_model"
                    and kind != "HuggingFaceTokenizer" else
                    "a Hugging Face tokenizer directory or hub name"
                    if kind == "HuggingFaceTokenizer" else "a file")
            problems.add(f"--tokenizer-type {kind} needs {flag} ({what})",
                         f"add {flag} <path>; {_PREPROCESS_HINT}")
            continue
        path = Path(os.path.expanduser(value))
        if kind == "HuggingFaceTokenizer" and not path.exists() and not _looks_like_path(value):
            continue  # a hub name such as "gpt2": transformers resolves (and reports) it
        if not path.exists():
            problems.add(f"{flag} {value}: no such file" + (" or directory" if kind ==
                                                           "HuggingFaceTokenizer" else ""),
                         f"pass the tokenizer the data was written with; {_PREPROCESS_HINT}")
        elif kind != "HuggingFaceTokenizer" and not path.is_file():
            problems.add(f"{flag} {value} is a directory; --tokenizer-type {kind} reads one file",
                         f"pass the file itself (e.g. {value.rstrip('/')}/<name>.model)")
        elif path.is_file() and path.stat().st_size == 0:
            problems.add(f"{flag} {value} is empty", "pass the tokenizer file itself")


def _prefix_problem(flag: str, prefix: str) -> Optional[tuple[str, str]]:
    """Why `prefix` is not a Megatron indexed dataset (``prefix.bin`` + ``prefix.idx``)."""
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    if bin_path.is_file() and idx_path.is_file():
        damage = _indexed_dataset_damage(bin_path, idx_path)
        if damage:
            return (f"{flag} {prefix}: {damage}",
                    "preprocess the data again (dirmoe-preprocess), or copy the pair again "
                    "from where it was written")
        return None
    for suffix in (".bin", ".idx"):
        stem = prefix.removesuffix(suffix)
        if stem != prefix and Path(stem + ".bin").is_file() and Path(stem + ".idx").is_file():
            return (f"{flag} {prefix}: the flag takes the prefix of the .bin/.idx pair, not a "
                    "file", f"drop the suffix: {flag} {stem}")
    path = Path(prefix)
    where = path if path.is_dir() else path.parent
    candidates = sorted(str(p.with_suffix("")) for p in where.glob("*.idx")
                        if p.with_suffix(".bin").is_file()) if where.is_dir() else []
    if path.is_dir():
        message = f"{flag} {prefix} is a directory; expected the prefix of a .bin/.idx pair"
    elif bin_path.is_file() or idx_path.is_file():
        have, missing = (bin_path, idx_path) if bin_path.is_file() else (idx_path, bin_path)
        message = f"{flag} {prefix}: {missing} is missing (next to {have})"
    else:
        message = f"{flag} {prefix}: neither {bin_path} nor {idx_path} exists"
    close = difflib.get_close_matches(prefix, candidates, n=1, cutoff=0.6)
    if close:
        fix = f"did you mean {flag} {close[0]}?"
    elif candidates:
        fix = f"datasets in {where}: {', '.join(candidates[:4])}"
    else:
        fix = f"give the prefix of the files dirmoe-preprocess wrote; {_PREPROCESS_HINT}"
    return message, fix


# Megatron's indexed dataset (megatron/core/datasets/indexed_dataset.py): the .idx starts with
# a 9-byte magic, version 1 (<Q), the token dtype code (<B), the sequence and document counts
# (<Q each), then int32 lengths, int64 byte pointers (per sequence) and int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def _indexed_dataset_damage(bin_path: Path, idx_path: Path) -> Optional[str]:
    """What is wrong with a .bin/.idx pair, by the sizes its index records (None: nothing)."""
    idx_size, bin_size = idx_path.stat().st_size, bin_path.stat().st_size
    with open(idx_path, "rb") as stream:
        head = stream.read(_IDX_HEADER.size)
        if len(head) < _IDX_HEADER.size:
            return f"{idx_path} is {idx_size} bytes, shorter than the index header (truncated)"
        magic, version, code, sequences, documents = _IDX_HEADER.unpack(head)
        if magic != _IDX_MAGIC or version != 1 or code not in _DTYPE_SIZES:
            return f"{idx_path} is not a Megatron indexed-dataset index (its header differs)"
        needed = _IDX_HEADER.size + 12 * sequences + 8 * documents
        if idx_size < needed:
            return (f"{idx_path} is {idx_size:,} bytes, its header records {needed:,} "
                    "(truncated)")
        if sequences == 0:
            return None
        stream.seek(_IDX_HEADER.size + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", stream.read(4))
        stream.seek(_IDX_HEADER.size + 4 * sequences + 8 * (sequences - 1))
        (last_pointer,) = struct.unpack("<q", stream.read(8))
    bin_needed = last_pointer + last_length * _DTYPE_SIZES[code]
    if bin_size < bin_needed:
        return (f"{bin_path} is {bin_size:,} bytes, its index {idx_path.name} records "
                f"{bin_needed:,} (truncated)")
    return None


def _data_prefixes(args: argparse.Namespace, problems: _Problems) -> list[tuple[str, str]]:
    """(flag, prefix) of every dataset the data flags name."""
    from megatron.core.datasets.utils import get_blend_from_list

    def from_list(flag: str, values) -> list[tuple[str, str]]:
        blend = get_blend_from_list(list(values)) if values else None
        return [(flag, prefix) for prefix in blend[0]] if blend else []

    out: list[tuple[str, str]] = []
    if getattr(args, "data_args_path", None):
        path = Path(args.data_args_path)
        if not path.is_file():
            problems.add(f"--data-args-path {path}: no such file",
                         "pass a text file holding the --data-path value (weights and prefixes)")
        else:
            out += from_list(f"--data-path (from --data-args-path {path})", path.read_text().split())
    elif getattr(args, "data_path", None):
        out += from_list("--data-path", args.data_path)
    if getattr(args, "per_split_data_args_path", None):
        path = Path(args.per_split_data_args_path)
        try:
            table = json.loads(path.read_text())
            for split in ("train", "valid", "test"):
                value = table[split]
                out += from_list(f"--per-split-data-args-path {path} [{split!r}]",
                                 value.split() if isinstance(value, str) else value)
        except FileNotFoundError:
            problems.add(f"--per-split-data-args-path {path}: no such file",
                         'pass a JSON file {"train": ..., "valid": ..., "test": ...}')
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.add(f"--per-split-data-args-path {path}: cannot read it "
                         f"({type(exc).__name__}: {exc})",
                         'it must be JSON with "train", "valid" and "test", each a prefix list '
                         "(optionally with weights) or a string of them")
    else:
        for split in ("train", "valid", "test"):
            out += from_list(f"--{split}-data-path", getattr(args, f"{split}_data_path", None))
    return out


def output_dir_problem(flag: str, path: str | os.PathLike) -> Optional[tuple[str, str]]:
    """Why `path` (given with `flag`) cannot be created or written, or None."""
    given = str(path)
    path = Path(os.path.expanduser(given)).absolute()
    if path.exists():
        if not path.is_dir():
            return (f"{flag} {given} is a file; expected a directory",
                    f"pass a directory path with {flag}")
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{flag} {given} is not writable", "pass a directory you can write to"
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return (f"{flag} {given} cannot be created: {ancestor} is a file",
                f"pass a path that is not under a file with {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return (f"{flag} {given} cannot be created: {ancestor} is not writable",
                f"pass a directory you can write to with {flag}")
    return None


def check_input_files(args: argparse.Namespace) -> None:
    """Raise one `UserError` listing every problem with the run's tokenizer, data and output
    paths (flag, file, fix); return when there is none."""
    problems = _Problems()
    _check_tokenizer(args, problems)
    if not args.mock_data and not getattr(args, "dirmoe_embedded_corpus", False):
        for flag, prefix in _data_prefixes(args, problems):
            problem = _prefix_problem(flag, prefix)
            if problem:
                problems.add(*problem)
    for flag, name in (("--save", "save"), ("--tensorboard-dir", "tensorboard_dir")):
        value = getattr(args, name, None)
        if value:
            problem = output_dir_problem(flag, value)
            if problem:
                problems.add(*problem)
    problems.raise_if_any()


def set_megatron_globals(args: argparse.Namespace) -> None:
    """`megatron.training.global_vars.set_global_variables`, which builds the tokenizer from
    the user's flags: a tokenizer Megatron cannot load is restated naming the flags and file."""
    from megatron.training.global_vars import set_global_variables

    from megatron_dirmoe.errors import raised_under, restate

    kind = getattr(args, "tokenizer_type", None)
    files = " ".join(f"{_FLAG[name]} {getattr(args, name)}"
                     for name in TOKENIZER_FILES.get(kind, ()) if getattr(args, name, None))
    with restate(f"--tokenizer-type {kind} {files}".rstrip() + ": Megatron cannot load this "
                 "tokenizer",
                 "pass the tokenizer the data was written with (SentencePieceTokenizer: a "
                 "SentencePiece .model file; HuggingFaceTokenizer: a tokenizer directory or hub "
                 f"name); {_PREPROCESS_HINT}",
                 raised_in=raised_under("/megatron/core/tokenizers/",
                                        "/megatron/training/tokenizer/")):
        set_global_variables(args)
