"""Held-out perplexity of a Megatron DirMoE GPT on whole documents, counted the way
lm-evaluation-harness counts a ``loglikelihood_rolling`` task, so the two can be compared
number for number.

Each document is tokenized on its own (no end-of-document token) and cut into consecutive
windows of at most `window` tokens (the model's context). Every token is predicted once:

- the first window predicts the document's first `window` tokens from a prefix token (the
  tokenizer's BOS, or its end-of-document token when it has no BOS) plus the tokens before;
- each further window predicts the next `window` tokens from the token before them plus the
  tokens within; the last, shorter one gets the longest context that fits in `window`.

The negative log-likelihood summed over all predicted tokens (`nll`) is turned into perplexities
per token, per word (words = runs of non-whitespace, split on ``\\s+``) and per UTF-8 byte, and
bits per byte: the `word_perplexity`, `byte_perplexity` and `bits_per_byte` that
lm-evaluation-harness reports for such a task.

The loss itself is computed by `routing_analysis.record_routing`, the function that
`scripts/compare_routers.py` uses for its held-out loss on the same test split (there on
`GPTDataset`'s fixed-length samples, which run across document boundaries).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

__all__ = ["Window", "rolling_windows", "count_words", "count_bytes", "HeldoutResult",
           "document_perplexity"]


@dataclass(frozen=True)
class Window:
    """One forward pass: `input_ids` predict `target_ids` (the next token at every position);
    the last `num_scored` positions count."""

    input_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    num_scored: int


def rolling_windows(token_ids: Sequence[int], prefix_id: int, window: int) -> list[Window]:
    """The windows that predict every token of `token_ids` exactly once (see the module doc)."""
    if window < 1:
        raise ValueError(f"window={window}: allowed >= 1")
    ids = list(token_ids)
    if not ids:
        return []
    first = min(window, len(ids))
    out = [Window(tuple([prefix_id] + ids[: first - 1]), tuple(ids[:first]), first)]
    for start in range(first, len(ids), window):
        end = min(start + window, len(ids))
        ctx = max(end - window - 1, 0)  # the longest input that ends right before `end`
        out.append(Window(tuple(ids[ctx : end - 1]), tuple(ids[ctx + 1 : end]), end - start))
    return out


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for perplexity: ``len(re.split(r"\\s+", text))``."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


@dataclass(frozen=True)
class HeldoutResult:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens of `documents`
    documents holding `words` words and `bytes` UTF-8 bytes."""

    nll: float
    tokens: int
    words: int
    bytes: int
    documents: int

    @property
    def loss(self) -> float:
        """Mean per-token loss (nats): what `compare_routers.py` reports as held-out loss."""
        return self.nll / self.tokens

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2)

    def to_dict(self) -> dict:
        return dict(asdict(self), loss=self.loss, token_perplexity=self.token_perplexity,
                    word_perplexity=self.word_perplexity, byte_perplexity=self.byte_perplexity,
                    bits_per_byte=self.bits_per_byte)


def _batches(windows: list[Window], batch_size: int, device) -> Iterable[dict]:
    """`record_routing` batches: windows of equal length stacked, the scored positions masked."""
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(len(w.input_ids), []).append(w)
    for length, group in sorted(by_length.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            tokens = torch.tensor([w.input_ids for w in chunk], device=device)
            labels = torch.tensor([w.target_ids for w in chunk], device=device)
            mask = torch.zeros(len(chunk), length, device=device)
            for row, w in enumerate(chunk):
                mask[row, length - w.num_scored :] = 1.0
            positions = torch.arange(length, device=device).expand(len(chunk), -1)
            yield {"tokens": tokens, "position_ids": positions, "labels": labels,
                   "loss_mask": mask}


def document_perplexity(model, documents: Sequence[str], tokenize, *, prefix_id: int,
                        window: int, batch_size: int = 8) -> HeldoutResult:
    """Perplexities of a Megatron GPT (`model`, put in eval mode for the call) on `documents`
    (texts), each tokenized with `tokenize(text) -> list[int]` and scored in `rolling_windows`."""
    from megatron_dirmoe.routing_analysis import record_routing

    device = next(model.parameters()).device
    windows = [w for doc in documents for w in rolling_windows(tokenize(doc), prefix_id, window)]
    tokens = sum(w.num_scored for w in windows)
    if tokens == 0:
        raise ValueError("the documents hold no tokens")
    with torch.no_grad():
        _, loss = record_routing(model, _batches(windows, batch_size, device))
    return HeldoutResult(nll=loss * tokens, tokens=tokens,
                         words=sum(count_words(d) for d in documents),
                         bytes=sum(count_bytes(d) for d in documents), documents=len(documents))
