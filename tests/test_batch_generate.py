"""`batch_generate`: each prompt's result equals `stream_generate` on that prompt alone (tokens, text,
finish reason; log-probabilities within 1e-4), with per-prompt options; and the one token budget."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mlx_openelm import BatchResponse, batch_generate, generate_step, load, make_logits_processors, make_sampler
from mlx_openelm.errors import ContextLengthError, OptionError
from mlx_openelm.generation import stream_generate, token_budget

PROMPTS = [[1, 40, 7, 250, 33, 12, 90], [1, 5], [1, 99, 100, 101, 17, 17, 17, 300, 2, 45, 61, 77, 8], [1, 200, 3, 3]]


def alone(model, tokenizer, prompt, max_tokens, **options):
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **options))
    return ("".join(r.text for r in responses), [r.token for r in responses],
            responses[-1].finish_reason if responses else "length",
            [float(r.logprobs[r.token].item()) for r in responses])


def assert_alone(model, tokenizer, result: BatchResponse, prompts, options: list[dict]):
    for i, (prompt, kwargs) in enumerate(zip(prompts, options)):
        text, tokens, finish, logprobs = alone(model, tokenizer, prompt, **kwargs)
        assert result.token_ids[i] == tokens, i
        assert result.texts[i] == text and result.finish_reasons[i] == finish, i
        if result.logprobs is not None:
            np.testing.assert_allclose(result.logprobs[i], logprobs, atol=1e-4)


@pytest.mark.parametrize("prefill_chunk", [0, 3])
def test_each_prompt_gets_what_it_would_alone_with_its_own_options(loaded, prefill_chunk):
    model, tokenizer = loaded
    # A stop string that the second prompt's text really contains, so that it ends with "stop".
    text = alone(model, tokenizer, PROMPTS[1], 24, logits_processors=make_logits_processors(1.3))[0]
    assert len(text) > 12
    stop = text[8:11]
    max_tokens = [20, 24, 9, 0]
    penalties = [None, 1.3, None, None]
    seeds = [None, None, 7, 8]  # temp > 0 rows each get their own seeded sampler, alone and batched

    def sampler(i):
        return make_sampler(temp=0.8, seed=seeds[i]) if seeds[i] is not None else None

    stops = [None, [stop], "zz", None]
    result = batch_generate(model, tokenizer, PROMPTS, max_tokens, sampler=[sampler(i) for i in range(4)],
                            logits_processors=[make_logits_processors(p) for p in penalties], stop=stops,
                            return_logprobs=True, prefill_chunk=prefill_chunk)
    assert result.finish_reasons[1] == "stop" and stop not in result.texts[1]
    assert result.token_ids[3] == [] and result.finish_reasons[3] == "length"
    assert [len(t) for t in result.token_ids[::2]] == [20, 9] and result.prompt_tokens == [len(p) for p in PROMPTS]
    options = [dict(max_tokens=max_tokens[i], sampler=sampler(i), logits_processors=make_logits_processors(penalties[i]),
                    stop=stops[i]) for i in range(4)]
    assert_alone(model, tokenizer, result, PROMPTS, options)


def test_one_value_is_shared_by_every_prompt_and_text_prompts_get_bos(loaded):
    model, tokenizer = loaded
    prompts = ["hello there", PROMPTS[0], "a longer prompt than the first one"]
    result = batch_generate(model, tokenizer, prompts, 6, logits_processors=make_logits_processors(1.2))
    assert result.logprobs is None and result.generation_tokens == sum(len(t) for t in result.token_ids) == 18
    assert_alone(model, tokenizer, result, prompts, [dict(max_tokens=6, logits_processors=make_logits_processors(1.2))] * 3)
    assert batch_generate(model, tokenizer, [], 4).token_ids == []


def test_bad_options_name_themselves(loaded):
    model, tokenizer = loaded
    with pytest.raises(OptionError, match="max_tokens has 1 entries for 2 prompts"):
        batch_generate(model, tokenizer, PROMPTS[:2], [4])
    with pytest.raises(OptionError, match="sampler has 3 entries for 2 prompts"):
        batch_generate(model, tokenizer, PROMPTS[:2], sampler=[None] * 3)
    with pytest.raises(OptionError, match="max_tokens must be an integer >= 0"):
        batch_generate(model, tokenizer, PROMPTS[:2], [4, -2])
    with pytest.raises(OptionError, match="stop strings must be non-empty"):
        batch_generate(model, tokenizer, PROMPTS[:2], stop=[["a"], [""]])
    with pytest.raises(OptionError, match="prompts must be a list of prompts"):
        batch_generate(model, tokenizer, "one prompt")
    with pytest.raises(OptionError, match="prefill_chunk"):
        batch_generate(model, tokenizer, PROMPTS[:2], prefill_chunk=-1)


def test_the_token_budget_boundary_is_the_same_for_generation_and_the_server(loaded):
    """A prompt that fills the context still gets one token (its last token's logits); the server's
    admission counts the same number (it once counted one fewer)."""
    from mlx_openelm.serve.server import ServerApp

    model, tokenizer = loaded
    context = model.args.max_context_length
    assert token_budget(context, context, 5) == 1 and token_budget(context, context - 1, 5) == 2
    assert token_budget(context, context - 10, 5) == 5 and token_budget(context, 4, 5, cached=context - 4) == 1
    with pytest.raises(ContextLengthError, match="does not fit"):
        token_budget(context, context + 1, 5)
    app = ServerApp(model, tokenizer, "tiny", prompt_cache_size=0)
    rng = np.random.default_rng(0)
    for size in (context, context - 1):
        prompt = [1] + rng.integers(3, 300, size - 1).tolist()
        request = SimpleNamespace(spec=SimpleNamespace(prompt=prompt, max_tokens=5))
        steps = list(generate_step(prompt, model, max_tokens=5))
        assert app.budget(request) == len(steps) == context - size + 1
    assert batch_generate(model, tokenizer, [prompt[:context]], 5).token_ids[0] == [s.token for s in steps]


def test_trained_model_batched_equals_alone(trained_model_path):
    """On real weights (SmolLM2-135M-Instruct), three chat prompts of different lengths."""
    model, tokenizer = load(trained_model_path, dtype="float32")
    questions = ["What is the capital of France?", "Name a colour.", "Write one sentence about the sea and the sky."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    result = batch_generate(model, tokenizer, prompts, 8, return_logprobs=True)
    assert "Paris" in result.texts[0]
    assert_alone(model, tokenizer, result, prompts, [dict(max_tokens=8)] * 3)
