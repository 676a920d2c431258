"""The MLX model against an independent numpy forward, and cached decoding against the full forward."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import reference
from mlx_openelm import load_model, make_cache
from mlx_openelm.cache import KVCache
from mlx_openelm.errors import ContextLengthError
from synthetic import TINY_CONFIG, UNTIED_CONFIG, random_weights, write_hf_checkpoint

ATOL = 2e-4  # fp32 round-off on logits of magnitude ~50


def _tokens(n: int, seed: int = 0, vocab: int = TINY_CONFIG["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint, dtype="float32")


def test_matches_numpy_reference(model, tiny_weights):
    tokens = _tokens(40)
    expected = reference.forward(tiny_weights, TINY_CONFIG, tokens)
    logits = np.array(model(mx.array(tokens)[None]))[0]
    assert logits.shape == (40, TINY_CONFIG["vocab_size"])
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=1e-5)


def test_untied_head_without_qk_norm_matches_reference(untied_checkpoint, untied_weights):
    model = load_model(untied_checkpoint, dtype="float32")
    assert "lm_head" in model and "q_norm" not in model.layers[0].attn
    tokens = _tokens(17, seed=3)
    expected = reference.forward(untied_weights, UNTIED_CONFIG, tokens)
    np.testing.assert_allclose(np.array(model(mx.array(tokens)[None]))[0], expected, atol=ATOL, rtol=1e-5)


def test_non_glu_ffn_matches_reference(tmp_path):
    config = {**TINY_CONFIG, "ffn_with_glu": False}
    weights = random_weights(config, seed=5)
    model = load_model(write_hf_checkpoint(tmp_path / "noglu", config, weights), dtype="float32")
    tokens = _tokens(9, seed=4)
    expected = reference.forward(weights, config, tokens)
    np.testing.assert_allclose(np.array(model(mx.array(tokens)[None]))[0], expected, atol=ATOL, rtol=1e-5)


def test_rms_norm_eps_key_matches_reference(tmp_path):
    """A config's optional rms_norm_eps (Llama-style models: 1e-5) reaches every norm; a large one shows."""
    config = {**TINY_CONFIG, "rms_norm_eps": 0.5}
    weights = random_weights(config, seed=6)
    model = load_model(write_hf_checkpoint(tmp_path / "eps", config, weights), dtype="float32")
    tokens = _tokens(11, seed=7)
    expected = reference.forward(weights, config, tokens)
    np.testing.assert_allclose(np.array(model(mx.array(tokens)[None]))[0], expected, atol=ATOL, rtol=1e-5)
    default_eps = reference.forward(weights, TINY_CONFIG, tokens)
    assert np.abs(expected - default_eps).max() > 100 * ATOL  # the key changed the computation


def test_batch_rows_are_independent(model):
    tokens = np.stack([_tokens(12, seed=1), _tokens(12, seed=2)])
    batched = np.array(model(mx.array(tokens)))
    for row in range(2):
        single = np.array(model(mx.array(tokens[row])[None]))[0]
        np.testing.assert_allclose(batched[row], single, atol=1e-5)


def test_per_layer_kv_caches_hold_each_layers_heads(model):
    cache = make_cache(model)
    model(mx.array(_tokens(5))[None], cache=cache)
    shapes = [c.state[0].shape for c in cache]
    assert shapes == [(1, kv, 5, TINY_CONFIG["head_dim"]) for kv in TINY_CONFIG["num_kv_heads"]]
    assert [c.offset for c in cache] == [5, 5, 5]


@pytest.mark.parametrize("step", [256, 4])
def test_token_by_token_decode_equals_full_forward(model, step):
    """Across the cache's growth boundary (256 positions by default, every 4 with step=4)."""
    n = 270 if step == 256 else 23
    tokens = _tokens(n, seed=7)
    full = np.array(model(mx.array(tokens)[None]))[0]
    cache = make_cache(model)
    for c in cache:
        c.step = step
    rows = []
    for t in tokens:
        logits = model(mx.array([[int(t)]]), cache=cache)
        mx.eval(logits)
        rows.append(np.array(logits)[0, 0])
    assert cache[0].capacity >= n and cache[0].capacity % step == 0
    np.testing.assert_allclose(np.stack(rows), full, atol=ATOL, rtol=1e-5)


def test_chunked_prefill_then_decode_equals_full_forward(model):
    tokens = _tokens(30, seed=8)
    full = np.array(model(mx.array(tokens)[None]))[0]
    cache = make_cache(model)
    pieces, start = [], 0
    for size in (11, 1, 7, 1, 10):
        pieces.append(np.array(model(mx.array(tokens[start : start + size])[None], cache=cache))[0])
        start += size
    np.testing.assert_allclose(np.concatenate(pieces), full, atol=ATOL, rtol=1e-5)


def test_trim_rewinds_the_cache(model):
    tokens = _tokens(12, seed=9)
    cache = make_cache(model)
    model(mx.array(tokens[:10])[None], cache=cache)
    assert all(c.trim(4) == 4 for c in cache)
    assert cache[0].offset == 6
    resumed = np.array(model(mx.array(tokens[6:12])[None], cache=cache))[0]
    full = np.array(model(mx.array(tokens)[None]))[0]
    np.testing.assert_allclose(resumed, full[6:], atol=ATOL, rtol=1e-5)
    assert cache[0].trim(100) == 12


def test_context_length_is_enforced(tmp_path, tiny_weights):
    config = {**TINY_CONFIG, "max_context_length": 8}
    model = load_model(write_hf_checkpoint(tmp_path / "short", config, tiny_weights), dtype="float32")
    with pytest.raises(ContextLengthError, match="9 tokens exceed the model's context of 8"):
        model(mx.array(_tokens(9))[None])
    cache = make_cache(model)
    model(mx.array(_tokens(6))[None], cache=cache)
    with pytest.raises(ContextLengthError, match="6 cached \\+ 3 new tokens exceed the model's context of 8"):
        model(mx.array(_tokens(3))[None], cache=cache)


def test_cache_rejects_wrong_head_count():
    cache = KVCache(num_kv_heads=2, head_dim=16, max_length=64)
    with pytest.raises(ValueError, match="cache holds 2 heads of size 16, got 3 of size 16"):
        cache.update_and_fetch(mx.zeros((1, 3, 1, 16)), mx.zeros((1, 3, 1, 16)))
