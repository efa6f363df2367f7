"""A SentencePiece model as a Hugging Face fast tokenizer with the same ids.

Megatron's ``SentencePieceTokenizer`` encodes with ``SentencePieceProcessor.encode``. The exported
folder carries a ``tokenizer.json`` (the `tokenizers` library's format) built from the model's
own specification, so ``AutoTokenizer.from_pretrained(folder)`` gives those ids without Megatron
or `sentencepiece`:

- model: BPE with the pieces as vocabulary and merges ranked by the merged piece's score (which
  is SentencePiece's BPE rule), or Unigram with the piece scores; byte fallback as trained;
- normalizer: the precompiled character map (none for ``identity``), extra-whitespace removal,
  the dummy "▁" prefix, spaces as "▁" (each as the model's normalizer spec says);
- pre-tokenizer: a piece never crosses the start of a word ("▁") and, with ``split_digits``,
  digits stand alone;
- special tokens: the control pieces (``<s>``, ``</s>``, ``<pad>``) and ``<unk>``; no BOS/EOS is
  added when encoding (Megatron adds none, preprocessing appends one EOD per document).

:func:`check_ids_match` compares both on sample texts; the converter warns if they differ.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Union

__all__ = ["sentencepiece_to_hf", "check_ids_match", "SAMPLE_TEXTS"]

# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_UNIGRAM, _BPE = 1, 2
_SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol

SAMPLE_TEXTS = (
    "ALL'S WELL THAT ENDS WELL\n\nACT I. SCENE 1.\nRousillon. The COUNT'S palace.",
    "To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind",
    " leading and trailing spaces  ", "double  spaces   and\ttabs", "\n\nnew lines\n",
    "digits 12345 and 3.14159, 1st 2nd", "naïve café, Ærø, ☃ 𝄞 🙂 日本語", "",
)


def _load_proto(path: Union[str, os.PathLike]):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _backend(proto):
    """The `tokenizers.Tokenizer` equivalent of a SentencePiece ModelProto."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix or not trainer.split_by_whitespace:
        raise ValueError("SentencePiece models trained with treat_whitespace_as_suffix or "
                         "without split_by_whitespace are not supported")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if trainer.model_type == _BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        ranked = []  # (rank of the merged piece, ids of the halves, halves)
        for i, (piece, _, kind) in enumerate(pieces):
            if kind != _NORMAL:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    ranked.append((-pieces[i][1], i, vocab[left], vocab[right], left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        model = BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _UNIGRAM:
        model = Unigram([(piece, score) for piece, score, _ in pieces], unk_id=trainer.unk_id,
                        byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"SentencePiece model type {trainer.model_type}: only BPE and Unigram")

    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    splits = [pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)]
    if trainer.split_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace(_SPACE, " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                            for piece, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)])
    tok.add_tokens([AddedToken(piece, normalized=False)
                    for piece, _, kind in pieces if kind == _USER_DEFINED])
    return tok


def sentencepiece_to_hf(path: Union[str, os.PathLike], *, model_max_length: int | None = None):
    """A `transformers` fast tokenizer (``PreTrainedTokenizerFast``) giving the ids of the
    SentencePiece model at `path`; its special tokens are the model's unk/bos/eos/pad pieces."""
    from transformers import PreTrainedTokenizerFast

    proto = _load_proto(path)
    trainer = proto.trainer_spec
    specials = {}
    for name, idx in (("unk_token", trainer.unk_id), ("bos_token", trainer.bos_id),
                      ("eos_token", trainer.eos_id), ("pad_token", trainer.pad_id)):
        if 0 <= idx < len(proto.pieces):
            specials[name] = proto.pieces[idx].piece
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(proto), clean_up_tokenization_spaces=False, **specials, **kwargs
    )


def check_ids_match(path: Union[str, os.PathLike], hf_tokenizer,
                    texts: Iterable[str] = SAMPLE_TEXTS) -> list[str]:
    """Texts on which `hf_tokenizer` and the SentencePiece model at `path` give different ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [text for text in texts
            if sp.encode(text) != hf_tokenizer(text, add_special_tokens=False)["input_ids"]]
