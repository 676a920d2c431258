"""The KV cache against a plain list model of it, under random update/trim sequences; truncate, copy,
and a batch cache built from single-sequence caches."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.cache import KVCache, batch_caches, cached_length, copy_caches
from mlx_openelm.errors import ContextLengthError
from mlx_openelm.model import make_cache


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


def _filled(rng, length: int) -> tuple[KVCache, np.ndarray]:
    cache = KVCache(num_kv_heads=2, head_dim=4, max_length=64, step=8)
    k = _chunk(rng, length)
    cache.update_and_fetch(mx.array(k), mx.array(-k))
    return cache, k


def test_truncate_keeps_the_first_positions_and_trim_drops_the_last():
    cache, k = _filled(np.random.default_rng(1), 10)
    assert cache.truncate(4) == 6 and cache.offset == 4
    assert cache.truncate(10) == 0 and cache.offset == 4  # nothing past what it holds
    assert cache.trim(1) == 1 and cache.offset == 3  # mlx-lm's meaning: the last n
    np.testing.assert_array_equal(np.array(cache.state[0]), k[:, :, :3])
    assert cache.trim(-2) == 0 and cache.truncate(-1) == 3 and cache.offset == 0


def test_a_copy_is_independent_of_its_source():
    rng = np.random.default_rng(2)
    cache, k = _filled(rng, 10)
    copy = cache.copy(6)
    assert copy.offset == 6 and cache.copy().offset == 10 and cache.copy(100).offset == 10
    assert cache.copy(0).state == ()
    more = _chunk(rng, 5)
    copy.update_and_fetch(mx.array(more), mx.array(more))
    cache.truncate(8)
    cache.update_and_fetch(mx.array(more[:, :, :1]), mx.array(more[:, :, :1]))
    np.testing.assert_array_equal(np.array(copy.state[0]), np.concatenate([k[:, :, :6], more], axis=2))
    np.testing.assert_array_equal(np.array(cache.state[0]), np.concatenate([k[:, :, :8], more[:, :, :1]], axis=2))
    np.testing.assert_array_equal(np.array(copy_caches([cache], 2)[0].state[1]), -k[:, :, :2])
    assert cached_length([cache, copy]) == 9


def test_a_batch_built_from_one_prefix_computes_each_row_as_alone(loaded):
    """B rows that start from one prefix cache (two of them cut shorter): one (B, 1) model call with
    the batch's mask gives each row the logits of its own cache alone."""
    model = loaded[0]
    prefix = make_cache(model)
    model(mx.array([[1, 40, 7, 250, 33, 12]]), cache=prefix)
    rows = [prefix, copy_caches(prefix, 3), prefix, copy_caches(prefix, 5)]
    batch = batch_caches(rows)
    assert [c.offset for c in prefix] == [6] * len(prefix)  # the rows' caches are not changed
    tokens = mx.array([[9], [17], [250], [2]])
    logits = model(tokens, cache=batch, mask=batch[0].mask(1))[:, -1]
    for i, row in enumerate(rows):
        own = model(tokens[i : i + 1], cache=copy_caches(row))[:, -1]
        np.testing.assert_allclose(np.array(logits[i]), np.array(own[0]), atol=1e-4)
    assert batch[0].offset.tolist() == [7, 4, 7, 6]


def test_take_repeats_rows_of_a_cache():
    """KVCache.take: row i of the copy is row rows[i] of the original, which is left as it was."""
    import mlx.core as mx

    from mlx_openelm.cache import KVCache

    cache = KVCache(num_kv_heads=2, head_dim=4, max_length=64, step=8)
    keys = mx.arange(2 * 2 * 3 * 4, dtype=mx.float32).reshape(2, 2, 3, 4)
    cache.update_and_fetch(keys, -keys)
    copy = cache.take(mx.array([1, 1, 0]))
    assert copy.offset == 3 and copy.keys.shape == (3, 2, 3, 4)
    assert mx.array_equal(copy.keys[0], keys[1]) and mx.array_equal(copy.keys[2], keys[0])
    assert mx.array_equal(copy.values[1], -keys[1])
    more = mx.ones((3, 2, 1, 4))
    k, _ = copy.update_and_fetch(more, more)  # the copy grows on its own
    assert k.shape == (3, 2, 4, 4) and cache.offset == 3 and cache.keys.shape[0] == 2


def test_take_with_room_appends_into_its_own_storage():
    from mlx_openelm.cache import KVCache

    cache = KVCache(num_kv_heads=1, head_dim=2, max_length=64, step=8)
    keys = mx.arange(2 * 1 * 3 * 2, dtype=mx.float32).reshape(2, 1, 3, 2)
    cache.update_and_fetch(keys, keys)
    copy = cache.take(mx.array([1, 0]), room=2)
    assert copy.offset == 3 and copy.capacity == 5  # not rounded up to the step of 8
    k, _ = copy.update_and_fetch(mx.ones((2, 1, 2, 2)), mx.ones((2, 1, 2, 2)))
    assert copy.capacity == 5 and k.shape == (2, 1, 5, 2)
    assert mx.array_equal(k[0, :, :3], keys[1]) and mx.array_equal(k[:, :, 3:], mx.ones((2, 1, 2, 2)))
