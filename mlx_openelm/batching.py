"""Batched decoding: requests that decode at the same time share one model call per token.

`batch_generate` completes a list of prompts this way (each with its own sampler, logits
processors, stop strings and token limit); the server's scheduler drives a `Batch` itself.

Each request's prompt is read in its own `KVCache`, as `generate_step` does, at most
`prefill_chunk` tokens per `Batch.step` so that the decoding rows keep getting a token every
step, then it joins the `Batch` as a row. Prompts waiting together that start from an empty
cache are read in one model call, right-padded (a token never attends to the padding after
it), and their caches split by row. A row's keys and values sit in one `BatchKVCache` per layer,
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

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import mlx.core as mx

from .cache import BatchKVCache, KVCache
from .errors import OptionError
from .generation import (GenerationStep, check_prompt, encode_prompt, prefill, stream_responses, token_budget,
                         wired_limit)
from .model import Model, make_cache
from .sampling import LogitsProcessor, Sampler, greedy, to_logprobs
from .stopping import normalize_stops
from .tokenizer import Tokenizer


PREFILL_CHUNK = 256  # prompt tokens read per step while other rows decode (0: a whole prompt at once)
PREFILL_STEP = 512  # the most prompt tokens in one model call (bounds the attention scores' memory)


def validate_prefill_chunk(value: int) -> int:
    """`prefill_chunk` as given, or an `OptionError` naming it (an integer >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"prefill_chunk must be an integer >= 0 (0: whole prompts at once), got {value!r}")
    return value


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
        limit = token_budget(self.model.args.max_context_length, prompt.size, max_tokens, cache[0].offset)
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
        budget -= self._read_together(budget)
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

    def _fresh_group(self, budget: int) -> list[Row]:
        """The oldest waiting rows, in order, that start from an empty cache and whose prompts (all but
        the last token), right-padded to the longest, fit in `budget` and in one model call."""
        group, longest = [], 0
        for row in self.waiting:
            n = row.prompt.size - 1
            padded = (len(group) + 1) * max(longest, n)
            if row.read or row.cache[0].offset or not 0 < n <= budget or padded > PREFILL_STEP:
                break
            group.append(row)
            longest, budget = max(longest, n), budget - n
        return group

    def _read_together(self, budget: int) -> int:
        """Read the prompts of the oldest fresh rows (`_fresh_group`) in one right-padded model call, where
        each prompt's tokens attend only to earlier ones, never to the padding after them; split the cache
        by row and join them. Returns the prompt tokens read: none when the call fails, and the rows are
        then read alone, which finds the one that fails."""
        group = self._fresh_group(budget)
        if len(group) < 2:
            return 0
        lengths = [row.prompt.size - 1 for row in group]
        tokens = mx.stack([mx.pad(row.prompt[:n], (0, max(lengths) - n)) for row, n in zip(group, lengths)])
        cache = make_cache(self.model)
        try:
            self.model(tokens, cache=cache)
            mx.eval([c.state for c in cache])
        except Exception:  # noqa: BLE001 - read alone below, where a row's own failure stays its own
            return 0
        for i, (row, n) in enumerate(zip(group, lengths)):
            own = [layer.take(mx.array([i])) for layer in cache]
            for layer in own:
                layer.truncate(n)
            row.read = n
            self.waiting.remove(row)
            self._join(row, own)
            row.cache = []
        mx.clear_cache()
        return sum(lengths)

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
                cache.rewind(length)  # the columns written past it are overwritten by the next step
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


@dataclass
class BatchResponse:
    """`batch_generate`'s results, one entry per prompt, in the prompts' order.

    `token_ids` are the tokens `stream_generate` would yield for that prompt alone (an ending
    EOS included); `texts` their text, cut before a stop string. `finish_reasons`: "stop" (EOS
    or a stop string) or "length" (the token limit or the model's context; also when no token
    fits). `logprobs` (with `return_logprobs`): each token's log-probability after the logits
    processors. `elapsed`: seconds from the first prompt read to the last token.
    """

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    logprobs: Optional[list[list[float]]]
    elapsed: float

    @property
    def generation_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.token_ids)


