"""Speculative decoding: exactness against plain decoding, the acceptance rule, cache rollback, chat."""

from __future__ import annotations

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_openelm import ChatSession, generate_step, load, load_model, make_cache, make_logits_processors, make_sampler
from mlx_openelm.cache import truncate_caches
from mlx_openelm.errors import ConfigError
from mlx_openelm.generation import stream_generate
from mlx_openelm.speculative import (
    DraftLength,
    SpeculativeOptions,
    acceptance_probabilities,
    count_accepted,
    find_lookup_tokens,
    match_vocab,
    residual_distribution,
    SpeculativeOptions,
    speculative_sample,
)
from synthetic import TINY_CONFIG, random_weights, write_hf_checkpoint

PROMPT = [1, 40, 7, 250, 33, 12, 90]
# the first two of the target's three layers (fewer layers, narrower FFN list): a different architecture
SHALLOW_CONFIG = {
    **TINY_CONFIG,
    "num_transformer_layers": 2,
    "num_query_heads": TINY_CONFIG["num_query_heads"][:2],
    "num_kv_heads": TINY_CONFIG["num_kv_heads"][:2],
    "ffn_multipliers": TINY_CONFIG["ffn_multipliers"][:2],
}


def _model(folder, config, weights):
    return load_model(write_hf_checkpoint(folder, config, weights), dtype="float32")


@pytest.fixture(scope="module")
def drafts(loaded, hf_checkpoint, tiny_weights, tmp_path_factory):
    """Drafts for the tiny target: itself, a 4-bit copy, and a shallower model sharing its first layers."""
    target, _ = loaded
    quantized = load_model(hf_checkpoint, dtype="float32")
    nn.quantize(quantized, group_size=32, bits=4)  # 32 divides every input width of the tiny model
    shallow_weights = {k: v for k, v in tiny_weights.items() if "layers.2." not in k}
    shallow = _model(tmp_path_factory.mktemp("shallow"), SHALLOW_CONFIG, shallow_weights)
    return {"self": target, "4-bit": quantized, "shallow": shallow}


def _tokens(steps) -> list[int]:
    return [s.token for s in steps]


def _plain(model, prompt, n, **kwargs) -> list[int]:
    return _tokens(generate_step(prompt, model, max_tokens=n, **kwargs))


# ---- greedy exactness --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["self", "4-bit", "shallow"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_a_draft_model_equals_plain_greedy(loaded, drafts, name, k):
    target, _ = loaded
    for processors in ([], make_logits_processors(1.3)):
        steps = list(generate_step(PROMPT, target, max_tokens=30, draft_model=drafts[name], num_draft_tokens=k,
                                   logits_processors=processors))
        assert _tokens(steps) == _plain(target, PROMPT, 30, logits_processors=processors)
        last = steps[-1]
        assert last.last and last.accepted_tokens == sum(s.from_draft for s in steps)
        assert last.target_forward_passes + last.accepted_tokens == 30  # each pass adds one token of its own
        if name == "self":
            assert last.accepted_tokens == last.drafted_tokens > 0
    assert 0 < last.accepted_tokens <= last.drafted_tokens


def test_prompt_lookup_on_a_repetitive_prompt_equals_plain_greedy(loaded):
    target, _ = loaded
    prompt = [1] + [40, 7, 250, 33, 12, 90, 17, 5] * 4
    for lookup, ngram in ((10, 2), (3, 1), (10, 3)):
        steps = list(generate_step(prompt, target, max_tokens=40, prompt_lookup=lookup, prompt_lookup_ngram=ngram))
        assert _tokens(steps) == _plain(target, prompt, 40)
        assert steps[-1].accepted_tokens > 0  # the model repeats itself: copies get accepted


@pytest.mark.parametrize("mode", [{"draft": "self"}, {"draft": "4-bit"}, {"draft": "shallow"}, {"prompt_lookup": 4}])
def test_exact_across_the_cache_growth_boundary(loaded, drafts, mode):
    target, _ = loaded
    prompt = [1] + [(7 * i) % 300 + 3 for i in range(248)]  # the caches grow past 256 positions while decoding
    kwargs = {"draft_model": drafts[mode["draft"]]} if "draft" in mode else mode
    assert _tokens(generate_step(prompt, target, max_tokens=20, **kwargs)) == _plain(target, prompt, 20)


