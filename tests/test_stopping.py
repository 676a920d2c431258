"""Stop strings: StopMatcher on split text, and stream_generate(stop=...) on a tiny model."""

from __future__ import annotations

import random

import pytest

from mlx_openelm import load, stream_generate
from mlx_openelm.errors import OptionError
from mlx_openelm.stopping import StopMatcher, normalize_stops, partial_stop_length


def run_matcher(pieces, stops):
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def expected(text, stops):
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def test_stop_split_across_pieces_is_held_back_then_dropped():
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("Hello </") == "Hello "  # "</" could start the stop string
    assert matcher.feed("en") == ""
    assert matcher.feed("d> never shown") == ""
    assert matcher.stopped


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("a ST") == "a "
    assert matcher.feed("ORM") == "STORM"
    assert matcher.feed(" ST") == " "
    assert matcher.flush() == "ST"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    out, stopped = run_matcher(["xx bb yy aa"], ["aa", "bb"])
    assert stopped and "".join(out) == "xx "


def test_partial_stop_length():
    assert partial_stop_length("abc", ["cde"]) == 1
    assert partial_stop_length("abcd", ["bcdx", "dz"]) == 3
    assert partial_stop_length("abc", ["x"]) == 0


def test_random_splits_match_a_plain_search():
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(0, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        out, stopped = run_matcher(pieces, stops)
        assert ("".join(out), stopped) == expected(text, stops), (text, stops, pieces)


@pytest.mark.parametrize("bad", ["", [""], [3], ["ok", ""]])
def test_bad_stop_strings_are_refused(bad):
    with pytest.raises(OptionError, match="stop strings must be non-empty strings"):
        normalize_stops(bad)


@pytest.fixture(scope="module")
def model_and_tokenizer(hf_checkpoint):
    return load(hf_checkpoint, dtype="float32")


def test_stream_generate_stops_before_the_stop_string(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = "Once upon a time"
    full = [r for r in stream_generate(model, tokenizer, prompt, max_tokens=40)]
    text = "".join(r.text for r in full)
    assert len(text) > 12, "the tiny model should say something"
    stop = text[6:9]
    stopped = list(stream_generate(model, tokenizer, prompt, max_tokens=40, stop=["never-said", stop]))
    assert "".join(r.text for r in stopped) == text[: text.find(stop)]
    assert stopped[-1].finish_reason == "stop"
    assert len(stopped) < len(full)


def test_stream_generate_without_a_match_returns_everything(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = list(stream_generate(model, tokenizer, "Once upon a time", max_tokens=15))
    text = "".join(r.text for r in plain)
    assert text
    # a stop string that shares the text's last character is held back, then flushed at the end
    with_stop = list(stream_generate(model, tokenizer, "Once upon a time", max_tokens=15, stop=text[-1] + "\x00"))
    assert "".join(r.text for r in with_stop) == text
    assert with_stop[-1].finish_reason == plain[-1].finish_reason
