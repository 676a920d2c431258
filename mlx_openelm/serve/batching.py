"""Batched decoding: requests that decode at the same time share one model call per token.

Each request's prompt is read alone (in its own `KVCache`, as `generate_step` does), at
most `prefill_chunk` tokens per `Batch.step` so that the decoding rows keep getting a
token every step, then it joins the `Batch` as a row. A row's keys and values sit in one `BatchKVCache` per layer,
left-padded so that every row ends at the same column; a boolean mask keeps each row's
queries off its padding, and each row's RoPE positions are its own (RoPE is relative,
so a row computes what it would alone, up to float round-off). Every `Batch.step` feeds
each row its next token in one (B, 1) model call, then applies each row's own logits
processors (seeing that row's history) and sampler. A row leaves with its keys and values
handed back as a plain, unpadded `KVCache`, so a conversation cache can keep it.

A failure in a step stays with the rows it belongs to: a row whose logits processors or
sampler raise keeps that error (reading the row raises it) and leaves the batch, its caches
dropped unread, while the others step on. When the shared model call itself raises while
its graph is built, the step is undone and each row is run alone: a row whose own call
raises fails, the others get their token (what they would have computed together). A
failure while MLX evaluates the shared call cannot be traced to one row: every row gets it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from ..cache import KVCache
from ..errors import OptionError
from ..generation import GenerationStep, prefill, token_budget
from ..model import Model
from ..sampling import LogitsProcessor, Sampler, to_logprobs


PREFILL_CHUNK = 256  # prompt tokens read per step while other rows decode (0: a whole prompt at once)
PREFILL_STEP = 512  # the most prompt tokens in one model call (bounds the attention scores' memory)


def validate_prefill_chunk(value: int) -> int:
    """`prefill_chunk` as given, or an `OptionError` naming it (an integer >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"prefill_chunk must be an integer >= 0 (0: whole prompts at once), got {value!r}")
    return value


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

    def remove(self, i: int, keep: bool = True) -> KVCache:
        """Take row `i` out; return its positions as a single-sequence `KVCache` (empty unless `keep`)."""
        start, end = self.padding[i], self.length
        row = KVCache(self.num_kv_heads, self.head_dim, self.max_length)
        if keep and end > start:
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

    Once its prompt is read, each `Batch.step` leaves exactly one step to take (see `ready`);
    the iteration ends after `limit` steps.
    """

    def __init__(self, prompt: mx.array, cache: Sequence[KVCache], history: mx.array, sampler: Sampler,
                 processors: Sequence[LogitsProcessor], limit: int):
        self.prompt, self.cache, self.read = prompt, list(cache), 0  # while waiting: its own cache, tokens read
        self.token = prompt[-1:]  # (1,) the next token to feed (the prompt's last, once the rest is read)
        self.history = history  # the tokens the logits processors see (each fed token is appended)
        self.sampler, self.processors, self.limit = sampler, list(processors), limit
        self.produced = 0
        self.current: Optional[GenerationStep] = None
        self.error: Optional[Exception] = None  # why this row failed; it steps no further

    @property
    def ready(self) -> bool:
        """Whether reading the row now gives a step, its end, or its error (not: its prompt is still being read)."""
        return self.error is not None or self.current is not None or self.produced >= self.limit

    def __iter__(self):
        return self

    def __next__(self) -> GenerationStep:
        if self.error is not None:
            raise self.error
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

    def __init__(self, model: Model, prefill_chunk: int = PREFILL_CHUNK):
        self.model = model
        self.prefill_chunk = validate_prefill_chunk(prefill_chunk)
        args = model.args
        self.caches = [BatchKVCache(kv, args.head_dim, args.max_context_length) for kv in args.num_kv_heads]
        self.rows: list[Row] = []
        self.waiting: list[Row] = []  # rows whose prompts are being read, oldest first

    def add(self, prompt: Sequence[int], cache: Sequence[KVCache], sampler: Sampler,
            processors: Sequence[LogitsProcessor], max_tokens: int, cached_ids: Sequence[int] = ()) -> Row:
        """Queue a row for `prompt`, read after what `cache` holds (in `cache`, alone) by the next
        steps, at most `prefill_chunk` prompt tokens a step; then it joins the batch.

        `cached_ids` are the tokens `cache` already holds: the logits processors see them, as
        with `generate_step`'s `cached_ids`. The row's first token comes with the step that reads
        the end of its prompt. Raises `ContextLengthError` when the prompt does not fit; a row
        with no token to generate never joins.
        """
        prompt = mx.array(prompt, dtype=mx.uint32)
        limit = token_budget(self.model, cache, prompt.size, max_tokens)
        history = mx.array([*cached_ids, *prompt[: prompt.size - 1].tolist()], dtype=mx.uint32)
        row = Row(prompt, cache, history, sampler, processors, limit)
        if limit:
            self.waiting.append(row)
        return row

    def __contains__(self, row: Row) -> bool:
        return row in self.rows or row in self.waiting

    def remove(self, row: Row) -> list[KVCache]:
        """Take `row` out; return its layer caches (prompt and the tokens fed so far), unpadded."""
        if row in self.waiting:
            self.waiting.remove(row)
            return row.cache
        i = self.rows.index(row)
        del self.rows[i]
        return [c.remove(i, keep=row.error is None) for c in self.caches]

    def _read_prompts(self) -> None:
        """Read up to `prefill_chunk` prompt tokens of the waiting rows, oldest first; rows whose
        prompt is read (all but its last token, which the step feeds) join the batch."""
        budget = self.prefill_chunk or self.model.args.max_context_length
        while self.waiting and budget:
            row = self.waiting[0]
            n = min(budget, row.prompt.size - 1 - row.read)
            try:
                if n:
                    prefill(self.model, row.prompt[row.read : row.read + n + 1], row.cache, PREFILL_STEP)
            except Exception as e:  # noqa: BLE001 - this row's own failure
                row.error = e
                self.waiting.pop(0)
                continue
            row.read += n
            budget -= n
            if row.read == row.prompt.size - 1:
                self._join(self.waiting.pop(0), row.cache)
                row.cache = []

    def _join(self, row: Row, cache: Sequence[KVCache]) -> None:
        for batch_cache, layer_cache in zip(self.caches, cache):
            batch_cache.add(layer_cache)
        self.rows.append(row)

    def step(self) -> None:
        """Read the next chunk of the waiting prompts, then one model call for every row: each
        row's next `GenerationStep` becomes ready to take (or, for a row that failed, its error:
        see the module docstring)."""
        self._read_prompts()
        if not self.rows:
            return
        lengths = [c.length for c in self.caches]
        try:
            tokens = mx.concatenate([row.token for row in self.rows])[:, None]
            logits = self.model(tokens, cache=self.caches, mask=self.caches[0].mask(1))[:, -1, :]
        except Exception:  # noqa: BLE001 - find the row it belongs to, if one
            for cache, length in zip(self.caches, lengths):
                cache.length = length  # the columns written past it are overwritten by the next step
            self._sample(self._forward_alone())
        else:
            self._sample([(row, logits[i : i + 1]) for i, row in enumerate(self.rows)])
        for row in [row for row in self.rows if row.error is not None]:
            self.remove(row)

    def _forward_alone(self) -> list[tuple[Row, mx.array]]:
        """Each row's model call alone, in its own cache; a row whose call raises fails and leaves."""
        rows = list(self.rows)
        caches = [self.remove(row) for row in rows]
        results = []
        for row, cache in zip(rows, caches):
            try:
                logits = self.model(row.token[None], cache=cache)[:, -1, :]
            except Exception as e:  # noqa: BLE001 - this row's own failure
                row.error = e
                continue
            self._join(row, cache)
            results.append((row, logits))
        return results

    def _sample(self, rows: list[tuple[Row, mx.array]]) -> None:
        """Apply each row's processors and sampler to its (1, vocab) logits; rows that raise fail."""
        results = []
        for row, logits in rows:
            try:
                logprobs = row.logprobs(logits.astype(mx.float32))
                results.append((row, row.sampler(logprobs), logprobs))
            except Exception as e:  # noqa: BLE001 - this row's own failure
                row.error = e
        try:
            mx.eval([r[1:] for r in results])
        except Exception:  # noqa: BLE001 - evaluated row by row to find which
            results = [r for r in results if _evaluates(*r)]
        for row, token, logprobs in results:
            row.token = token
            row.produced += 1
            row.current = GenerationStep(int(token.item()), logprobs.squeeze(0), last=row.produced == row.limit,
                                         target_forward_passes=row.produced)


def _evaluates(row: Row, *arrays: mx.array) -> bool:
    try:
        mx.eval(arrays)
    except Exception as e:  # noqa: BLE001 - this row's failure (or the shared call's: then every row's)
        row.error = e
        return False
    return True