def test_exact_up_to_the_end_of_the_context(tmp_path, tiny_weights):
    config = {**TINY_CONFIG, "max_context_length": 24}
    target = _model(tmp_path / "t", config, tiny_weights)
    shallow = _model(tmp_path / "s", {**SHALLOW_CONFIG, "max_context_length": 24},
                     {k: v for k, v in tiny_weights.items() if "layers.2." not in k})
    quantized = _model(tmp_path / "q", config, tiny_weights)
    nn.quantize(quantized, group_size=32, bits=4)
    expected = _plain(target, PROMPT, 100)
    assert len(expected) == 24 - len(PROMPT) + 1
    for kwargs in ({"draft_model": target, "num_draft_tokens": 8}, {"draft_model": shallow, "num_draft_tokens": 5},
                   {"draft_model": quantized, "num_draft_tokens": 4}, {"prompt_lookup": 10}):
        steps = list(generate_step(PROMPT, target, max_tokens=100, **kwargs))
        assert _tokens(steps) == expected
        assert [s.last for s in steps].index(True) == len(steps) - 1


def test_cache_continues_like_plain_decoding(loaded, drafts):
    target, _ = loaded
    cache, draft_cache = make_cache(target), make_cache(target)
    first = _tokens(generate_step(PROMPT, target, max_tokens=6, cache=cache, draft_model=target,
                                  draft_cache=draft_cache))
    # both caches hold exactly the tokens before the last one handed out (as after plain decoding)
    assert cache[0].offset == draft_cache[0].offset == len(PROMPT) + 5
    second = _tokens(generate_step([first[-1], 99, 3], target, max_tokens=8, cache=cache, draft_model=target,
                                   draft_cache=draft_cache))
    assert second == _plain(target, PROMPT + first + [99, 3], 8)


# ---- the adaptive draft length ----------------------------------------------------------------


def test_draft_length_grows_on_full_rounds_shrinks_on_rejections_and_pauses_after_misses():
    length = DraftLength(4, patience=2, pause=2, max_pause=4)
    seen = []

    def round_(kept_of):  # kept_of(k) -> kept; returns the k asked for
        k = length.next()
        seen.append(k)
        length.update(k, kept_of(k) if k else 0)

    round_(lambda k: k)  # 4, all kept: stays at the limit
    round_(lambda k: 1)  # 4, one kept (not a miss at 25%): next 2
    round_(lambda k: 0)  # 2, none: a miss, next 1
    round_(lambda k: 0)  # 1, none: the second miss pauses 2 rounds
    round_(lambda k: 0)
    round_(lambda k: 0)
    round_(lambda k: 0)  # the probe (1) misses: pauses 4 rounds (the cap)
    for _ in range(4):
        round_(lambda k: 0)
    round_(lambda k: 0)  # another probe misses: 4 again (capped)
    for _ in range(4):
        round_(lambda k: 0)
    round_(lambda k: k)  # the probe keeps its token: 2 next, and the pause is back to 2
    round_(lambda k: 0)
    round_(lambda k: 0)
    assert seen == [4, 4, 2, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 1]
    assert length.paused == 2 and length.next() == 0


def test_adaptive_drafting_with_a_useless_draft_stays_exact_and_mostly_stops_drafting(loaded, tmp_path):
    target, _ = loaded
    stranger = _model(tmp_path / "stranger", TINY_CONFIG, random_weights(TINY_CONFIG, seed=7))
    prompt = [1] + [(11 * i) % 300 + 3 for i in range(20)]
    for processors in ([], make_logits_processors(1.3)):
        expected = _plain(target, prompt, 60, logits_processors=processors)
        steps = list(generate_step(prompt, target, max_tokens=60, draft_model=stranger, num_draft_tokens=4,
                                   logits_processors=processors))
        assert _tokens(steps) == expected
        last = steps[-1]
        assert last.accepted_tokens <= 2  # it proposes the wrong tokens
        assert last.drafted_tokens < 4 * last.target_forward_passes / 3  # most passes verified no proposal


