"""Chat: the OpenELM-Instruct template, ChatSession's cache reuse, Ctrl-C, context overflow, the REPL."""

from __future__ import annotations

import re

import mlx.core as mx
import pytest

from mlx_openelm import generate_step, load, make_logits_processors
from mlx_openelm.chat import ChatSession
from mlx_openelm.errors import ContextLengthError
from mlx_openelm.tokenizer import Tokenizer

from synthetic import TINY_CONFIG, CountingModel, random_weights, write_hf_checkpoint

BOS, EOS = 1, 2


# ---- template --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def test_template_single_user_turn(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids == [BOS] + tok.sp.encode("<|user|>\nhi") + [EOS] + tok.sp.encode("\n<|assistant|>\n")


def test_template_with_system_prompt(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MLX?"}]
    ids = tok.apply_chat_template(messages)
    assert ids == (
        [BOS] + tok.sp.encode("<|system|>\nBe brief.") + [EOS]
        + tok.sp.encode("\n<|user|>\nWhat is MLX?") + [EOS] + tok.sp.encode("\n<|assistant|>\n")
    )


def test_template_multi_turn_with_replies(tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "Thanks"},
    ]
    enc = tok.sp.encode
    expected_body = (
        [BOS] + enc("<|system|>\nS") + [EOS] + enc("\n<|user|>\nHello") + [EOS]
        + enc("\n<|assistant|>\nParis is the capital.") + [EOS] + enc("\n<|user|>\nThanks") + [EOS]
    )
    assert tok.apply_chat_template(messages) == expected_body + enc("\n<|assistant|>\n")
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert closed == expected_body + enc("\n")
    # every </s> is the EOS id, never text; a literal "</s>" in a message stays text
    assert closed.count(EOS) == 4 and "</s>" not in tok.decode(closed)
    literal = tok.apply_chat_template([{"role": "user", "content": "say </s>"}])
    assert literal.count(EOS) == 1 and "</s>" in tok.decode(literal)


