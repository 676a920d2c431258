"""Sampler masks, seeding, and repetition penalty arithmetic."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.sampling import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

PROBS = np.array([[0.05, 0.4, 0.1, 0.3, 0.15]])
LOGITS = mx.array(np.log(PROBS), dtype=mx.float32)


def _kept(logits: mx.array) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.array(logits)[0])).tolist())


def test_top_k_keeps_the_k_largest():
    assert _kept(apply_top_k(LOGITS, 2)) == {1, 3}
    assert _kept(apply_top_k(LOGITS, 0)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert _kept(apply_top_p(LOGITS, 0.5)) == {1, 3}  # 0.4 < 0.5, then 0.4+0.3 reaches it
    assert _kept(apply_top_p(LOGITS, 0.71)) == {1, 3, 4}
    assert _kept(apply_top_p(LOGITS, 0.01)) == {1}  # the top token always survives
    kept = np.array(apply_top_p(LOGITS, 0.5))[0]
    np.testing.assert_allclose(kept[[1, 3]], np.log([0.4, 0.3]), rtol=1e-6)


def test_min_p_is_relative_to_the_top_token():
    assert _kept(apply_min_p(LOGITS, 0.3)) == {1, 3, 4}  # >= 0.12
    assert _kept(apply_min_p(LOGITS, 0.5)) == {1, 3}


def test_temperature_zero_is_greedy():
    assert make_sampler(temp=0)(LOGITS).tolist() == [1]


def test_sampling_respects_masks_and_frequencies():
    sampler = make_sampler(temp=1.0, top_k=3, seed=0)
    draws = np.array(sampler(mx.repeat(LOGITS, 10000, axis=0)))  # one batched call: 10000 rows, one draw each
    assert draws.shape == (10000,)
    assert set(draws) <= {1, 3, 4}
    # renormalised over the top 3: 0.4/0.85, 0.3/0.85, 0.15/0.85
    freq = np.bincount(draws, minlength=5)[[1, 3, 4]] / len(draws)
    np.testing.assert_allclose(freq, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85], atol=0.025)  # ~5 sigma


def test_seed_makes_draws_reproducible():
    a, b = make_sampler(temp=1.0, seed=7), make_sampler(temp=1.0, seed=7)
    first = [a(LOGITS).item() for _ in range(50)]
    assert first == [b(LOGITS).item() for _ in range(50)]
    assert len(set(first)) > 1  # the key advances between draws


def test_low_temperature_sharpens():
    sampler = make_sampler(temp=0.05, seed=1)
    assert {sampler(LOGITS).item() for _ in range(100)} == {1}


def test_repetition_penalty_follows_hugging_face():
    logits = mx.array([[2.0, -2.0, 1.0, -1.0, 0.5]])
    seen = mx.array([0, 1, 1, 4])  # repeats count once
    out = np.array(make_repetition_penalty(1.25)(seen, logits))[0]
    np.testing.assert_allclose(out, [2.0 / 1.25, -2.0 * 1.25, 1.0, -1.0, 0.5 / 1.25], rtol=1e-6)


def test_repetition_penalty_one_is_off():
    assert make_logits_processors(1.0) == [] and make_logits_processors(None) == []
    assert len(make_logits_processors(1.2)) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temp": -1}, "temp must be"),
        ({"temp": math.nan}, "temp must be"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ({"min_p": 1.0}, "min_p must be in \\[0, 1\\)"),
        ({"temp": None}, "temp must be a number, got None"),
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({"top_p": "0.9"}, "top_p must be a number, got '0.9'"),
        ({"min_p": True}, "min_p must be a number, got True"),
    ],
)
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**kwargs)


@pytest.mark.parametrize("penalty", [0, -1.2, math.nan, math.inf, "1.2"])
def test_bad_repetition_penalty(penalty):
    with pytest.raises(ValueError, match="repetition_penalty must be a positive number"):
        make_repetition_penalty(penalty)
    with pytest.raises(ValueError, match="repetition_penalty must be a positive number"):
        make_logits_processors(penalty)