def test_adaptive_and_fixed_drafting_say_the_same_as_plain_decoding(loaded, drafts):
    """A fixed length (SpeculativeOptions(adaptive=False)) drafts the full length every round."""
    target, _ = loaded
    prompt = [1] + [40, 7, 250, 33, 12, 90, 17, 5] * 3
    expected = _plain(target, prompt, 40)
    for kwargs in ({"draft_model": drafts["shallow"], "num_draft_tokens": 4}, {"prompt_lookup": 6}):
        drafted = {}
        for adaptive in (True, False):
            steps = list(generate_step(prompt, target, max_tokens=40,
                                       speculative=SpeculativeOptions(**kwargs, adaptive=adaptive)))
            assert _tokens(steps) == expected
            drafted[adaptive] = steps[-1].drafted_tokens
        assert drafted[True] <= drafted[False]


# ---- sampling ----------------------------------------------------------------------------------


def test_sampling_with_a_self_draft_accepts_every_proposal(loaded):
    """p == q when the draft is the target: any error in the drafted distributions (temperature, masks,
    repetition-penalty history) would show up as rejections."""
    target, _ = loaded
    sampler = make_sampler(temp=0.8, top_k=50, top_p=0.95, seed=3)
    steps = list(generate_step(PROMPT, target, max_tokens=30, draft_model=target, sampler=sampler,
                               logits_processors=make_logits_processors(1.2)))
    # 7 passes of 3 proposals + 1 own token, then one of 1 + 1 for the last two places of the budget
    assert steps[-1].accepted_tokens == steps[-1].drafted_tokens == 22
    assert steps[-1].target_forward_passes == 8


def test_seeded_speculative_sampling_is_reproducible(loaded, drafts):
    target, _ = loaded
    runs = [
        _tokens(generate_step(PROMPT, target, max_tokens=20, draft_model=drafts["shallow"],
                              sampler=make_sampler(temp=1.0, seed=seed)))
        for seed in (5, 5, 6)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_acceptance_probability_is_min_of_one_and_the_ratio():
    p = mx.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    q = mx.array([[0.2, 0.6, 0.2], [0.5, 0.25, 0.25]])
    accept = acceptance_probabilities(p, q, mx.array([1, 2]))
    np.testing.assert_allclose(np.array(accept), [0.5, 1.0], rtol=1e-6)
    accept = acceptance_probabilities(p, q, mx.array([0, 0]))
    np.testing.assert_allclose(np.array(accept), [1.0, 0.2], rtol=1e-6)


def test_count_accepted_stops_at_the_first_rejection():
    probs = mx.array([0.5, 0.5, 0.5, 0.5])
    assert count_accepted(probs, mx.array([0.1, 0.2, 0.9, 0.1])).item() == 2
    assert count_accepted(probs, mx.array([0.7, 0.1, 0.1, 0.1])).item() == 0
    assert count_accepted(probs, mx.array([0.1, 0.1, 0.1, 0.1])).item() == 4


def test_residual_is_the_normalised_positive_part_of_p_minus_q():
    p = mx.array([0.5, 0.3, 0.2, 0.0])
    q = mx.array([0.2, 0.6, 0.1, 0.1])
    np.testing.assert_allclose(np.array(residual_distribution(p, q)), [0.75, 0.0, 0.25, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.array(residual_distribution(p, p)), np.array(p))  # nothing left: p itself


@pytest.mark.parametrize("proposal", ["drawn from q", "point mass (prompt lookup)"])
def test_speculative_sampling_gives_the_target_distribution(proposal):
    """First and second tokens of 200,000 rounds in one batched call: their frequencies match the
    target's distributions, whatever q proposed (5-sigma bounds, sigma <= 0.0012)."""
    n, vocab = 200_000, 5
    p = mx.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.3, 0.1, 0.2, 0.2, 0.2], [0.6, 0.1, 0.1, 0.1, 0.1]])
    q = mx.array([[0.3, 0.1, 0.4, 0.1, 0.1], [0.0, 0.1, 0.6, 0.1, 0.2]])
    key = mx.random.key(0)
    if proposal == "drawn from q":
        proposals = mx.random.categorical(mx.log(mx.broadcast_to(q, (n, 2, vocab))), key=key)
    else:
        proposals = mx.broadcast_to(mx.array([2, 0]), (n, 2))
        q = (mx.arange(vocab)[None] == mx.array([2, 0])[:, None]).astype(mx.float32)
    accepted, token = speculative_sample(mx.broadcast_to(p, (n, 3, vocab)), mx.broadcast_to(q, (n, 2, vocab)),
                                         proposals, key=mx.random.key(1))
    accepted, token, proposals = np.array(accepted), np.array(token), np.array(proposals)
    first = np.where(accepted >= 1, proposals[:, 0], token)
    np.testing.assert_allclose(np.bincount(first, minlength=vocab) / n, np.array(p[0]), atol=0.006)
    # given the first proposal was accepted, the second token follows p[1]
    kept = accepted >= 1
    second = np.where(accepted[kept] >= 2, proposals[kept, 1], token[kept])
    np.testing.assert_allclose(np.bincount(second, minlength=vocab) / kept.sum(), np.array(p[1]), atol=0.01)


