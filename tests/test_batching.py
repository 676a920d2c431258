"""Batched decoding (`mlx_openelm.batching`) against each request decoded alone with `generate_step`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import generate_step, load, make_cache, make_logits_processors, make_sampler
from mlx_openelm.batching import PREFILL_CHUNK, Batch
from mlx_openelm.cache import BatchKVCache, KVCache
from mlx_openelm.errors import OptionError

PROMPTS = [
    [1, 40, 7, 250, 33, 12, 90],
    [1, 5],
    [1, 99, 100, 101, 17, 17, 17, 300, 2, 45, 61, 77, 8],
    [1, 200, 3, 3],
]


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load(hf_checkpoint, dtype="float32")[0]


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    join: int = 0  # the batch step before which it joins
    leave: Optional[int] = None  # cancelled after this many tokens
    penalty: Optional[float] = None
    temp: float = 0.0
    seed: Optional[int] = None
    fault: Optional[int] = None  # its sampler raises after this many tokens (in the batch only)
    tokens: list[int] = field(default_factory=list)
    error: Optional[Exception] = None
    logprobs: list[np.ndarray] = field(default_factory=list)
    cache: Optional[list[KVCache]] = None

    def sampler(self):
        return make_sampler(temp=self.temp, seed=self.seed)

    def batch_sampler(self):
        return self.sampler() if self.fault is None else faulty(self.sampler(), self.fault)


class InjectedFault(Exception):
    pass


def faulty(function, after: int):
    """`function`, raising `InjectedFault` from its call number `after + 1` on."""
    calls = []

    def call(*args):
        calls.append(args)
        if len(calls) > after:
            raise InjectedFault(f"call {len(calls)}")
        return function(*args)
    return call


def alone(model, request: Request):
    limit = request.fault if request.fault is not None else request.leave or request.max_tokens
    steps = list(generate_step(request.prompt, model, max_tokens=limit,
                               sampler=request.sampler(), logits_processors=make_logits_processors(request.penalty)))
    return [s.token for s in steps], [np.array(s.logprobs) for s in steps]


def together(model, requests: list[Request], prefill_chunk: int = 256) -> list[list[int]]:
    """Decode `requests` in one batch, each joining at its step and leaving when done or cancelled;
    return, for each step, which requests got a token."""
    batch, rows, served = Batch(model, prefill_chunk), {}, []
    step = 0
    while step == 0 or rows:
        for i, r in enumerate(requests):
            if r.join == step:
                rows[i] = batch.add(r.prompt, make_cache(model), r.batch_sampler(),
                                    make_logits_processors(r.penalty), r.max_tokens)
        batch.step()
        served.append([i for i, row in rows.items() if row.ready])
        for i, row in list(rows.items()):
            if not row.ready:  # its prompt is still being read
                continue
            try:
                s = next(row)
            except InjectedFault as e:
                assert row not in batch.rows  # a failed row has left
                requests[i].error = e
                del rows[i]
                continue
            requests[i].tokens.append(s.token)
            requests[i].logprobs.append(np.array(s.logprobs))
            if s.last or len(requests[i].tokens) == requests[i].leave:
                requests[i].cache = batch.remove(row)
                del rows[i]
        step += 1
        assert step < 200
    return served


def assert_same_as_alone(model, requests):
    for r in requests:
        tokens, logprobs = alone(model, r)
        assert r.tokens == tokens
        if tokens:
            np.testing.assert_allclose(np.stack(r.logprobs), np.stack(logprobs), atol=1e-4)


def test_rows_of_different_lengths_decode_as_they_would_alone(model):
    requests = [Request(p, max_tokens=10) for p in PROMPTS]
    together(model, requests)
    assert_same_as_alone(model, requests)


def test_rows_join_and_leave_mid_way(model):
    requests = [
        Request(PROMPTS[0], max_tokens=12),
        Request(PROMPTS[2], max_tokens=5, join=2, penalty=1.2),  # longer than the batch when it joins
        Request(PROMPTS[1], max_tokens=12, join=3, leave=4),  # cancelled
        Request(PROMPTS[3], max_tokens=6, join=9, penalty=1.5),  # joins after others left
    ]
    together(model, requests)
    assert [len(r.tokens) for r in requests] == [12, 5, 4, 6]
    assert_same_as_alone(model, requests)


def test_sampled_rows_keep_their_own_seeded_draws(model):
    requests = [Request(p, max_tokens=8, temp=1.0, seed=i, penalty=1.2) for i, p in enumerate(PROMPTS)]
    together(model, requests)
    assert_same_as_alone(model, requests)
    assert len({tuple(r.tokens) for r in requests}) > 1


def test_a_row_whose_sampler_raises_fails_alone(model):
    requests = [Request(PROMPTS[0], max_tokens=10), Request(PROMPTS[2], max_tokens=10, fault=3, penalty=1.2),
                Request(PROMPTS[3], max_tokens=10, join=1, fault=0), Request(PROMPTS[1], max_tokens=8, join=2)]
    together(model, requests)
    assert [len(r.tokens) for r in requests] == [10, 3, 0, 8]
    assert [r.error is not None for r in requests] == [False, True, True, False]
    assert_same_as_alone(model, requests)


class PoisonedModel:
    """`model`, raising after its call (the caches already written) when `poison` is among the fed tokens."""

    def __init__(self, model, poison: int):
        self.model, self.args, self.poison, self.calls = model, model.args, poison, []

    def __call__(self, tokens, **kwargs):
        out = self.model(tokens, **kwargs)
        self.calls.append(tokens.shape)
        if self.poison in tokens.reshape(-1).tolist():
            raise InjectedFault(f"token {self.poison}")
        return out


def test_a_failing_model_call_is_retried_row_by_row_and_fails_only_its_row(model):
    """The shared call raises (after writing the caches): the step is undone, each row runs alone,
    and only the row that feeds the poisoned token fails; the others go on as if alone."""
    requests = [Request(p, max_tokens=10) for p in PROMPTS]
    victim = alone(model, requests[2])[0]
    others = {t for r in requests if r is not requests[2] for t in alone(model, r)[0] + r.prompt}
    k = next(k for k, t in enumerate(victim[:-1]) if t not in others and t not in requests[2].prompt)
    poisoned = PoisonedModel(model, victim[k])
    together(poisoned, requests)
    assert requests[2].tokens == victim[: k + 1] and isinstance(requests[2].error, InjectedFault)
    assert (len(requests[2].tokens), len(requests[2].logprobs)) == (k + 1, k + 1)
    for r in requests[:2] + requests[3:]:
        assert r.error is None
        tokens, logprobs = alone(model, r)
        assert r.tokens == tokens
        np.testing.assert_allclose(np.stack(r.logprobs), np.stack(logprobs), atol=1e-4)
    assert (1, 1) in poisoned.calls and (len(requests), 1) in poisoned.calls  # it did run rows alone


LONG = [1] + [(37 * i) % 380 + 3 for i in range(120)]


@pytest.mark.parametrize("chunk", [16, 50, 0])
def test_a_long_prompt_is_read_in_chunks_while_the_others_decode(model, chunk):
    """The long prompt's rows read `chunk` tokens a step (0: all at once); every decoding row gets a
    token every step meanwhile, and every row decodes what it would alone."""
    requests = [Request(PROMPTS[0], max_tokens=16), Request(LONG, max_tokens=6, join=2, penalty=1.2),
                Request(PROMPTS[3], max_tokens=10, join=2), Request(LONG[:40], max_tokens=4, join=3)]
    served = together(model, requests, prefill_chunk=chunk)
    assert_same_as_alone(model, requests)
    steps_to_read = -(-(len(LONG) - 1) // chunk) if chunk else 1
    first_token = next(s for s, got in enumerate(served) if 1 in got)
    assert first_token == 2 + steps_to_read - 1
    assert all(0 in got for got in served[:16])  # the first row never waits
    # the short prompt queued behind the long one waits for it (oldest first, `chunk` tokens a step in
    # all), then takes what is left of the budget of the long one's last step
    assert next(s for s, got in enumerate(served) if 2 in got) == first_token


def test_a_prompt_read_in_chunks_hands_back_what_it_read_when_cancelled(model):
    batch = Batch(model, prefill_chunk=32)
    row = batch.add(LONG, make_cache(model), make_sampler(), [], max_tokens=4)
    batch.step()
    batch.step()
    assert not row.ready and batch.rows == []
    cache = batch.remove(row)
    assert batch.waiting == [] and cache[0].offset == 64
    reference = make_cache(model)
    model(mx.array(LONG[:64])[None], cache=reference)
    np.testing.assert_allclose(np.array(cache[0].state[0]), np.array(reference[0].state[0]), atol=1e-5)


def test_a_failure_while_reading_one_prompt_fails_that_row_alone(model):
    requests = [Request(PROMPTS[0], max_tokens=8), Request(LONG, max_tokens=4, join=1)]
    poisoned = PoisonedModel(model, LONG[70])  # read by the long row's third chunk
    assert LONG[70] not in PROMPTS[0] + alone(model, requests[0])[0]
    together(poisoned, requests, prefill_chunk=32)
    assert requests[1].tokens == [] and isinstance(requests[1].error, InjectedFault)
    assert requests[0].error is None and requests[0].tokens == alone(model, requests[0])[0]


def test_prompts_waiting_together_are_read_in_one_call_and_decode_as_alone(model):
    requests = [Request(p, max_tokens=6) for p in PROMPTS]  # all waiting at step 0, lengths 2 to 13
    counting = PoisonedModel(model, poison=-1)  # never raises: counts the calls
    together(counting, requests)
    reads = [shape for shape in counting.calls if shape[1] > 1]
    assert reads == [(len(PROMPTS), max(map(len, PROMPTS)) - 1)]  # one right-padded call for every prompt
    assert_same_as_alone(model, requests)


def test_a_failure_while_reading_prompts_together_fails_only_its_row(model):
    requests = [Request(p, max_tokens=6) for p in PROMPTS]
    poison = PROMPTS[2][4]  # only in the third prompt
    assert all(poison not in r.prompt + alone(model, r)[0] for r in requests if r is not requests[2])
    poisoned = PoisonedModel(model, poison)
    together(poisoned, requests)
    assert requests[2].tokens == [] and isinstance(requests[2].error, InjectedFault)
    assert all(r.error is None for r in requests if r is not requests[2])
    assert_same_as_alone(model, [r for r in requests if r is not requests[2]])


@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_prefill_chunk_is_a_non_negative_integer(model, value):
    with pytest.raises(OptionError, match="prefill_chunk"):
        Batch(model, prefill_chunk=value)


def test_a_leaving_row_hands_back_its_unpadded_cache(model):
    requests = [Request(PROMPTS[1], max_tokens=6), Request(PROMPTS[2], max_tokens=9, join=1)]
    together(model, requests)
    for r in requests:
        cache = make_cache(model)
        list(generate_step(r.prompt, model, max_tokens=r.max_tokens, cache=cache))
        held = len(r.prompt) + r.max_tokens - 1  # the budget-ending token is never fed
        for mine, theirs in zip(r.cache, cache):
            assert mine.offset == theirs.offset == held
            np.testing.assert_allclose(np.array(mine.state[0]), np.array(theirs.state[0]), atol=1e-5)
            np.testing.assert_allclose(np.array(mine.state[1]), np.array(theirs.state[1]), atol=1e-5)
        # and a later request continues from it as from its own cache
        more = [5, 6]
        continued = list(generate_step(more, model, max_tokens=4, cache=r.cache))
        full = list(generate_step(r.prompt + r.tokens[:-1] + more, model, max_tokens=4))
        assert [s.token for s in continued] == [s.token for s in full]


def test_zero_token_budget_never_joins(model):
    batch = Batch(model)
    row = batch.add(PROMPTS[0], make_cache(model), make_sampler(), [], max_tokens=0)
    assert batch.rows == [] and list(row) == []


def _random_cache(rng, length: int) -> KVCache:
    cache = KVCache(num_kv_heads=2, head_dim=4, max_length=64)
    if length:
        k = mx.array(rng.standard_normal((1, 2, length, 4)).astype(np.float32))
        cache.update_and_fetch(k, k + 1)
    return cache


@pytest.mark.parametrize("seed", range(4))
def test_batch_cache_matches_a_list_model(seed):
    """Random adds (empty rows too), appends and removals against per-row lists of positions."""
    rng = np.random.default_rng(seed)
    batch = BatchKVCache(num_kv_heads=2, head_dim=4, max_length=64)
    batch.step = int(rng.choice([1, 3, 256]))
    rows: list[list[np.ndarray]] = []  # per row: (2, 4) key slices
    for _ in range(30):
        action = rng.random()
        if action < 0.3 or not rows:
            cache = _random_cache(rng, int(rng.integers(0, 6)))
            batch.add(cache)
            rows.append([np.array(cache.state[0])[0, :, t] for t in range(cache.offset)] if cache.offset else [])
        elif action < 0.45:
            i = int(rng.integers(len(rows)))
            removed = batch.remove(i)
            expected = rows.pop(i)
            assert removed.offset == len(expected)
            if expected:
                np.testing.assert_array_equal(np.array(removed.state[0])[0].transpose(1, 0, 2), np.stack(expected))
                np.testing.assert_array_equal(np.array(removed.state[1]), np.array(removed.state[0]) + 1)
        else:
            new = rng.standard_normal((len(rows), 2, 1, 4)).astype(np.float32)
            keys, _ = batch.update_and_fetch(mx.array(new), mx.array(new + 1))
            for i, row in enumerate(rows):
                row.append(new[i, :, 0])
            mask = np.array(batch.mask(0))[:, 0, 0]
            assert keys.shape[2] == batch.length == max(len(r) for r in rows)
            assert np.array(batch.offset).tolist() == [len(r) for r in rows]
            for i, row in enumerate(rows):  # a row's own positions are its last columns, unmasked
                assert mask[i].sum() == len(row)
                np.testing.assert_array_equal(np.array(keys)[i, :, batch.length - len(row):].transpose(1, 0, 2),
                                              np.stack(row))


def test_a_row_from_a_reused_cache_penalises_the_cached_tokens_too(model):
    """A row that starts from a cache holding a prefix (the next chat turn) sees that prefix's tokens
    in its repetition-penalty history, as `generate_step(cached_ids=...)` does."""
    prefix, rest = [1, 47, 231, 321, 350, 110, 219, 117, 78], [45, 61, 77, 8]  # the prefix: tokens it likes

    def prefilled():
        cache = make_cache(model)
        model(mx.array(prefix)[None], cache=cache)
        return cache

    processors = make_logits_processors(1.5)
    want = [s.token for s in generate_step(rest, model, max_tokens=8, cache=prefilled(), cached_ids=prefix,
                                           logits_processors=processors)]
    batch = Batch(model)
    other = batch.add(PROMPTS[0], make_cache(model), make_sampler(), [], max_tokens=8)
    row = batch.add(rest, prefilled(), make_sampler(), processors, max_tokens=8, cached_ids=prefix)
    tokens = []
    for _ in range(8):
        batch.step()
        tokens.append(next(row).token)
        next(other)
    assert tokens == want
    without = [s.token for s in generate_step(rest, model, max_tokens=8, cache=prefilled(),
                                              logits_processors=processors)]
    assert without != want  # the prefix's tokens matter here


def test_serve_prefill_chunk_default_is_the_batch_default():
    from mlx_openelm.serve.cli import serve_command

    option = next(p for p in serve_command.params if p.name == "prefill_chunk")
    assert option.default == PREFILL_CHUNK
