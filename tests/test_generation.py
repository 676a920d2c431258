"""generate_step / stream_generate / generate against plain full-forward rollouts."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import generate, generate_step, load, make_cache, make_logits_processors, make_sampler, stream_generate
from mlx_openelm.errors import ContextLengthError
from synthetic import TINY_CONFIG, write_hf_checkpoint

PROMPT = [1, 40, 7, 250, 33, 12, 90]


@pytest.fixture(scope="module")
def model_and_tokenizer(hf_checkpoint):
    return load(hf_checkpoint, dtype="float32")


def _rollout(model, prompt, n, penalty=None):
    """Greedy decoding by re-running the full forward each step (no cache)."""
    tokens = list(prompt)
    for _ in range(n):
        logits = np.array(model(mx.array(tokens)[None]))[0, -1].astype(np.float64)
        if penalty is not None:
            seen = np.unique(tokens)
            logits[seen] = np.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


def test_greedy_generate_step_equals_full_forward_rollout(model_and_tokenizer):
    model, _ = model_and_tokenizer
    steps = list(generate_step(PROMPT, model, max_tokens=12))
    assert [s.token for s in steps] == _rollout(model, PROMPT, 12)
    assert [s.last for s in steps] == [False] * 11 + [True]
    logprobs = steps[0].logprobs
    assert logprobs.shape == (TINY_CONFIG["vocab_size"],)
    assert abs(mx.logsumexp(logprobs).item()) < 1e-5


def test_chunked_prefill_gives_the_same_tokens(model_and_tokenizer):
    model, _ = model_and_tokenizer
    whole = [s.token for s in generate_step(PROMPT, model, max_tokens=6)]
    seen = []
    chunked = [s.token for s in generate_step(PROMPT, model, max_tokens=6, prefill_step_size=2,
                                           prompt_progress=lambda done, total: seen.append((done, total)))]
    assert chunked == whole
    assert seen == [(0, 7), (2, 7), (4, 7), (6, 7), (7, 7)]  # from 0 to the whole prompt, as mlx-lm reports


def test_repetition_penalty_matches_hugging_face_rollout(model_and_tokenizer):
    model, _ = model_and_tokenizer
    processors = make_logits_processors(repetition_penalty=1.3)
    tokens = [s.token for s in generate_step(PROMPT, model, max_tokens=10, logits_processors=processors)]
    assert tokens == _rollout(model, PROMPT, 10, penalty=1.3)
    assert tokens != _rollout(model, PROMPT, 10)  # the penalty changed something


def test_greedy_generation_is_deterministic(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert generate(model, tokenizer, "Once upon a time", max_tokens=10) == generate(
        model, tokenizer, "Once upon a time", max_tokens=10
    )


def test_seeded_sampling_is_reproducible(model_and_tokenizer):
    model, _ = model_and_tokenizer
    runs = [
        [s.token for s in generate_step(PROMPT, model, max_tokens=15, sampler=make_sampler(temp=1.0, seed=seed))]
        for seed in (3, 3, 4)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_stops_at_eos(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint)
    greedy = _rollout(model, tokenizer.encode("Once upon a time"), 6)
    tokenizer.eos_id = greedy[3]  # pretend the model's 4th greedy token is EOS
    responses = list(stream_generate(model, tokenizer, "Once upon a time", max_tokens=50))
    assert [r.token for r in responses] == greedy[: greedy.index(greedy[3]) + 1]
    last = responses[-1]
    assert last.finish_reason == "stop" and all(r.finish_reason is None for r in responses[:-1])
    assert "".join(r.text for r in responses) == tokenizer.decode(greedy[: greedy.index(greedy[3])])


def test_stream_statistics_and_length_finish(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=8))
    assert len(responses) == 8 and responses[-1].finish_reason == "length"
    assert [r.generation_tokens for r in responses] == list(range(1, 9))
    last = responses[-1]
    assert last.prompt_tokens == len(PROMPT) and last.prompt_tps > 0 and last.generation_tps > 0
    assert last.peak_memory_gb > 0
    tokens = [r.token for r in responses]
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)


def test_text_prompt_gets_bos(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    from_text = [r.token for r in stream_generate(model, tokenizer, "Once upon", max_tokens=4)]
    from_ids = [r.token for r in stream_generate(model, tokenizer, tokenizer.encode("Once upon"), max_tokens=4)]
    assert from_text == from_ids
    assert tokenizer.encode("Once upon")[0] == 1


def test_cache_continues_a_conversation(model_and_tokenizer):
    model, _ = model_and_tokenizer
    cache = make_cache(model)
    first = [s.token for s in generate_step(PROMPT, model, max_tokens=5, cache=cache)]
    assert cache[0].offset == len(PROMPT) + 4  # every yielded token but the last went through
    follow_up = [first[-1], 99, 3]
    second = [s.token for s in generate_step(follow_up, model, max_tokens=4, cache=cache)]
    assert second == _rollout(model, PROMPT + first + [99, 3], 4)


def test_generation_stops_at_the_context_limit(tmp_path, tiny_weights, tokenizer_path):
    config = {**TINY_CONFIG, "max_context_length": 12}
    folder = write_hf_checkpoint(tmp_path / "ctx", config, tiny_weights, tokenizer=tokenizer_path)
    model, tokenizer = load(folder)
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=100))
    assert len(responses) == 12 - len(PROMPT) + 1
    assert responses[-1].finish_reason == "length"
    message = r"prompt of 13 tokens \(\+0 cached\) does not fit the model's context of 12"
    with pytest.raises(ContextLengthError, match=message):
        list(generate_step(list(range(3, 16)), model))


def test_bad_prompts(model_and_tokenizer):
    model, _ = model_and_tokenizer
    with pytest.raises(ValueError, match="non-empty 1-D"):
        list(generate_step([], model))
    for bad in ([1, 5, TINY_CONFIG["vocab_size"]], [1, -3], [1.0, 2.0]):
        with pytest.raises(ValueError, match=r"prompt token ids must be integers in \[0, 384\)"):
            list(generate_step(bad, model))
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        list(generate_step(PROMPT, model, max_tokens=-1))


def test_prefill_leaves_only_the_last_token_for_the_output_head(model_and_tokenizer):
    from mlx_openelm.generation import prefill

    model, _ = model_and_tokenizer
    for length, step in ((10, 512), (10, 4), (1, 512)):
        cache = make_cache(model)
        rest = prefill(model, mx.arange(3, 3 + length, dtype=mx.uint32), cache, step)
        assert rest.size == 1 and cache[0].offset == length - 1


def test_wired_limit_is_raised_while_generating_and_restored(model_and_tokenizer, monkeypatch):
    """On Apple GPUs (simulated here) the wired limit is set for generation and put back,
    also when the consumer stops early."""
    model, _ = model_and_tokenizer
    calls = []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 123})
    monkeypatch.setattr(mx, "set_wired_limit", lambda size: calls.append(size) or 7)
    assert len(list(generate_step(PROMPT, model, max_tokens=3))) == 3
    assert calls == [123, 7]
    steps = generate_step(PROMPT, model, max_tokens=10)
    next(steps)
    steps.close()
    assert calls == [123, 7, 123, 7]