# ---- cache rollback -----------------------------------------------------------------------------


def test_random_propose_and_accept_leaves_the_cache_of_the_accepted_tokens(loaded):
    target, _ = loaded
    rng = np.random.default_rng(0)
    cache = make_cache(target)
    kept = [int(t) for t in rng.integers(3, 384, 5)]
    target(mx.array(kept[:-1])[None], cache=cache)
    while len(kept) < 300:  # past the 256-position growth step
        proposals = [int(t) for t in rng.integers(3, 384, rng.integers(0, 7))]
        target(mx.array(kept[-1:] + proposals)[None], cache=cache)
        n = int(rng.integers(0, len(proposals) + 1))
        kept += proposals[:n] + [int(rng.integers(3, 384))]
        truncate_caches(cache, len(kept) - 1)
        mx.eval([c.state for c in cache])
    reference = make_cache(target)
    target(mx.array(kept[:-1])[None], cache=reference)
    for ours, theirs in zip(cache, reference):
        assert ours.offset == theirs.offset == len(kept) - 1
        for a, b in zip(ours.state, theirs.state):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


# ---- draft compatibility ------------------------------------------------------------------------


def test_a_draft_with_another_vocabulary_is_refused(loaded, tmp_path):
    target, _ = loaded
    config = {**TINY_CONFIG, "vocab_size": 400}
    other = _model(tmp_path / "v400", config, random_weights(config))
    with pytest.raises(ConfigError, match="vocabulary has 400 tokens, the target's 384"):
        list(generate_step(PROMPT, target, draft_model=other))


def test_the_draft_is_checked_once_per_target(loaded, drafts, tmp_path, monkeypatch):
    """Options bound to a target (`for_target`, as ChatSession and the server bind them) pass through
    generate_step unchecked; bound to another model they are checked against that one."""
    import mlx_openelm.speculative as speculative

    target, tokenizer = loaded
    draft = drafts["shallow"]
    calls = []
    real_check = speculative.check_draft
    monkeypatch.setattr(speculative, "check_draft", lambda t, d: calls.append((t, d)) or real_check(t, d))
    options = SpeculativeOptions(draft_model=draft, num_draft_tokens=2).for_target(target)
    assert calls == [(target, draft)] and options.target is target
    assert options.for_target(target) is options
    for _ in range(2):
        assert _tokens(generate_step(PROMPT, target, max_tokens=6, speculative=options)) == _plain(target, PROMPT, 6)
    session = ChatSession(target, tokenizer, speculative=options)
    list(session.send("hello", max_tokens=3))
    assert calls == [(target, draft)]  # not again per call, per session or per reply
    list(generate_step(PROMPT, target, max_tokens=2, draft_model=draft))  # keywords: checked at that call
    assert calls == [(target, draft)] * 2
    config = {**TINY_CONFIG, "vocab_size": 400}
    other = _model(tmp_path / "v400", config, random_weights(config))
    with pytest.raises(ConfigError, match="vocabulary has 384 tokens, the target's 400"):
        list(generate_step(PROMPT, other, max_tokens=2, speculative=options))  # bound to another target


def test_padded_corenet_vocabulary_is_matched_on_the_shared_ids(tmp_path):
    """A 32128-row (CoreNet-padded) copy drafts for the 32000-token model and the other way round."""
    small = {**TINY_CONFIG, "vocab_size": 32000, "num_transformer_layers": 1, "num_query_heads": [4],
             "num_kv_heads": [1], "ffn_multipliers": [0.5]}
    padded = {**small, "vocab_size": 32128}
    weights = random_weights(padded)
    unpadded = {**weights, "transformer.token_embeddings.weight": weights["transformer.token_embeddings.weight"][:32000]}
    model_32000 = _model(tmp_path / "a", small, unpadded)
    model_32128 = _model(tmp_path / "b", padded, weights)
    for target, draft in ((model_32000, model_32128), (model_32128, model_32000)):
        steps = list(generate_step(PROMPT, target, max_tokens=8, draft_model=draft))
        assert _tokens(steps) == _plain(target, PROMPT, 8)
        assert steps[-1].drafted_tokens > 0
    logits = mx.zeros((1, 32000))
    assert match_vocab(logits, 32128)[0, 32000:].tolist() == [-float("inf")] * 128
    assert match_vocab(mx.zeros((2, 32128)), 32000).shape == (2, 32000)