@pytest.mark.parametrize(
    "bad", [[{"role": "bot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}]]
)
def test_template_rejects_bad_messages(tok, bad):
    with pytest.raises(ValueError, match="message 0"):
        tok.apply_chat_template(bad)


def test_template_matches_transformers_fast_llama_tokenizer(tok, tokenizer_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    try:
        hf = transformers.LlamaTokenizerFast.from_pretrained(
            str(tmp_path), legacy=True, from_slow=True, add_bos_token=True, add_eos_token=False
        )
    except Exception as e:  # conversion needs sentencepiece/protobuf/tokenizers
        pytest.skip(f"cannot build LlamaTokenizerFast here: {e}")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "Héllo wörld 🎉"},
    ]
    text = "".join(
        f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages
    ) + "<|assistant|>\n"
    assert hf(text)["input_ids"] == tok.apply_chat_template(messages)


# ---- ChatSession -----------------------------------------------------------------------

def fresh_reply(model, ids, max_tokens, penalty=1.2):
    """What the model says after the whole conversation, with no cache reuse."""
    steps = generate_step(ids, model, max_tokens=max_tokens, logits_processors=make_logits_processors(penalty))
    return [step.token for step in steps]


def send(session, text, max_tokens=8, **kwargs):
    kwargs.setdefault("logits_processors", make_logits_processors(1.2))
    return [r.token for r in session.send(text, max_tokens=max_tokens, **kwargs)]


def test_second_turn_feeds_only_the_new_tokens(loaded):
    model, tokenizer = loaded
    counting = CountingModel(model)
    session = ChatSession(counting, tokenizer, system="Be brief.")
    ids1 = session.conversation_ids(session.messages + [{"role": "user", "content": "Hello there"}])
    reply1 = send(session, "Hello there")
    # the prompt goes in as all-but-last (cache only) then the last token (logits)
    assert counting.widths[:2] == [len(ids1) - 1, 1] and len(ids1) == session.last_prefill_tokens
    assert len(reply1) == 8 and session.finish_reason == "length"
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]

    counting.widths.clear()
    ids2 = session.conversation_ids(session.messages + [{"role": "user", "content": "Tell me more"}])
    reply2 = send(session, "Tell me more")
    fed = session.last_prefill_tokens
    assert counting.widths[:2] == [fed - 1, 1]
    assert len(ids2) - fed >= len(ids1)  # the whole first prompt came from the cache
    assert sum(counting.widths) < len(ids2)  # the history was not re-run
    # reusing the cache changes nothing: same reply as a fresh run over the full conversation
    assert reply2 == fresh_reply(model, ids2, 8)
    assert all(c.offset == len(session.cached_ids) for c in session.cache)
    assert session.cached_ids == ids2 + reply2[:-1]


def test_logits_processors_see_the_whole_conversation(loaded):
    model, tokenizer = loaded
    seen = []

    def record(history, logits):
        seen.append(history.tolist())
        return logits

    session = ChatSession(model, tokenizer, system="Be brief.")
    send(session, "Hello there", max_tokens=4)
    ids2 = session.conversation_ids(session.messages + [{"role": "user", "content": "More"}])
    reply2 = send(session, "More", max_tokens=3, logits_processors=[record])
    assert session.last_prefill_tokens < len(ids2)
    assert seen == [ids2, ids2 + reply2[:1], ids2 + reply2[:2]]  # as Hugging Face's generate would


def forced_sampler(tokens):
    """A sampler that emits `tokens`, then EOS forever."""
    queue = list(tokens)

    def sample(logprobs):
        return mx.array([queue.pop(0) if queue else EOS])

    return sample


def test_reply_ending_with_eos_is_cached_through_eos(loaded):
    model, tokenizer = loaded
    user = {"role": "user", "content": "Where?"}
    prompt = tokenizer.apply_chat_template([user])
    closed = tokenizer.apply_chat_template([user, {"role": "assistant", "content": "Paris is the capital."}],
                                           add_generation_prompt=False)
    assert closed[: len(prompt)] == prompt
    reply_tokens = closed[len(prompt): closed.index(EOS, len(prompt))]

    counting = CountingModel(model)
    session = ChatSession(counting, tokenizer)
    out = [r for r in session.send("Where?", max_tokens=50, sampler=forced_sampler(reply_tokens))]
    assert [r.token for r in out] == reply_tokens + [EOS] and out[-1].finish_reason == "stop"
    assert session.messages[-1] == {"role": "assistant", "content": "Paris is the capital."}
    assert "".join(r.text for r in out) == "Paris is the capital."

    ids2 = session.conversation_ids(session.messages + [{"role": "user", "content": "Sure?"}])
    assert ids2[: len(closed) - 1] == closed[:-1]  # ..., reply, EOS, then the new turn
    counting.widths.clear()
    reply2 = send(session, "Sure?")
    # everything up to the reply came from the cache; the EOS at most is fed again
    assert len(ids2) - session.last_prefill_tokens >= len(prompt) + len(reply_tokens)
    assert reply2 == fresh_reply(model, ids2, 8)


def test_interrupted_reply_keeps_the_partial_reply_and_the_session_usable(loaded):
    model, tokenizer = loaded
    counting = CountingModel(model, interrupt_at=5)  # the prompt, 3 decode steps, then Ctrl-C
    session = ChatSession(counting, tokenizer)
    streamed = []
    with pytest.raises(KeyboardInterrupt):
        for response in session.send("Hello there", max_tokens=20, logits_processors=make_logits_processors(1.2)):
            streamed.append(response.token)
    assert session.finish_reason == "interrupted"
    assert 0 < len(streamed) < 20
    assert session.messages[-1] == {"role": "assistant", "content": tokenizer.decode(streamed)}
    assert len({c.offset for c in session.cache}) == 1 and session.cache[0].offset == len(session.cached_ids)

    ids2 = session.conversation_ids(session.messages + [{"role": "user", "content": "Go on"}])
    reply2 = send(session, "Go on")
    assert session.finish_reason == "length"
    assert reply2 == fresh_reply(model, ids2, 8)


def test_closing_the_stream_early_counts_as_an_interrupt(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    stream = session.send("Hello there", max_tokens=20)
    first = [next(stream).token for _ in range(3)]
    stream.close()
    assert session.finish_reason == "interrupted"
    assert session.messages[-1]["content"] == tokenizer.decode(first)
    ids2 = session.conversation_ids(session.messages + [{"role": "user", "content": "Go on"}])
    assert send(session, "Go on") == fresh_reply(model, ids2, 8)


def test_interrupt_during_prefill_leaves_the_conversation_unchanged(loaded):
    model, tokenizer = loaded
    counting = CountingModel(model)
    session = ChatSession(counting, tokenizer, system="S")
    send(session, "Hello there", max_tokens=4)
    before = [dict(m) for m in session.messages]
    counting.interrupt_at = len(counting.widths) + 1  # the next call: the new turn's prefill
    with pytest.raises(KeyboardInterrupt):
        send(session, "Another")
    assert session.messages == before and session.finish_reason == "interrupted"
    ids = session.conversation_ids(session.messages + [{"role": "user", "content": "Another"}])
    assert send(session, "Another") == fresh_reply(model, ids, 8)


def test_reset_starts_over_and_keeps_the_system_prompt(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be brief.")
    first = send(session, "Hello there")
    send(session, "More")
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.cached_ids == [] and all(c.offset == 0 for c in session.cache)
    assert send(session, "Hello there") == first


def test_long_multi_turn_chat_matches_a_fresh_run_each_turn(loaded):
    """Issue 8's crash: turns of up to 120 tokens grow the cache past its 256-position steps
    after a trim (update(300), trim(250), update(500)); every cached reply must equal the
    greedy reply of a fresh run over the whole conversation."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be brief.")
    texts = ["Hi!", "How are you?", "Tell me more.", "And then?", "Ok."]
    for text in texts:
        reply = [r.token for r in session.send(text, max_tokens=120)]
        seen = session.conversation_ids(session.messages[:-1])
        # one uncached forward over the conversation and the reply: greedy picks every reply token
        logits = model(mx.array(seen + reply[:-1])[None])[0, len(seen) - 1:]
        assert reply == mx.argmax(logits, axis=-1).tolist()
        assert all(c.offset == len(session.cached_ids) for c in session.cache)
    assert len(session.cached_ids) > 2 * 256  # the cache grew through several steps
    assert len(session.messages) == 1 + 2 * len(texts)  # nothing was dropped


# ---- context overflow ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_context(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-ctx96"
    write_hf_checkpoint(folder, {**TINY_CONFIG, "max_context_length": 96}, random_weights(TINY_CONFIG, seed=3),
                        tokenizer=tokenizer_path)
    return folder


def test_context_overflow_drops_oldest_turns_keeps_system_and_stays_exact(small_context):
    model, tokenizer = load(small_context)
    notices = []
    session = ChatSession(model, tokenizer, system="Be brief.", notify=notices.append)
    texts = ["Hello there", "Tell me a story about apples", "More please", "And then?", "Why?"]
    for text in texts:
        reply = send(session, text, max_tokens=24)
        assert session.messages[0] == {"role": "system", "content": "Be brief."}
        assert session.messages[-2] == {"role": "user", "content": text}
        assert all(c.offset <= 96 for c in session.cache)
        # the reply is exactly the model's answer to the (possibly shortened) conversation
        seen = session.conversation_ids(session.messages[:-1])
        # the reply reserve fits after the conversation, or nothing older is left to drop
        assert len(seen) + 24 <= 96 or len(session.messages) == 3
        assert reply == fresh_reply(model, seen, 24)
    notice = (r"\[context nearly full: dropped the (oldest turn|\d+ oldest turns), kept the system prompt "
              r"and rebuilt the cache\]")
    assert notices and all(re.fullmatch(notice, n) for n in notices)
    assert len(session.messages) < 1 + 2 * len(texts)


@pytest.fixture(scope="module")
def context_256(tmp_path_factory, tokenizer_path):
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-ctx256"
    write_hf_checkpoint(folder, {**TINY_CONFIG, "max_context_length": 256}, random_weights(TINY_CONFIG, seed=3),
                        tokenizer=tokenizer_path)
    return load(folder)


def chat_rebuilds(session, turns, max_tokens):
    """Run `turns` short turns; returns the turns that re-read history (took less than the
    previous turn's prompt from the cache)."""
    rebuilds, previous_prompt = [], 0
    for n in range(turns):
        send(session, f"Tell me about apples {n}", max_tokens=max_tokens)
        prompt = len(session.conversation_ids(session.messages[:-1]))
        if prompt - session.last_prefill_tokens < previous_prompt:
            rebuilds.append(n)
        previous_prompt = prompt
        assert all(c.offset <= session.context_length for c in session.cache)
    return rebuilds


def test_a_full_context_is_cut_to_half_so_the_next_turns_need_no_rebuild(context_256):
    """Issue 8: a chat at a full context re-read the whole history on every turn."""
    model, tokenizer = context_256  # a turn takes about 40 of the 256 positions
    notices = []
    session = ChatSession(model, tokenizer, system="S", notify=notices.append)
    rebuilds = chat_rebuilds(session, 16, max_tokens=8)
    assert len(notices) == len(rebuilds) >= 3
    assert all(b - a >= 3 for a, b in zip(rebuilds, rebuilds[1:]))  # two turns or more between rebuilds
    # dropping only what is needed (the old policy) rebuilds on every turn once full
    tight = chat_rebuilds(ChatSession(model, tokenizer, system="S", refit_fraction=1.0), 16, max_tokens=8)
    assert len(tight) > 2 * len(rebuilds) and all(b - a == 1 for a, b in zip(tight, tight[1:]))


def test_after_dropping_turns_the_rest_fits_in_half_the_context(context_256):
    model, tokenizer = context_256
    session = ChatSession(model, tokenizer, system="S")
    for n in range(12):
        before = len(session.messages)
        reply = send(session, f"Tell me about apples {n}", max_tokens=8)
        seen = session.conversation_ids(session.messages[:-1])
        if len(session.messages) < before + 2:  # turns were dropped
            assert len(seen) + 8 <= 256 // 2 and session.messages[0]["role"] == "system"
        assert reply == fresh_reply(model, seen, 8)


def test_a_message_too_long_for_the_context_is_refused_cleanly(small_context):
    model, tokenizer = load(small_context)
    session = ChatSession(model, tokenizer)
    send(session, "Hello", max_tokens=4)
    before = list(session.messages)
    with pytest.raises(ContextLengthError, match="no room for a reply"):
        send(session, "apples " * 200)
    assert session.messages == before
    assert len(send(session, "Hi", max_tokens=4)) == 4
