"""Generation speaks mlx-lm's habits: verbose generate, its keyword names, clear refusals; a full
context is said plainly in the API, the stats line and --json."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_openelm import generate, load, make_cache, stream_generate

from synthetic import TINY_CONFIG, random_weights, write_hf_checkpoint

CONTEXT = 24
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def small_context(tmp_path_factory, tokenizer_path):
    config = {**TINY_CONFIG, "max_context_length": CONTEXT}
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-ctx24"
    return write_hf_checkpoint(folder, config, random_weights(config), tokenizer=tokenizer_path)


def no_eos(tokens, logits):
    """Keep the random model talking until a limit ends it."""
    return mx.concatenate([logits[:, :2], mx.full((logits.shape[0], 1), -mx.inf), logits[:, 3:]], axis=-1)


def test_verbose_generate_prints_text_and_statistics_like_mlx_lm(loaded, capsys):
    model, tokenizer = loaded
    quiet = generate(model, tokenizer, PROMPT, max_tokens=8, logits_processors=[no_eos])
    assert capsys.readouterr().out == ""
    text = generate(model, tokenizer, prompt=PROMPT, verbose=True, max_tokens=8, logits_processors=[no_eos])
    lines = capsys.readouterr().out.splitlines()
    assert text == quiet and lines[0] == "=" * 10
    assert "\n".join(lines[1:-4]) == text and lines[-4] == "=" * 10
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert lines[-3].startswith(f"Prompt: {prompt_tokens} tokens, ") and lines[-3].endswith(" tokens-per-sec")
    assert lines[-2].startswith("Generation: 8 tokens, ") and lines[-1].startswith("Peak memory: ")


def test_mlx_lm_keyword_names_mean_the_same_thing(loaded):
    model, tokenizer = loaded
    ours_cache, theirs_cache = make_cache(model), make_cache(model)
    ours_progress, theirs_progress = [], []
    ours = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=5, cache=ours_cache,
                                             prompt_progress=lambda *a: ours_progress.append(a),
                                             prefill_step_size=2)]
    theirs = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=5, prompt_cache=theirs_cache,
                                               prompt_progress_callback=lambda *a: theirs_progress.append(a),
                                               prefill_step_size=2)]
    assert ours == theirs and ours_progress == theirs_progress and len(ours_progress) > 1
    assert ours_cache[0].offset == theirs_cache[0].offset > 0


def test_prompt_progress_reports_what_mlx_lm_reports(loaded):
    """A progress bar written for mlx-lm's callback starts at 0 and reaches the whole prompt."""
    lm_generate = pytest.importorskip("mlx_lm.generate")
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    ours, theirs = [], []
    list(stream_generate(model, tokenizer, ids, max_tokens=2, prefill_step_size=2,
                         prompt_progress_callback=lambda *a: ours.append(a)))
    # mlx-lm's own generate_step runs our model (same call signature, our KV caches)
    list(lm_generate.generate_step(mx.array(ids), model, max_tokens=2, prompt_cache=make_cache(model),
                                   prefill_step_size=2, prompt_progress_callback=lambda *a: theirs.append(a)))
    assert ours == theirs and ours[0] == (0, len(ids)) and ours[-1] == (len(ids), len(ids))


@pytest.mark.parametrize("kwargs, message", [
    ({"bogus": 1}, "unexpected keyword argument 'bogus'; accepted: cache, "),
    ({"kv_bits": 4}, "'kv_bits' (KV-cache quantization in mlx-lm) is not supported"),
    ({"max_kv_size": 64}, "'max_kv_size' (a rotating KV cache"),
    ({"temp": 0.7}, "pass sampler=make_sampler(temp=..."),
])
def test_unknown_and_unsupported_keywords_are_refused_with_the_accepted_list(loaded, kwargs, message):
    model, tokenizer = loaded
    with pytest.raises(TypeError) as info:
        generate(model, tokenizer, PROMPT, max_tokens=2, **kwargs)
    assert message in str(info.value) and "prompt_cache=cache" in str(info.value)


def test_a_name_and_its_mlx_lm_alias_together_are_refused(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match="got both 'cache' and mlx-lm's 'prompt_cache'"):
        generate(model, tokenizer, PROMPT, max_tokens=2, cache=make_cache(model), prompt_cache=make_cache(model))


def test_a_full_context_is_reported(small_context):
    model, tokenizer = load(small_context, dtype="float32")
    prompt_tokens = len(tokenizer.encode(PROMPT))
    room = CONTEXT - prompt_tokens + 1  # the last token needs no position of its own
    full = list(stream_generate(model, tokenizer, PROMPT, max_tokens=100, logits_processors=[no_eos]))
    assert len(full) == room and full[-1].finish_reason == "length" and full[-1].context_full
    assert not any(r.context_full for r in full[:-1])
    unlimited = list(stream_generate(model, tokenizer, PROMPT, max_tokens=-1, logits_processors=[no_eos]))
    assert [r.token for r in unlimited] == [r.token for r in full] and unlimited[-1].context_full
    capped = list(stream_generate(model, tokenizer, PROMPT, max_tokens=room, logits_processors=[no_eos]))
    assert capped[-1].finish_reason == "length" and not capped[-1].context_full


def test_cli_says_when_the_context_is_full(small_context, invoke_cli):
    args = ["generate", "--model", str(small_context), "-p", PROMPT, "-m", "200", "--repetition-penalty", "1"]
    result = invoke_cli(*args, "--json", catch_exceptions=False)
    fields = json.loads(result.stdout)
    if fields["finish_reason"] == "stop":
        pytest.fail("the random model said EOS before the context filled; pick another prompt")
    assert fields["finish_reason"] == "length" and fields["context_full"] is True
    stats = invoke_cli(*args, catch_exceptions=False).stderr.strip().splitlines()[-1]
    assert stats.endswith("| finish: length (the model's context is full)")
    short = json.loads(invoke_cli("generate", "--model", str(small_context), "-p", PROMPT, "-m", "2",
                                  "--json", catch_exceptions=False).stdout)
    assert short["finish_reason"] == "length" and short["context_full"] is False


def test_mlx_lm_readme_chat_snippet_works_and_text_templates_are_refused(loaded):
    """mlx-lm's README: ids from apply_chat_template go to generate as the prompt."""
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Write a story about Einstein"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    streamed = list(stream_generate(model, tokenizer, prompt, max_tokens=4))
    assert streamed[0].prompt_tokens == len(prompt)  # the ids as given: no second BOS
    assert generate(model, tokenizer, prompt=prompt, max_tokens=4) == "".join(r.text for r in streamed)
    with pytest.raises(TypeError, match="returns token ids only .*pass the ids as the prompt"):
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
