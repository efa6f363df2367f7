"""The shipped out-of-domain text (modern English prose) and its next-token windows."""

from __future__ import annotations

import re

from megatron_dirmoe.data.ood import iter_ood_documents, ood_sequences
from megatron_dirmoe.data.tokenizer import default_tokenizer_model, load_tokenizer


def test_documents_are_modern_prose_with_ids_and_titles():
    docs = list(iter_ood_documents())
    assert len(docs) == 14
    assert len({d["id"] for d in docs}) == 14
    words = sum(len(d["text"].split()) for d in docs)
    assert 6500 <= words <= 8000
    for doc in docs:
        assert doc["text"].startswith(doc["title"]) and "\n\n" in doc["text"]
    text = " ".join(d["text"] for d in docs)
    # Another domain than the training corpus: contemporary words, no Elizabethan pronouns.
    assert re.search(r"\b(Wi-Fi|battery|email|app)\b", text)
    assert not re.search(r"\b(thou|thee|thy|hath|doth)\b", text, flags=re.IGNORECASE)


class _Ids:
    """A stand-in tokenizer: one id per character, end-of-document id 0."""

    eod = 0

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % 250 + 1 for c in text]


def test_windows_cover_the_documents_in_order():
    seq = 64
    windows = ood_sequences(_Ids(), seq)
    stream = []
    for doc in iter_ood_documents():
        stream += _Ids().tokenize(doc["text"]) + [0]
    assert all(len(w) == seq + 1 for w in windows)
    assert len(windows) == len(stream) // (seq + 1)
    assert sum(windows, []) == stream[: len(windows) * (seq + 1)]


def test_shipped_tokenizer_gives_enough_tokens_for_the_analysis():
    windows = ood_sequences(load_tokenizer(default_tokenizer_model()), 128)
    assert len(windows) >= 64  # >= 8k tokens of held-out text for the router comparison
