"""The matcher's view of a tokenizer: one llguidance `LLTokenizer` per loaded tokenizer and logits
width, built once and cached.

A tokenizer.json is handed to llguidance as it is. A SentencePiece ``tokenizer.model`` (Llama-2's,
OpenELM's) has no loader there, so it is rewritten as the Llama-format tokenizer.json that encodes
the same way: BPE over the model's pieces with byte fallback, the merges read off the pieces
(every split of a piece into two pieces, ranked by the merged piece's score), and the normalizer
SentencePiece applies (the dummy-prefix "▁" when the model adds one, spaces as "▁").
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

from ..errors import TokenizerError

_SPACE = "\u2581"
_CACHE: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def eos_ids(tokenizer) -> list[int]:
    """Every id that ends generation for `tokenizer` (its `eos_ids` when it has several, else `eos_id`)."""
    many = getattr(tokenizer, "eos_ids", None)
    return sorted({int(t) for t in many}) if many else [int(tokenizer.eos_id)]


def is_sentencepiece_vocabulary(tokenizer) -> bool:
    """Whether words start with SentencePiece's "▁" (a tokenizer.model, or a tokenizer.json converted
    from one) rather than being byte-level BPE: such models often begin a reply with "▁{"."""
    return not getattr(tokenizer, "byte_level", False)


def _merges(sp, vocab: dict[str, int]) -> list[list[str]]:
    """BPE merges that rebuild SentencePiece's pieces: for each normal piece (highest score first),
    every split into two pieces of the vocabulary, the splits ordered by their parts' ids."""
    ranked = sorted((i for i in range(sp.get_piece_size()) if _is_normal(sp, i)),
                    key=lambda i: (-sp.get_score(i), i))
    merges = []
    for i in ranked:
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        merges += [list(s) for s in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    return merges


def _is_normal(sp, i: int) -> bool:
    return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))


def sentencepiece_to_json(sp) -> str:
    """A Llama-format tokenizer.json (as a string) equivalent to the SentencePiece processor `sp`
    for encoding: BPE with byte fallback, SentencePiece's normalizer and decoder. Needs no
    `transformers`; checked against `sp.encode` by the tests."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    dummy_prefix = "".join(sp.encode("a", out_type=str)).startswith(_SPACE)
    normalizers = ([{"type": "Prepend", "prepend": _SPACE}] if dummy_prefix else []) + [
        {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}]
    added = [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    decoders = [{"type": "Replace", "pattern": {"String": _SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if dummy_prefix else [])
    document = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": _merges(sp, vocab)},
    }
    return json.dumps(document, ensure_ascii=False)


def tokenizer_json_text(tokenizer) -> str:
    """The tokenizer.json text llguidance reads for `tokenizer` (converted for a SentencePiece model)."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        return sentencepiece_to_json(sp)
    try:
        return tokenizer.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{tokenizer.path}: cannot read the tokenizer for the grammar matcher ({e})") from None


def matcher_tokenizer(tokenizer, n_vocab: int):
    """The cached `llguidance.LLTokenizer` for `tokenizer` whose masks are `n_vocab` wide (the model's
    logits width; ids past the tokenizer are never allowed), every EOS id as its end tokens."""
    if n_vocab < tokenizer.vocab_size:
        raise TokenizerError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                             f"model's {n_vocab} logits")
    with _LOCK:
        built = _CACHE.setdefault(tokenizer, {})
        if n_vocab not in built:
            from llguidance import LLTokenizer

            try:
                built[n_vocab] = LLTokenizer(tokenizer_json_text(tokenizer), n_vocab=n_vocab,
                                             eos_token=eos_ids(tokenizer))
            except ValueError as e:
                raise TokenizerError(f"{tokenizer.path}: the grammar matcher cannot read this tokenizer ({e})") from None
        return built[n_vocab]