def test_bad_speculative_options(loaded):
    target, _ = loaded
    with pytest.raises(ValueError, match="either draft_model or prompt_lookup"):
        list(generate_step(PROMPT, target, draft_model=target, prompt_lookup=5))
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        list(generate_step(PROMPT, target, draft_model=target, num_draft_tokens=0))
    with pytest.raises(ValueError, match="prompt_lookup must be >= 0"):
        list(generate_step(PROMPT, target, prompt_lookup=-1))
    cache = make_cache(target)
    list(generate_step(PROMPT, target, max_tokens=2, cache=cache))
    with pytest.raises(ValueError, match="needs the draft_cache"):
        list(generate_step([5], target, cache=cache, draft_model=target))


def test_prompt_lookup_follows_hugging_face():
    context = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7]
    assert find_lookup_tokens(context, 3) == [8, 9, 5]  # first earlier "6 7"
    assert find_lookup_tokens(context, 10) == [8, 9, 5, 6, 7, 1, 2, 6, 7]  # not past the end
    assert find_lookup_tokens([4, 1, 2, 9, 3, 2], 2, min_ngram_size=1) == [9, 3]  # no bigram: the unigram "2"
    assert find_lookup_tokens([4, 1, 2, 9, 3, 2], 2) == []  # by default one matching token proposes nothing
    assert find_lookup_tokens([4, 1, 2, 9, 3, 2], 2, max_ngram_size=1) == [9, 3]  # unless n is at most 1
    assert find_lookup_tokens([1, 2, 3], 4) == []
    assert find_lookup_tokens([7], 4) == []


def _hugging_face_lookup(context, num_tokens, max_ngram_size):
    """Hugging Face's prompt lookup, written plainly: n = max down to 1, the first earlier match's continuation."""
    for n in range(min(max_ngram_size, len(context) - 1), 0, -1):
        for start in range(len(context) - n):
            if context[start : start + n] == context[-n:]:
                return context[start + n : start + n + num_tokens]
    return []


def test_prompt_lookup_prefers_the_longest_match_and_equals_the_plain_rule():
    # "3 4" first continues with 9, but the longer suffix "2 3 4" continues with 5
    context = [3, 4, 9, 1, 2, 3, 4, 5, 6, 0, 2, 3, 4]
    assert find_lookup_tokens(context, 2, max_ngram_size=2) == [9, 1]
    assert find_lookup_tokens(context, 2) == [5, 6]
    rng = np.random.default_rng(0)
    for trial in range(300):
        context = rng.integers(0, 4, size=int(rng.integers(1, 40))).tolist()
        k, n = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        assert find_lookup_tokens(context, k, n, min_ngram_size=1) == _hugging_face_lookup(context, k, n), (context, k, n)


# ---- responses and chat -------------------------------------------------------------------------


