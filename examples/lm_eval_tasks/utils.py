"""Local lm-evaluation-harness tasks on the embedded Shakespeare corpus' test split (no network:
the documents come from the installed `megatron_dirmoe` package).

- ``dirmoe_shakespeare_ppl``: perplexity (loglikelihood_rolling) over the 86 test documents, the
  split `scripts/compare_routers.py` holds out; `scripts/heldout_perplexity.py` computes the same
  numbers with the Megatron checkpoint.
- ``dirmoe_shakespeare_next_line``: multiple choice, one item per test document: after a passage,
  which of four lines comes next (the true line, or the line picked the same way from three other
  test documents).

Run with ``lm_eval ... --include_path examples/lm_eval_tasks --tasks dirmoe_shakespeare``.
"""

from __future__ import annotations

import hashlib

CONTEXT_LINES = 8  # lines of the passage before the line to predict
NUM_CHOICES = 4
# Other documents (offsets in the split's order) whose lines are the wrong choices.
DISTRACTOR_OFFSETS = (7, 29, 53)


def _test_texts() -> list[tuple[str, str]]:
    from megatron_dirmoe.data.corpus import iter_documents

    return [(doc["id"], doc["text"]) for doc in iter_documents("test")]


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def test_documents(**_metadata):
    """`custom_dataset` of the perplexity task: {"id", "text"} per test document."""
    return _dataset([{"id": i, "text": t} for i, t in _test_texts()])


def doc_text(doc: dict) -> str:
    return doc["text"]


def _is_verse(line: str) -> bool:
    # A spoken line: long enough to tell apart, not a stage direction, not a speaker's name.
    return len(line) >= 25 and not line.startswith("[") and line != line.upper()


def _question(text: str) -> tuple[str, str]:
    """(passage, next line) at the middle spoken line of a document."""
    lines = text.split("\n")
    spoken = [i for i, line in enumerate(lines) if _is_verse(line) and i >= CONTEXT_LINES]
    at = spoken[len(spoken) // 2]
    return "\n".join(lines[at - CONTEXT_LINES : at]) + "\n", lines[at]


def next_line_documents(**_metadata):
    """`custom_dataset` of the multiple-choice task: {"id", "context", "choices", "label"}."""
    texts = _test_texts()
    questions = [_question(text) for _, text in texts]
    rows = []
    for n, (doc_id, _) in enumerate(texts):
        context, answer = questions[n]
        wrong = [questions[(n + k) % len(texts)][1] for k in DISTRACTOR_OFFSETS]
        label = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % NUM_CHOICES
        choices = wrong[:label] + [answer] + wrong[label:]
        rows.append({"id": doc_id, "context": context, "choices": choices, "label": label})
    return _dataset(rows)
