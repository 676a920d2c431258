"""The KV cache and its reuse rules, in one place.

- `KVCache`: one attention layer's keys and values for one sequence, grown in fixed steps
  rather than per token; `truncate` (keep the first positions) and `copy` are the only ways
  other modules change or duplicate what it holds.
- `BatchKVCache`: one layer's keys and values for several sequences of different lengths,
  left-padded so that every row ends at the same column (batched decoding, `batching`).
- `common_prefix_length`, `reusable_prefix_length`: how much of a cache a new prompt can reuse.
- `PromptCache`: the caches of the last few finished requests, keyed by the token ids they hold.

A model's cache is a list of layer caches (`model.make_cache`); the list functions
(`truncate_caches`, `copy_caches`, `cached_length`, `batch_caches`) work on such lists.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import mlx.core as mx

from .errors import ContextLengthError

STEP = 256  # positions the storage grows by at a time


def _append(storage: Optional[mx.array], used: int, new: mx.array, step: int) -> mx.array:
    """`storage` (B, H, capacity, hd) with `new` (B, H, L, hd) written from column `used` on.

    When the columns run out, the storage is rebuilt from its first `used` columns (the rest
    may be stale, after a truncate) plus zeros, rounded up to whole `step`s.
    """
    end = used + new.shape[2]
    if storage is None or end > storage.shape[2]:
        B, H, _, D = new.shape
        spare = mx.zeros((B, H, -(-end // step) * step - used, D), new.dtype)
        storage = spare if storage is None or used == 0 else mx.concatenate([storage[..., :used, :], spare], axis=2)
    storage[..., used:end, :] = new
    return storage


def _with_room(array: mx.array, room: int) -> mx.array:
    if room <= 0:
        return array
    B, H, _, D = array.shape
    return mx.concatenate([array, mx.zeros((B, H, room, D), array.dtype)], axis=2)


class KVCache:
    """Keys and values of one attention layer, shaped (B, num_kv_heads, T, head_dim).

    Storage grows ``step`` positions at a time; ``offset`` is the number of valid
    positions (and the RoPE position of the next token).
    """

    step = STEP

    def __init__(self, num_kv_heads: int, head_dim: int, max_length: int, step: int | None = None):
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        if step is not None:
            self.step = step
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, Hkv, L, hd) keys/values; return everything cached so far."""
        _, num_heads, L, head_dim = keys.shape
        if (num_heads, head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"cache holds {self.num_kv_heads} heads of size {self.head_dim}, got {num_heads} of size {head_dim}"
            )
        end = self.offset + L
        if end > self.max_length:
            raise ContextLengthError(
                f"context is full: {self.offset} cached + {L} new tokens exceed the model's "
                f"context of {self.max_length} tokens"
            )
        self.keys = _append(self.keys, self.offset, keys, self.step)
        self.values = _append(self.values, self.offset, values, self.step)
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def truncate(self, length: int) -> int:
        """Keep the first `length` positions (all of them when it holds fewer); returns how many were dropped.

        The one rule for forgetting positions. It is named apart from `trim`, which keeps
        mlx-lm's meaning (drop the last n) for callers written against mlx-lm's caches, so
        neither reading is ever mistaken for the other.
        """
        dropped = max(0, self.offset - max(0, length))
        self.offset -= dropped
        return dropped

    def trim(self, n: int) -> int:
        """Forget the last `n` positions, as mlx-lm's caches do; returns how many were dropped."""
        return self.truncate(self.offset - max(0, n))

    def copy(self, length: Optional[int] = None) -> "KVCache":
        """A new cache holding the first `length` positions of this one (default: all); this one is unchanged."""
        length = self.offset if length is None else max(0, min(length, self.offset))
        new = KVCache(self.num_kv_heads, self.head_dim, self.max_length, self.step)
        if length:
            new._hold(self.keys[..., :length, :], self.values[..., :length, :])
        return new

    def _hold(self, keys: mx.array, values: mx.array) -> None:
        """Hold exactly these (B, Hkv, T, hd) keys and values (storage grows on the next append)."""
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def take(self, rows: mx.array, room: int = 0) -> "KVCache":
        """A new cache whose batch row i is a copy of this cache's row `rows[i]` (e.g. one prompt's
        keys and values repeated for several continuations); this cache is unchanged.

        `room`: positions the copy's storage has free after the copied ones, so that appending that
        many allocates nothing more (without it the first append rounds the storage up to a whole step).
        """
        copy = KVCache(self.num_kv_heads, self.head_dim, self.max_length, self.step)
        if self.keys is not None:
            copy.keys, copy.values = (_with_room(a[rows, :, : self.offset, :], room) for a in (self.keys, self.values))
            copy.offset = self.offset
        return copy


