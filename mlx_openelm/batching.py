"""Batched decoding: requests that decode at the same time share one model call per token.

Each request is prefilled alone (in its own `KVCache`, as `generate_step` does), then
joins a `Batch` as a row. A row's keys and values sit in one `BatchKVCache` per layer,
left-padded so that every row ends at the same column; a boolean mask keeps each row's
queries off its padding, and each row's RoPE positions are its own (RoPE is relative,
so a row computes what it would alone, up to float round-off). Every `Batch.step` feeds
each row its next token in one (B, 1) model call, then applies each row's own logits
processors (seeing that row's history) and sampler. A row leaves with its keys and values
handed back as a plain, unpadded `KVCache`, so a conversation cache can keep it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from .cache import KVCache
from .generation import GenerationStep, prefill, token_budget
from .model import Model
from .sampling import LogitsProcessor, Sampler, to_logprobs


def _pad_left(x: mx.array, n: int) -> mx.array:
    return mx.pad(x, [(0, 0), (0, 0), (n, 0), (0, 0)]) if n else x


class BatchKVCache:
    """One layer's keys and values for B rows, (B, num_kv_heads, length, head_dim).

    Row i's positions are the columns [padding[i], length); storage grows `step`
    columns at a time, as `KVCache`'s does.
    """

    step = 256

    def __init__(self, num_kv_heads: int, head_dim: int, max_length: int):
        self.num_kv_heads, self.head_dim, self.max_length = num_kv_heads, head_dim, max_length
        self.keys: Optional[mx.array] = None  # None while no row holds a position
        self.values: Optional[mx.array] = None
        self.length = 0
        self.padding: list[int] = []

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

    def remove(self, i: int) -> KVCache:
        """Take row `i` out; return its positions as a single-sequence `KVCache`."""
        start, end = self.padding[i], self.length
        row = KVCache(self.num_kv_heads, self.head_dim, self.max_length)
        if end > start:
            row.keys, row.values = self.keys[i : i + 1, :, start:end, :], self.values[i : i + 1, :, start:end, :]
            row.offset = end - start
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
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if end > capacity:
            spare = -(-end // self.step) * self.step - self.length
            shape = (keys.shape[0], self.num_kv_heads, spare, self.head_dim)
            self.keys = mx.concatenate([self._columns(self.keys, keys), mx.zeros(shape, keys.dtype)], axis=2)
            self.values = mx.concatenate([self._columns(self.values, values), mx.zeros(shape, values.dtype)], axis=2)
        self.keys[..., self.length : end, :] = keys
        self.values[..., self.length : end, :] = values
        self.length = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def mask(self, new: int) -> mx.array:
        """(B, 1, 1, length + new) booleans for `new` = 1 query per row: True on the row's own keys."""
        columns = mx.arange(self.length + new)[None, :]
        return (columns >= mx.array(self.padding)[:, None])[:, None, None, :]


class Row:
    """One request in a `Batch`; iterating it yields the `GenerationStep`s the batch computes for it.

    Each `Batch.step` leaves exactly one step to take; the iteration ends after `limit` steps.
    """

    def __init__(self, token: mx.array, history: mx.array, sampler: Sampler,
                 processors: Sequence[LogitsProcessor], limit: int):
        self.token = token  # (1,) the next token to feed
        self.history = history  # the tokens the logits processors see (each fed token is appended)
        self.sampler, self.processors, self.limit = sampler, list(processors), limit
        self.produced = 0
        self.current: Optional[GenerationStep] = None

    def __iter__(self):
        return self

    def __next__(self) -> GenerationStep:
        if self.current is None:
            if self.produced >= self.limit:
                raise StopIteration
            raise RuntimeError("a batch row was read before the batch stepped")
        step, self.current = self.current, None
        return step

    def logprobs(self, logits: mx.array) -> mx.array:
        """This row's (1, vocab) log-probabilities from its (1, vocab) logits, its history updated."""
        if self.processors:
            self.history = mx.concatenate([self.history, self.token])
        return to_logprobs(logits, self.history, self.processors)


class Batch:
    """The rows decoding together on `model`; see the module docstring."""

    def __init__(self, model: Model):
        self.model = model
        args = model.args
        self.caches = [BatchKVCache(kv, args.head_dim, args.max_context_length) for kv in args.num_kv_heads]
        self.rows: list[Row] = []

    def add(self, prompt: Sequence[int], cache: Sequence[KVCache], sampler: Sampler,
            processors: Sequence[LogitsProcessor], max_tokens: int, cached_ids: Sequence[int] = (),
            prefill_step_size: int = 512) -> Row:
        """Prefill `prompt` after what `cache` holds (in `cache`, alone), then join the batch.

        `cached_ids` are the tokens `cache` already holds: the logits processors see them, as
        with `generate_step`'s `cached_ids`.
        The row's first token comes with the next `step`. Raises `ContextLengthError` when
        the prompt does not fit; a row with no token to generate never joins.
        """
        prompt = mx.array(prompt, dtype=mx.uint32)
        limit = token_budget(self.model, cache, prompt.size, max_tokens)
        tail = prefill(self.model, prompt, cache, prefill_step_size) if limit else prompt[-1:]
        history = mx.array([*cached_ids, *prompt[: prompt.size - 1].tolist()], dtype=mx.uint32)
        row = Row(tail, history, sampler, processors, limit)
        if limit:
            for batch_cache, layer_cache in zip(self.caches, cache):
                batch_cache.add(layer_cache)
            self.rows.append(row)
        return row

    def remove(self, row: Row) -> list[KVCache]:
        """Take `row` out; return its layer caches (prompt and the tokens fed so far), unpadded."""
        i = self.rows.index(row)
        del self.rows[i]
        return [c.remove(i) for c in self.caches]

    def step(self) -> None:
        """One model call for every row: each row's next `GenerationStep` becomes ready to take."""
        if not self.rows:
            return
        tokens = mx.concatenate([row.token for row in self.rows])[:, None]
        mask = self.caches[0].mask(1)
        logits = self.model(tokens, cache=self.caches, mask=mask)[:, -1, :].astype(mx.float32)
        results = []
        for i, row in enumerate(self.rows):
            logprobs = row.logprobs(logits[i : i + 1])
            row.token = row.sampler(logprobs)
            results.append((row.token, logprobs))
        mx.eval(results)
        for row, (token, logprobs) in zip(self.rows, results):
            row.produced += 1
            row.current = GenerationStep(int(token.item()), logprobs.squeeze(0), last=row.produced == row.limit,
                                         target_forward_passes=row.produced)
