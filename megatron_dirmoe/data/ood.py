"""An out-of-domain evaluation text: modern English prose, shipped inside the package.

The embedded training corpus is Elizabethan drama and verse. A router that balances its experts
only on text like its training data shows it on text of another domain, so the router comparison
also analyses every model on ``assets/modern_prose.jsonl``: 14 short documents (about 7,100
words) of contemporary everyday prose (a recipe, a commute, how batteries age, bookkeeping, a
hiking report, a product description, a local news report, houseplants, weather forecasts, a
personal essay, Wi-Fi troubleshooting, a restaurant review, recycling, a letter), with fictional
names throughout. The text was written for this project and is distributed under the project's
licence (Apache-2.0). Each line is ``{"id": ..., "title": ..., "text": ...}``.

Reading it imports nothing beyond the standard library; :func:`ood_sequences` turns it into
next-token-prediction windows with any tokenizer that has ``tokenize`` and ``eod``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from megatron_dirmoe.data.corpus import asset_path

__all__ = ["OOD_ASSET", "iter_ood_documents", "ood_sequences"]

OOD_ASSET = "modern_prose.jsonl"


def iter_ood_documents() -> Iterator[dict]:
    """The out-of-domain documents, in file order."""
    with asset_path(OOD_ASSET).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def ood_sequences(tokenizer, seq_length: int) -> list[list[int]]:
    """Every document tokenised and followed by the end-of-document token, concatenated and cut
    into non-overlapping windows of ``seq_length + 1`` ids (inputs are ``w[:-1]``, labels
    ``w[1:]``); the incomplete tail is dropped."""
    ids: list[int] = []
    for doc in iter_ood_documents():
        ids.extend(tokenizer.tokenize(doc["text"]))
        ids.append(tokenizer.eod)
    width = seq_length + 1
    return [ids[i:i + width] for i in range(0, len(ids) - width + 1, width)]
