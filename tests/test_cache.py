"""The KV cache against a plain list model of it, under random update/trim sequences."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.cache import KVCache
from mlx_openelm.errors import ContextLengthError


def _chunk(rng: np.random.Generator, length: int, heads: int = 2, head_dim: int = 4) -> np.ndarray:
    return rng.standard_normal((1, heads, length, head_dim)).astype(np.float32)


def test_update_after_trim_past_old_capacity():
    """update(300) -> trim(250) -> update(500) once left storage shorter than offset + L."""
    rng = np.random.default_rng(0)
    cache = KVCache(num_kv_heads=2, head_dim=4, max_length=2048)
    a, b = _chunk(rng, 300), _chunk(rng, 500)
    cache.update_and_fetch(mx.array(a), mx.array(a))
    cache.trim(250)
    keys, values = cache.update_and_fetch(mx.array(b), mx.array(b))
    expected = np.concatenate([a[:, :, :50], b], axis=2)
    assert keys.shape == (1, 2, 550, 4)
    np.testing.assert_array_equal(np.array(keys), expected)
    np.testing.assert_array_equal(np.array(values), expected)


@pytest.mark.parametrize("seed", range(8))
def test_random_updates_and_trims_match_a_list_model(seed):
    rng = np.random.default_rng(seed)
    max_length = 700
    step = int(rng.choice([1, 7, 64, 256]))
    cache = KVCache(num_kv_heads=2, head_dim=4, max_length=max_length, step=step)
    model_keys: list[np.ndarray] = []  # one (1, 2, 4) slice per cached position
    model_values: list[np.ndarray] = []
    for _ in range(40):
        if rng.random() < 0.6:
            length = int(rng.integers(1, 300))
            k, v = _chunk(rng, length), _chunk(rng, length)
            if len(model_keys) + length > max_length:
                with pytest.raises(ContextLengthError):
                    cache.update_and_fetch(mx.array(k), mx.array(v))
                continue
            keys, values = cache.update_and_fetch(mx.array(k), mx.array(v))
            model_keys += [k[:, :, i] for i in range(length)]
            model_values += [v[:, :, i] for i in range(length)]
            np.testing.assert_array_equal(np.array(keys), np.stack(model_keys, axis=2))
            np.testing.assert_array_equal(np.array(values), np.stack(model_values, axis=2))
        else:
            n = int(rng.integers(0, 400))
            dropped = cache.trim(n)
            assert dropped == min(n, len(model_keys))
            del model_keys[len(model_keys) - dropped :]
            del model_values[len(model_values) - dropped :]
        assert cache.offset == len(model_keys)
        assert cache.capacity >= cache.offset
        if model_keys:
            state_k, state_v = cache.state
            np.testing.assert_array_equal(np.array(state_k), np.stack(model_keys, axis=2))
            np.testing.assert_array_equal(np.array(state_v), np.stack(model_values, axis=2))
