"""The task-accuracy scoring core (mlx_openelm.evaluation.scoring): lm-eval's HF-backend rules, checked
against an unbatched reference (one full forward per request), on the tiny model and the trained one."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import load
from mlx_openelm.errors import OptionError
from mlx_openelm.evaluation.requests import loglikelihood_rolling, rolling_windows
from mlx_openelm.evaluation.scoring import (
    check_batch_size,
    encode_pair,
    score,
    score_tokens,
)

CONTEXTS = ["The cat sat on the", "Question: what is two plus two?\nAnswer:", "A long story about a boat " * 4,
            "Hello ", "x"]
CONTINUATIONS = [" mat", " dog and the bird", " 4", " five hundred", " A"]
REQUESTS = [(c, k) for c in CONTEXTS for k in CONTINUATIONS] + [("", "Hello world"), ("Trailing  ", "space")]


@pytest.fixture(scope="module", params=["tiny", "trained"])
def model_and_tokenizer(request):
    if request.param == "tiny":
        return request.getfixturevalue("loaded")
    return load(request.getfixturevalue("trained_model_path"), dtype="float32")


@pytest.fixture(scope="module")
def expected(model_and_tokenizer):
    """REQUESTS' reference scores (computed once per model)."""
    model, tokenizer = model_and_tokenizer
    return reference_scores(model, [encode_pair(tokenizer, c, k) for c, k in REQUESTS])


def reference_scores(model, pairs):
    """One unbatched full forward per request over lm-eval's truncated input."""
    out = []
    limit = model.args.max_context_length
    for context, continuation in pairs:
        inputs = (list(context) + list(continuation))[-(limit + 1):][:-1]
        logits = model(mx.array([inputs]))[0][-len(continuation):].astype(mx.float32)
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(list(continuation))
        out.append((mx.take_along_axis(log_probs, targets[:, None], axis=-1).sum().item(),
                    bool(mx.all(log_probs.argmax(-1) == targets).item())))
    return out


def assert_close(scores, reference, tol=1e-4):
    assert len(scores) == len(reference)
    for (logprob, greedy), (ref_logprob, ref_greedy) in zip(scores, reference):
        assert abs(logprob - ref_logprob) <= tol * max(1.0, abs(ref_logprob) / 100)
        assert greedy == ref_greedy


@pytest.mark.parametrize("share, batch_size", [(True, 1), (True, 3), (False, 3), (False, "auto")])
def test_batched_scores_equal_the_unbatched_reference(model_and_tokenizer, expected, share, batch_size):
    model, tokenizer = model_and_tokenizer
    if batch_size == 1 and model.args.vocab_size > 1000:
        pytest.skip("batch size 1 is checked on the tiny model (the trained one is slow on CPU)")
    scores = score(model, tokenizer, REQUESTS, batch_size=batch_size, share_prefixes=share)
    assert_close(scores, expected, tol=1e-4)
    assert scores.truncated == 0


def test_prefix_sharing_agrees_with_plain_batches(model_and_tokenizer, expected):
    model, tokenizer = model_and_tokenizer
    shared = score(model, tokenizer, REQUESTS, share_prefixes=True)
    plain = score(model, tokenizer, REQUESTS, share_prefixes=False)
    assert_close(shared, expected)
    assert max(abs(a[0] - b[0]) for a, b in zip(shared, plain)) <= 1e-4
    for c in range(len(CONTEXTS)):  # the same answer chosen in every group of choices
        group = slice(c * len(CONTINUATIONS), (c + 1) * len(CONTINUATIONS))
        assert np.argmax([s[0] for s in shared[group]]) == np.argmax([s[0] for s in plain[group]])