def test_responses_carry_the_acceptance_statistics(loaded):
    target, tokenizer = loaded
    responses = list(stream_generate(target, tokenizer, PROMPT, max_tokens=12, draft_model=target,
                                     num_draft_tokens=3))
    last = responses[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 12
    assert last.drafted_tokens == last.accepted_tokens == 9 and last.acceptance_rate == 1.0
    assert last.target_forward_passes == 3
    assert [r.from_draft for r in responses] == [True, True, True, False] * 3
    plain = list(stream_generate(target, tokenizer, PROMPT, max_tokens=5))[-1]
    assert (plain.drafted_tokens, plain.acceptance_rate, plain.target_forward_passes) == (0, None, 5)


def test_eos_inside_an_accepted_draft_ends_the_stream_there(hf_checkpoint):
    target, tokenizer = load(hf_checkpoint, dtype="float32")
    expected = _plain(target, PROMPT, 12)
    tokenizer.eos_id = expected[5]  # the 6th token: the 2nd draft of the second pass (k = 3)
    responses = list(stream_generate(target, tokenizer, PROMPT, max_tokens=12, draft_model=target))
    stop = expected.index(expected[5]) + 1
    assert [r.token for r in responses] == expected[:stop] and responses[-1].finish_reason == "stop"
    assert responses[-1].from_draft


def test_chat_reply_closed_mid_pass_keeps_exactly_what_was_said(loaded, drafts):
    """The caches run ahead of the tokens handed out while a pass's tokens stream; a reply cut there
    keeps only what was said, and the next turn is what plain chat says after the same cut."""
    target, tokenizer = loaded
    sessions = [ChatSession(target, tokenizer), ChatSession(target, tokenizer, draft_model=drafts["self"])]
    for session in sessions:
        stream = session.send("Hello there", max_tokens=20)
        [next(stream) for _ in range(2)]  # the 2nd token of a 4-token pass
        stream.close()
    plain, drafted = sessions
    assert drafted.messages == plain.messages and drafted.finish_reason == "interrupted"
    assert [r.token for r in drafted.send("Go on", max_tokens=8)] == [r.token for r in plain.send("Go on", max_tokens=8)]


def test_chat_with_a_draft_reuses_both_caches_and_says_what_plain_chat_says(loaded, drafts):
    target, tokenizer = loaded
    processors = make_logits_processors(1.2)
    plain = ChatSession(target, tokenizer, system="Be brief.")
    drafted = ChatSession(target, tokenizer, system="Be brief.", draft_model=drafts["shallow"])
    for text in ("Hello there", "What is MLX?", "Thanks"):
        expected = [r.token for r in plain.send(text, max_tokens=10, logits_processors=processors)]
        got = [r.token for r in drafted.send(text, max_tokens=10, logits_processors=processors)]
        assert got == expected
        assert drafted.last_prefill_tokens <= plain.last_prefill_tokens + 2  # the draft may lag a token or two
        assert drafted.draft_cache[0].offset == drafted.cache[0].offset == len(drafted.cached_ids)


# ---- command line -------------------------------------------------------------------------------


def test_generate_with_a_draft_or_prompt_lookup_prints_the_plain_text_and_the_acceptance(hf_checkpoint, invoke_cli):
    import json

    base = ["generate", "--model", str(hf_checkpoint), "--prompt", "Once upon a time", "-m", "12", "--json"]
    plain = json.loads(invoke_cli(*base, "--prompt-lookup", "0", catch_exceptions=False).stdout)
    assert (plain["drafted_tokens"], plain["acceptance_rate"], plain["target_passes_per_token"]) == (0, None, 1.0)
    by_default = json.loads(invoke_cli(*base, catch_exceptions=False).stdout)  # prompt lookup, 4 tokens
    assert by_default["text"] == plain["text"]
    drafted = json.loads(invoke_cli(*base, "--draft-model", str(hf_checkpoint), "--num-draft-tokens", "2",
                                    catch_exceptions=False).stdout)
    assert drafted["text"] == plain["text"]
    assert drafted["acceptance_rate"] == 1.0 and drafted["target_forward_passes"] == 4  # 3 tokens a pass
    assert drafted["target_passes_per_token"] == pytest.approx(4 / 12)
    looked_up = json.loads(invoke_cli(*base, "--prompt-lookup", "10", catch_exceptions=False).stdout)
    assert looked_up["text"] == plain["text"]
    result = invoke_cli(*base[:-1], "--draft-model", str(hf_checkpoint), catch_exceptions=False)
    assert result.exit_code == 0
    assert "drafts: 9/9 accepted (100%), 0.25 target passes/token" in result.stderr  # 12 tokens in 3 passes


def test_prompt_lookup_is_on_by_default_for_one_stream_only():
    from mlx_openelm.drafting import SINGLE_STREAM_LOOKUP
    from mlx_openelm.speculative_cli import load_speculative, speculative_options

    assert load_speculative(None, 3, None, "float32").prompt_lookup == SINGLE_STREAM_LOOKUP > 0
    assert load_speculative(None, 3, 0, "float32").enabled is False
    defaults = {}
    for single_stream in (True, False):
        command = speculative_options(single_stream)(click.command()(lambda **kw: None))
        defaults[single_stream] = next(p.default for p in command.params if p.name == "prompt_lookup")
    assert defaults == {True: None, False: 0}  # None: SINGLE_STREAM_LOOKUP, or 0 beside a draft model


def test_cli_refuses_a_draft_with_another_vocabulary_and_two_proposers(hf_checkpoint, tmp_path, invoke_cli):
    config = {**TINY_CONFIG, "vocab_size": 400}
    other = write_hf_checkpoint(tmp_path / "v400", config, random_weights(config))
    base = ["generate", "--model", str(hf_checkpoint), "--prompt", "Once", "-m", "3"]
    result = invoke_cli(*base, "--draft-model", str(other), catch_exceptions=False)
    assert result.exit_code == 1
    assert "Error: the draft model's vocabulary has 400 tokens, the target's 384" in result.stderr
    assert "Traceback" not in result.output
    result = invoke_cli(*base, "--draft-model", str(hf_checkpoint), "--prompt-lookup", "5", catch_exceptions=False)
    assert result.exit_code == 2 and "pick one" in result.stderr


def test_chat_with_a_draft_model_says_what_plain_chat_says(hf_checkpoint, invoke_cli):
    lines = "Hello there\nWhat is MLX?\n"
    plain = invoke_cli("chat", "--model", str(hf_checkpoint), "-m", "8", "--prompt-lookup", "0", input=lines,
                       catch_exceptions=False)
    looked_up = invoke_cli("chat", "--model", str(hf_checkpoint), "-m", "8", input=lines, catch_exceptions=False)
    assert looked_up.exit_code == 0 and looked_up.stdout == plain.stdout and "target passes/token" in looked_up.stderr
    drafted = invoke_cli("chat", "--model", str(hf_checkpoint), "-m", "8", "--draft-model", str(hf_checkpoint),
                         input=lines, catch_exceptions=False)
    assert drafted.exit_code == 0 and drafted.stdout == plain.stdout
    assert drafted.stderr.count("accepted (100%)") == 2 and "accepted" not in plain.stderr


def test_bench_measures_speculative_against_plain_decoding_interleaved(tmp_path, invoke_cli):
    import json

    config = tmp_path / "bench.json"
    config.write_text(json.dumps({
        "model_type": "openelm", "model_dim": 64, "head_dim": 16, "num_transformer_layers": 2, "vocab_size": 256,
        "num_query_heads": [4, 4], "num_kv_heads": [1, 2], "ffn_multipliers": [0.5, 1.0], "ffn_dim_divisor": 32,
    }))
    base = ["bench", "--preset", str(config), "--prompt-tokens", "8", "--generation-tokens", "9", "--trials", "2",
            "--no-warmup", "--dtype", "float32", "--group-size", "32"]
    out = tmp_path / "self.json"
    result = invoke_cli(*base, "--draft-preset", str(config), "--json", str(out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    spec, plain = document["rows"]
    assert spec["variant"] == "draft bench k=3" and plain["variant"] == ""
    # same seed, same preset: a self-draft, every proposal accepted, 9 tokens in 3 passes
    assert spec["acceptance_rate"] == 1.0 and spec["target_passes_per_token"] == pytest.approx(3 / 9)
    assert "acceptance_rate" not in plain
    assert [t["acceptance_rate"] for t in spec["trials"]] == [1.0, 1.0]
    ratio = document["ratios"][0]
    assert ratio["numerator"] == "mlx-openelm [draft bench k=3]" and ratio["denominator"] == "mlx-openelm"
    assert ratio["generation_tps"] == pytest.approx(spec["generation_tps"] / plain["generation_tps"])
    assert "speculative / plain decoding" in result.stdout and "100%" in result.stdout
    quantized = tmp_path / "q4.json"
    assert invoke_cli(*base, "--draft-preset", str(config), "--draft-bits", "4", "--json", str(quantized),
                      catch_exceptions=False).exit_code == 0
    spec = json.loads(quantized.read_text())["rows"][0]
    assert spec["variant"] == "draft bench q4 k=3" and 0 <= spec["acceptance_rate"] <= 1
    lookup = tmp_path / "lookup.json"
    assert invoke_cli(*base, "--prompt-lookup", "4", "--json", str(lookup), catch_exceptions=False).exit_code == 0
    assert json.loads(lookup.read_text())["rows"][0]["variant"] == "lookup 4"
    result = invoke_cli(*base, "--draft-preset", str(config), "--prompt-lookup", "4", catch_exceptions=False)
    assert result.exit_code == 1 and "--draft-preset and --prompt-lookup are alternatives" in result.stderr
