"""A cached conversation is still the context: prompt lookup and logits processors see earlier turns
(ChatSession and the server's conversation cache), and a cancelled server request leaves a cache whose
token ids agree with its keys."""

from __future__ import annotations

import queue
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import ChatSession, generate_step, make_cache, make_logits_processors, speculative
from mlx_openelm.errors import OptionError
from mlx_openelm.cache import reusable_prefix_length
from mlx_openelm.generation import stream_generate
from mlx_openelm.speculative import SpeculativeOptions
from mlx_openelm.serve.scheduler import Scheduler
from mlx_openelm.serve.api import GenerationSpec

# Said twice: the second reply's drafts can come from the first turn.
MESSAGE = "The quick brown fox jumps over the lazy dog."


def _counts(response) -> tuple[int, int, int]:
    return response.drafted_tokens, response.accepted_tokens, response.target_forward_passes


def test_chat_prompt_lookup_searches_earlier_turns(loaded, monkeypatch):
    """The third turn's first proposals copy the first reply (read from the cache, not fed this turn),
    and the turn drafts exactly as the same conversation read from scratch."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    for text in (MESSAGE, "Once upon a time"):
        list(session.send(text, max_tokens=16, prompt_lookup=10))
    contexts = []
    real = speculative.find_lookup_tokens
    monkeypatch.setattr(speculative, "find_lookup_tokens", lambda context, *args: contexts.append(list(context))
                        or real(context, *args))
    ids = session.conversation_ids(session.messages + [{"role": "user", "content": MESSAGE}])
    replies = list(session.send(MESSAGE, max_tokens=16, prompt_lookup=10))
    cached = len(ids) - session.last_prefill_tokens
    assert cached > len(ids) // 2  # the earlier turns came from the cache
    assert contexts[0] == ids
    first_reply = session.messages[1]["content"]
    proposals = real(ids, 10)
    assert proposals and tokenizer.decode(proposals) in first_reply  # a phrase of the first turn, drafted
    assert real(ids[cached:], 10) != proposals  # which the tokens fed this turn alone would not give
    monkeypatch.undo()
    fresh = list(stream_generate(model, tokenizer, ids, max_tokens=16, prompt_lookup=10))
    assert [r.token for r in replies] == [r.token for r in fresh]
    assert _counts(replies[-1]) == _counts(fresh[-1]) and replies[-1].accepted_tokens > 0


def test_chat_repetition_penalty_sees_earlier_turns(loaded):
    """Penalised greedy turns equal the same conversation read from scratch (the penalty's history is
    the whole conversation, not only the tokens fed this turn)."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be brief.")
    processors = make_logits_processors(1.5)
    for text in ("Hello there", MESSAGE):
        ids = session.conversation_ids(session.messages + [{"role": "user", "content": text}])
        got = [r.token for r in session.send(text, max_tokens=10, logits_processors=processors)]
        fresh = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=10, logits_processors=processors)]
        assert got == fresh
    assert session.last_prefill_tokens < len(ids) - 10  # the first turn came from the cache


def test_cached_ids_must_be_what_the_cache_holds(loaded):
    model, _ = loaded
    cache = make_cache(model)
    list(generate_step([1, 5, 6, 7], model, max_tokens=2, cache=cache))
    with pytest.raises(OptionError, match="cached_ids has 2 tokens but the cache holds 5"):
        list(generate_step([9], model, cache=cache, cached_ids=[1, 5]))
    with pytest.raises(OptionError, match="cached_ids has 1 tokens but the cache holds 0"):
        list(generate_step([9], model, cached_ids=[1]))
    # an mx.array works too, and the penalty then sees the cached tokens as if they had been the prompt
    favourite = next(generate_step([1, 5, 9], model, max_tokens=1)).token  # what the penalty must hold back
    earlier = [1, 5, favourite, favourite]
    cache = make_cache(model)
    model(mx.array([earlier]), cache=cache)
    processors = make_logits_processors(3.0)
    continued = generate_step([9], model, max_tokens=8, cache=cache, cached_ids=mx.array(earlier),
                              logits_processors=processors)
    whole = generate_step(earlier + [9], model, max_tokens=8, logits_processors=processors)
    assert [s.token for s in continued] == [s.token for s in whole]


def test_reusable_prefix_never_covers_the_whole_prompt():
    assert reusable_prefix_length([1, 5, 6, 7, 8], [1, 5, 6, 9]) == 3
    assert reusable_prefix_length([1, 5, 6], [1, 5, 6]) == 2  # the last prompt token is always fed
    assert reusable_prefix_length([1, 5, 6, 7], [1, 5]) == 1
    assert reusable_prefix_length([], [1]) == 0 and reusable_prefix_length([2], [1, 3]) == 0


# ---- the server's scheduler, in process (its worker must run on the main thread) ---------------