def test_trailing_spaces_move_to_the_continuation(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    context, continuation = encode_pair(tokenizer, "Answer:  ", "yes")
    assert context == tokenizer.encode("Answer:", add_bos=True)  # BOS whatever the folder says, as Apple ran
    assert context + continuation == tokenizer.encode("Answer:  yes", add_bos=True)
    assert context[0] == tokenizer.bos_id and tokenizer.bos_id not in continuation


@pytest.mark.parametrize("which", ["eos", "bos"])
def test_an_empty_context_is_the_prefix_token(model_and_tokenizer, which):
    model, tokenizer = model_and_tokenizer
    context, continuation = encode_pair(tokenizer, "", "Hello world", empty_context=which)
    assert context == [tokenizer.eos_id if which == "eos" else tokenizer.bos_id]
    assert continuation == tokenizer.encode("Hello world", add_bos=False)
    (got,) = score(model, tokenizer, [("", "Hello world")], empty_context=which)
    assert_close([got], reference_scores(model, [(context, continuation)]))


def test_long_requests_are_left_truncated_as_lm_eval_does(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    short = dataclasses.replace(model.args, max_context_length=24)
    original, model.args = model.args, short
    try:
        pairs = [(tokenizer.encode("one two three four five six seven eight nine ten " * 3), [5, 6, 7]),
                 (tokenizer.encode("a short one"), [8, 9]),
                 (tokenizer.encode("one two three four five six seven eight nine ten " * 3), [5, 6, 9])]
        scores = score_tokens(model, pairs)
        assert scores.truncated == 2
        assert_close(scores, reference_scores(model, pairs))  # the reference slices (ctx+cont)[-(L+1):][:-1]
        with pytest.raises(OptionError, match="continuation of 30 tokens"):
            score_tokens(model, [([1], list(range(3, 33)))])
    finally:
        model.args = original


def test_rolling_windows_are_lm_evals(model_and_tokenizer):
    utils = pytest.importorskip("lm_eval.utils")
    for n, length in [(1, 8), (7, 8), (8, 8), (9, 8), (30, 8), (17, 4)]:
        tokens = list(range(10, 10 + n))
        expected = [utils.make_disjoint_window(w) for w in
                    utils.get_rolling_token_windows(tokens, prefix_token=2, max_seq_len=length, context_len=1)]
        assert rolling_windows(tokens, 2, length) == [(list(a), list(b)) for a, b in expected]


def test_rolling_loglikelihood_sums_every_token_once(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    (total,) = loglikelihood_rolling(model, tokenizer, [text])
    tokens = [tokenizer.eos_id] + tokenizer.encode(text, add_bos=True)
    logits = model(mx.array([tokens[:-1]]))[0].astype(mx.float32)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = mx.take_along_axis(log_probs, mx.array(tokens[1:])[:, None], axis=-1).sum().item()
    assert total == pytest.approx(expected, abs=1e-3)


def test_one_token_answers_share_one_row(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    from mlx_openelm.evaluation import scoring

    calls = []
    real = scoring._hidden
    monkeypatch.setattr(scoring, "_hidden",
                        lambda m, tokens, *a, **k: calls.append(tokens.shape) or real(m, tokens, *a, **k))
    requests = [("Question: pick one.\nAnswer:", f" {letter}") for letter in "ABCD"]
    if any(len(encode_pair(tokenizer, *r)[1]) != 1 for r in requests):
        pytest.skip("this tokenizer has no one-token ' A'..' D'")
    scores = score(model, tokenizer, requests)
    assert calls == [(1, len(encode_pair(tokenizer, *requests[0])[0]))]  # one forward, one row
    assert_close(scores, reference_scores(model, [encode_pair(tokenizer, c, k) for c, k in requests]))


@pytest.mark.parametrize("value, expected", [(1, 1), ("8", 8), ("auto", "auto")])
def test_batch_size_values(value, expected):
    assert check_batch_size(value) == expected


@pytest.mark.parametrize("value", [0, -2, "big", "1.5", None])
def test_bad_batch_sizes_are_refused(value):
    with pytest.raises(OptionError, match="batch size must be a positive whole number or 'auto'"):
        check_batch_size(value)


def test_the_head_in_slices_gives_the_same_scores(loaded, monkeypatch):
    from mlx_openelm.evaluation import scoring

    model, tokenizer = loaded
    whole = score(model, tokenizer, REQUESTS)
    monkeypatch.setattr(scoring, "HEAD_ROWS", 3)  # fewer positions than one request's continuation
    sliced = score(model, tokenizer, REQUESTS)
    assert [g for _, g in sliced] == [g for _, g in whole]
    assert max(abs(a[0] - b[0]) for a, b in zip(sliced, whole)) <= 1e-5


def test_a_forwards_padding_costs_at_most_one_more_forward(model_and_tokenizer, monkeypatch):
    from mlx_openelm.evaluation import scoring

    model, tokenizer = model_and_tokenizer
    shapes = []
    real = scoring._hidden
    monkeypatch.setattr(scoring, "_hidden", lambda m, tokens, *a, **k: shapes.append(
        (tokens.shape[1], [int((row != 0).sum()) for row in np.array(tokens)])) or real(m, tokens, *a, **k))
    words = ("one two three four five six seven eight nine ten eleven twelve " * 6).split()
    requests = [(" ".join(words[: 2 + n * 5 % 61]), " " + " ".join(words[: 1 + n * 7 % 45])) for n in range(10)]
    for share in (True, False):
        shapes.clear()
        scores = score(model, tokenizer, requests, share_prefixes=share)
        assert_close(scores, reference_scores(model, [encode_pair(tokenizer, c, k) for c, k in requests]))
        for width, lengths in shapes:  # token 0 is never in these texts: non-zero ids are the real tokens
            assert sum(width - n for n in lengths) <= scoring.FORWARD_TOKENS