def cached_length(caches: Sequence[KVCache]) -> int:
    """The positions every layer of a model's cache holds (layers can be uneven after an interrupt)."""
    return min((c.offset for c in caches), default=0)


def truncate_caches(caches: Sequence[KVCache], length: int) -> None:
    """Keep the first `length` positions of every layer cache (see `KVCache.truncate`)."""
    for c in caches:
        c.truncate(length)


def copy_caches(caches: Sequence[KVCache], length: Optional[int] = None) -> list[KVCache]:
    """New layer caches holding the first `length` positions of `caches` (which stay as they were)."""
    return [c.copy(length) for c in caches]


def _pad_left(x: mx.array, n: int) -> mx.array:
    return mx.pad(x, [(0, 0), (0, 0), (n, 0), (0, 0)]) if n else x


class BatchKVCache:
    """One layer's keys and values for B rows, (B, num_kv_heads, length, head_dim).

    Row i's positions are the columns [padding[i], length); storage grows `step`
    columns at a time, as `KVCache`'s does. Rows come from, and leave as, `KVCache`s.
    """

    step = STEP

    def __init__(self, num_kv_heads: int, head_dim: int, max_length: int):
        self.num_kv_heads, self.head_dim, self.max_length = num_kv_heads, head_dim, max_length
        self.keys: Optional[mx.array] = None  # None while no row holds a position
        self.values: Optional[mx.array] = None
        self.length = 0
        self.padding: list[int] = []

    @classmethod
    def from_caches(cls, caches: Sequence[KVCache]) -> "BatchKVCache":
        """One row per cache, in order (the caches are not changed; the same one may come twice)."""
        first = caches[0]
        batch = cls(first.num_kv_heads, first.head_dim, first.max_length)
        for cache in caches:
            batch.add(cache)
        return batch

    @property
    def offset(self) -> mx.array:
        """Each row's own length: the RoPE position of its next token, shape (B,)."""
        return mx.array([self.length - p for p in self.padding], dtype=mx.int32)

    def _columns(self, array: Optional[mx.array], like: mx.array) -> mx.array:
        if array is None:
            return mx.zeros((len(self.padding), self.num_kv_heads, self.length, self.head_dim), like.dtype)
        return array[..., : self.length, :]

    def add(self, cache: KVCache) -> None:
        """Append a row holding `cache`'s positions (a single-sequence cache; it is not changed)."""
        n = cache.offset
        if n == 0:
            if self.keys is not None:
                pad = mx.zeros((1, self.num_kv_heads, self.length, self.head_dim), self.keys.dtype)
                self.keys = mx.concatenate([self._columns(self.keys, pad), pad])
                self.values = mx.concatenate([self._columns(self.values, pad), pad])
            self.padding.append(self.length)
            return
        keys, values = cache.state
        grow = max(0, n - self.length)  # a row longer than the batch pads every other row further
        old_keys = _pad_left(self._columns(self.keys, keys), grow)
        old_values = _pad_left(self._columns(self.values, values), grow)
        self.length += grow
        self.padding = [p + grow for p in self.padding] + [self.length - n]
        self.keys = mx.concatenate([old_keys, _pad_left(keys, self.length - n)])
        self.values = mx.concatenate([old_values, _pad_left(values, self.length - n)])

    def remove(self, i: int, keep: bool = True) -> KVCache:
        """Take row `i` out; return its positions as a single-sequence `KVCache` (empty unless `keep`)."""
        start, end = self.padding[i], self.length
        row = KVCache(self.num_kv_heads, self.head_dim, self.max_length)
        if keep and end > start:
            row._hold(self.keys[i : i + 1, :, start:end, :], self.values[i : i + 1, :, start:end, :])
            mx.eval(row.keys, row.values)  # copies: the row must not keep the batch's storage alive
        del self.padding[i]
        keep = [j for j in range(len(self.padding) + 1) if j != i]
        drop = min(self.padding, default=self.length)  # columns that are padding in every row left
        if not keep or drop == self.length:
            self.keys = self.values = None
            self.length, self.padding = 0, [0] * len(keep)
            return row
        index = mx.array(keep)
        self.keys = self.keys[index, :, drop : self.length, :]
        self.values = self.values[index, :, drop : self.length, :]
        self.length -= drop
        self.padding = [p - drop for p in self.padding]
        return row

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append one (B, Hkv, L, hd) chunk to every row; return all columns so far."""
        end = self.length + keys.shape[2]
        self.keys = _append(self.keys, self.length, keys, self.step)
        self.values = _append(self.values, self.length, values, self.step)
        self.length = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def rewind(self, length: int) -> None:
        """Forget the columns from `length` on in every row (a failed step's), keeping each row's padding."""
        self.length = min(self.length, length)

    def mask(self, new: int) -> mx.array:
        """(B, 1, 1, length + new) booleans for `new` = 1 query per row: True on the row's own keys."""
        columns = mx.arange(self.length + new)[None, :]
        return (columns >= mx.array(self.padding)[:, None])[:, None, None, :]


def batch_caches(rows: Sequence[Sequence[KVCache]]) -> list[BatchKVCache]:
    """A model's batch cache (one `BatchKVCache` per layer) from each row's layer caches.

    Rows may share caches: `batch_caches([prefix] * B)` gives B rows that all start from `prefix`.
    """
    return [BatchKVCache.from_caches(layer) for layer in zip(*rows)]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_prefix_length(cached_ids: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens of `prompt` a KV cache holding `cached_ids` lets generation skip: the
    common prefix, but never all of `prompt` (its last token must go through the model to give the
    first new token's logits). The one cache-reuse rule of `ChatSession` and the server."""
    return max(0, min(common_prefix_length(cached_ids, prompt), len(prompt) - 1))


class PromptCache:
    """The KV caches of the last few finished requests, keyed by the token ids they hold."""

    def __init__(self, new_cache: Callable[[], list[KVCache]], capacity: int = 4):
        self.new_cache = new_cache
        self.capacity = capacity
        self.entries: list[tuple[list[int], list[KVCache]]] = []  # least recently used first

    def fetch(self, prompt: list[int]) -> tuple[list[KVCache], int]:
        """A cache for `prompt` and how many of its first tokens it already holds (never all of them:
        the last prompt token must go through the model to give the first new token's logits)."""
        best, length = None, 0
        for i, (ids, _) in enumerate(self.entries):
            n = reusable_prefix_length(ids, prompt)
            if n > length:
                best, length = i, n
        if best is None:
            return self.new_cache(), 0
        entry = self.entries.pop(best)
        self.entries.append(entry)  # most recently used
        return copy_caches(entry[1], length), length

    def store(self, ids: list[int], cache: list[KVCache]) -> None:
        """Keep `cache`, which holds `ids` (positions past them are dropped), evicting the least recently used."""
        if self.capacity <= 0 or not ids:
            return
        truncate_caches(cache, len(ids))
        # An entry whose ids are a prefix of `ids` is superseded (the previous turn of this chat).
        self.entries = [(e, c) for e, c in self.entries if common_prefix_length(e, ids) < len(e)]
        self.entries.append((ids, cache))
        del self.entries[: max(0, len(self.entries) - self.capacity)]
