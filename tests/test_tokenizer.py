"""Tokenizer conventions and the streaming detokenizer."""

from __future__ import annotations

import random

import pytest

from mlx_openelm.errors import PromptError
from mlx_openelm.tokenizer import Tokenizer, clean_text

from synthetic import TEXT_SAMPLES


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


@pytest.mark.parametrize("text", TEXT_SAMPLES)
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


def _from_raw(raw: bytes) -> str:
    """What Python makes of bytes from argv or a piped stdin: invalid bytes become lone surrogates."""
    return raw.decode("utf-8", errors="surrogateescape")


def test_text_with_invalid_utf8_is_refused_with_a_clear_error(tokenizer):
    text = _from_raw(b"caf\xe9 au lait")
    message = r"^prompt contains bytes that are not valid UTF-8 \(byte 0xe9 at character 3\)"
    with pytest.raises(PromptError, match=message):
        tokenizer.encode(text)
    with pytest.raises(ValueError, match=r"message 1 \(user\) contains bytes that are not valid UTF-8"):
        tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": text}])
    with pytest.raises(ValueError, match=r"lone surrogate U\+D83D at character 2"):
        tokenizer.encode("hi\ud83d")  # half of a surrogate pair, as from a JSON "\ud83d" escape


def test_clean_text_replaces_each_invalid_byte_and_says_so(tokenizer):
    cleaned, replaced = clean_text(_from_raw(b"caf\xe9 \xff\xfe ok \xe2\x82\xac"))
    assert (cleaned, replaced) == ("caf\ufffd \ufffd\ufffd ok \u20ac", True)
    assert cleaned == b"caf\xe9 \xff\xfe ok \xe2\x82\xac".decode("utf-8", errors="replace")
    assert tokenizer.decode(tokenizer.encode(cleaned)) == cleaned
    assert clean_text("Héllo 🎉") == ("Héllo 🎉", False)


def test_encode_wants_a_string(tokenizer):
    with pytest.raises(TypeError, match="prompt must be a str, got bytes"):
        tokenizer.encode(b"hi")