def _per_prompt(value, count: int, name: str, shared) -> list:
    """`value` for each of `count` prompts: one value for all when `shared(value)`, else one per prompt."""
    if shared(value):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise OptionError(f"{name} has {len(values)} entries for {count} prompts: give one, or one per prompt")
    return values


def _is_stop_strings(value) -> bool:
    return value is None or isinstance(value, str) or all(isinstance(s, str) for s in value)


def _check_limit(value, context: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise OptionError(f"max_tokens must be an integer >= 0 (or -1: until EOS or a full context), got {value!r}")
    return context if value == -1 else value


def batch_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[Union[str, Sequence[int], mx.array]],
    max_tokens: Union[int, Sequence[int]] = 256,
    *,
    sampler: Union[Sampler, Sequence[Optional[Sampler]], None] = None,
    logits_processors: Union[Sequence[LogitsProcessor], Sequence[Optional[Sequence[LogitsProcessor]]], None] = None,
    stop: Union[str, Sequence[str], Sequence[Union[str, Sequence[str], None]], None] = None,
    return_logprobs: bool = False,
    prefill_chunk: int = 0,
) -> BatchResponse:
    """Complete every prompt (text, which gets BOS, or token ids), decoding them together: one
    model call per step gives every unfinished prompt its next token.

    Each prompt's result is what `stream_generate` gives it alone, with the same options: the
    same tokens, log-probabilities equal up to float round-off. Every option is one value for
    all prompts or a list with one per prompt: `max_tokens` (an int; -1: until EOS or a full
    context), `sampler` (default greedy), `logits_processors` (a list of processors, or a list
    of such lists), `stop` (a string or a list of strings, or a list of such per prompt, None
    for none). A sampler with its own random state (`make_sampler(seed=...)`) draws for every
    row that shares it: give each prompt its own for the draws it would make alone.
    `prefill_chunk` > 0 reads at most that many prompt tokens a step (see `Batch`).
    """
    if isinstance(prompts, (str, mx.array)):
        raise OptionError("prompts must be a list of prompts (each a str or token ids), not one prompt")
    count = len(prompts)
    context = model.args.max_context_length
    ids = [check_prompt(encode_prompt(tokenizer, p), model).tolist() for p in prompts]
    limits = [_check_limit(m, context) for m in _per_prompt(max_tokens, count, "max_tokens", lambda v: isinstance(v, int))]
    samplers = _per_prompt(sampler, count, "sampler", lambda v: v is None or callable(v))
    processors = _per_prompt(logits_processors, count, "logits_processors",
                             lambda v: v is None or all(callable(p) for p in v))
    stops = [normalize_stops(s) for s in _per_prompt(stop, count, "stop", _is_stop_strings)]
    batch = Batch(model, prefill_chunk)
    rows = [batch.add(ids[i], make_cache(model), samplers[i] or greedy, processors[i] or (), limits[i])
            for i in range(count)]
    streams = [stream_responses(rows[i], tokenizer, len(ids[i]), limits[i], stops[i]) for i in range(count)]
    result = BatchResponse([""] * count, [[] for _ in ids], ["length"] * count, [len(i) for i in ids],
                           [[] for _ in ids] if return_logprobs else None, 0.0)
    tic = time.perf_counter()
    with wired_limit():
        pending = list(range(count))
        while pending:
            batch.step()
            pending = [i for i in pending if not _take(batch, rows[i], streams[i], result, i)]
    result.elapsed = time.perf_counter() - tic
    return result


def _take(batch: Batch, row: Row, stream, result: BatchResponse, i: int) -> bool:
    """Record row `i`'s response to the last step, if it has one; True when the row is finished."""
    if not row.ready:  # its prompt is still being read
        return False
    response = next(stream, None)
    if response is not None:
        result.texts[i] += response.text
        result.token_ids[i].append(response.token)
        if result.logprobs is not None:
            result.logprobs[i].append(response.logprobs[response.token].item())
    if response is not None and not response.finish_reason:
        return False
    result.finish_reasons[i] = response.finish_reason if response is not None else "length"
    if row in batch:
        batch.remove(row)
    return True