def _spec(prompt, max_tokens, **kwargs) -> GenerationSpec:
    return GenerationSpec(prompt=list(prompt), max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0,
                          min_p=0.0, repetition_penalty=kwargs.pop("repetition_penalty", 1.0), **kwargs)


def _tokens(job) -> list[int]:
    tokens = []
    while True:
        step = job.events.get(timeout=60)
        assert hasattr(step, "token"), step  # a Failure
        tokens.append(step.token)
        if step.finish_reason:
            return tokens


def _serve(scheduler: Scheduler, client) -> None:
    """Run the worker here until `client` (run on a thread, given the scheduler) returns."""
    errors = []

    def run_client():
        try:
            client(scheduler)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            errors.append(e)
        finally:
            scheduler.stop()

    thread = threading.Thread(target=run_client)
    thread.start()
    scheduler.run(poll=0.01)
    thread.join()
    if errors:
        raise errors[0]


def test_server_prompt_lookup_sees_the_cached_turns(loaded, monkeypatch):
    """Each turn of a chat looks up proposals in its whole prompt, also when most of it comes from the
    conversation cache, and drafts the same as without the cache."""
    model, tokenizer = loaded
    contexts = []
    real = speculative.find_lookup_tokens
    monkeypatch.setattr(speculative, "find_lookup_tokens", lambda context, *args: contexts.append(list(context))
                        or real(context, *args))
    results = {}
    for size in (4, 0):
        prompts, replies = [], []

        def chat(scheduler):
            messages = []
            for text in (MESSAGE, "Once upon a time", MESSAGE):
                messages.append({"role": "user", "content": text})
                prompts.append(tokenizer.apply_chat_template(messages))
                replies.append(_tokens(scheduler.submit(_spec(prompts[-1], 16))))
                messages.append({"role": "assistant", "content": tokenizer.decode(replies[-1])})

        contexts.clear()
        scheduler = Scheduler(model, tokenizer, prompt_cache_size=size, speculative=SpeculativeOptions(prompt_lookup=10))
        _serve(scheduler, chat)
        assert all(prompt in contexts for prompt in prompts)
        stats = scheduler.snapshot()
        results[size] = (replies, stats["drafted_tokens"], stats["accepted_tokens"], stats["cached_prompt_tokens"])
    (cached_replies, *cached_counts, reused), (fresh_replies, *fresh_counts, none) = results[4], results[0]
    assert reused > len(prompts[-1]) // 2 and none == 0
    assert cached_replies == fresh_replies and cached_counts == fresh_counts and cached_counts[1] > 0


class CancelAfter(queue.Queue):
    """A job's event queue that cancels the job as soon as it has been handed `n` tokens."""

    def __init__(self, job, n: int):
        super().__init__()
        self.job, self.left = job, n

    def put(self, item, *args, **kwargs):
        super().put(item, *args, **kwargs)
        self.left -= 1
        if self.left == 0:
            self.job.cancel()


@pytest.mark.parametrize("speculative", [True, False])
def test_a_cancelled_request_stores_a_cache_that_matches_its_ids(loaded, speculative):
    """Cancelled after its first token: speculative, the target's and draft's caches are mid-pass and
    hold more than was handed out; batched, the row leaves the shared batch cache. The stored
    conversation cache must hold exactly its ids, and the next request that extends them must get
    the plain greedy answer."""
    model, tokenizer = loaded
    prompt = tokenizer.encode(MESSAGE)
    options = SpeculativeOptions(draft_model=model, num_draft_tokens=3) if speculative else None
    scheduler = Scheduler(model, tokenizer, speculative=options)
    cancelled = scheduler.submit(_spec(prompt, 50))
    cancelled.events = CancelAfter(cancelled, 1)
    answers = {}

    def extend(scheduler):
        first = cancelled.events.get(timeout=60).token
        deadline = time.monotonic() + 60
        while scheduler.snapshot()["cancelled"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        answers["prompt"] = prompt + [first, 40, 7]
        job = scheduler.submit(_spec(answers["prompt"], 8, repetition_penalty=1.2))
        answers["tokens"] = _tokens(job)

    _serve(scheduler, extend)
    assert scheduler.snapshot()["cached_prompt_tokens"] == len(prompt) + 1  # the cancelled request's cache
    plain = generate_step(answers["prompt"], model, max_tokens=8, logits_processors=make_logits_processors(1.2))
    assert answers["tokens"] == [s.token for s in plain]
    layers = model.args.num_transformer_layers
    for ids, cache in scheduler.prompt_cache.entries:
        assert len(cache) == layers * (2 if speculative else 1) and all(c.offset == len(ids) for c in cache)
        for part in (cache[:layers], cache[layers:]):  # the target's caches, then the draft's
            fresh = make_cache(model)
            model(mx.array(ids)[None], cache=fresh)
            for ours, theirs in zip(part, fresh):
                for a, b in zip(ours.state, theirs.state):
                    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
