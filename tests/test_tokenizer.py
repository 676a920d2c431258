"""Tokenizer conventions and the streaming detokenizer."""

from __future__ import annotations

import random

import pytest

from mlx_openelm.tokenizer import Tokenizer

SAMPLES = [
    "Once upon a time there was a little robot who loved apples.",
    "Héllo wörld! Ça va? 日本語のテキスト。 Emoji 🎉🚀 are fun.",
    "  leading spaces and\ttabs\nnewlines   here",
    "🎉",
    " x",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


def _stream(tokenizer, ids):
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add_token(i) for i in ids]
    pieces.append(detokenizer.finalize())
    return pieces


def test_bos_prepended_and_special_ids(tokenizer):
    ids = tokenizer.encode("hello")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tokenizer.encode("hello", add_bos=False) == ids[1:]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_equals_decoding_at_once(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_multibyte_characters_wait_for_their_last_byte(tokenizer):
    ids = tokenizer.encode("🚀", add_bos=False)
    byte_ids = [i for i in ids if tokenizer.sp.is_byte(i)]
    assert len(byte_ids) == 4, "the rocket is not in the tiny vocab, so it must use 4 byte pieces"
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == "🚀"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 3  # nothing printed until the 4th byte arrives


def test_leading_space_rule(tokenizer):
    """The dummy-prefix space of the first word is dropped; later word spaces are kept."""
    ids = tokenizer.encode("Once upon", add_bos=False)
    assert tokenizer.sp.id_to_piece(ids[0]).startswith("\u2581")
    pieces = _stream(tokenizer, ids)
    assert [p for p in pieces if p][0][0] == "O"
    assert "".join(pieces) == "Once upon"
    assert "".join(_stream(tokenizer, tokenizer.encode(" Once", add_bos=False))) == " Once"


def test_random_token_sequences_match_sentencepiece(tokenizer):
    """Includes invalid byte runs, control tokens mid-stream, and byte pieces at the start."""
    rng = random.Random(0)
    for _ in range(3000):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 12))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_ids_past_the_tokenizer_decode_to_nothing(tokenizer):
    detokenizer = tokenizer.detokenizer()
    assert detokenizer.add_token(tokenizer.vocab_size + 5) == ""


def test_decode_skips_ids_past_the_tokenizer(tokenizer):
    ids = tokenizer.encode("Once upon", add_bos=False)
    assert tokenizer.decode(ids + [tokenizer.vocab_size + 3]) == "Once upon"
