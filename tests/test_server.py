"""`mlx-openelm serve` end to end: a real server process on 127.0.0.1, driven by the official `openai` client.

One server (tiny synthetic model, fp32) serves the whole module, a subprocess started by
`serving.start_server`. Expected texts come from `generate` in this process with the same settings.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from mlx_openelm import generate, load, make_logits_processors, make_sampler, stream_generate  # noqa: E402
from serving import KEY, MAX_TOKENS, expected, health, raw, start_server  # noqa: E402

LIMIT = 64 * 1024  # --max-request-bytes
JSON = {"Content-Type": "application/json"}  # what the server requires of a body


@pytest.fixture(scope="module")
def server(hf_checkpoint):
    s = start_server(hf_checkpoint, "--api-key", KEY, "--max-request-bytes", str(LIMIT),
                     "--max-tokens", str(MAX_TOKENS), "--model-id", "tiny")
    yield s
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=20) == 0, "".join(s.log)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(hf_checkpoint):
    return load(hf_checkpoint, dtype="float32")


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Once upon a time"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status = health(server)
    assert status["status"] == "ok" and status["model"] == "tiny"


def test_chat_streamed_equals_non_streamed_equals_generate(client, local):
    ids = local[1].apply_chat_template(CHAT)
    want = expected(local, ids)
    whole = client.chat.completions.create(model="tiny", messages=CHAT)
    assert whole.choices[0].message.content == want
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    generated = list(stream_generate(*local, ids, max_tokens=MAX_TOKENS,
                                     logits_processors=make_logits_processors(1.2)))
    assert whole.choices[0].finish_reason == generated[-1].finish_reason
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.usage.completion_tokens == len(generated)
    assert whole.usage.total_tokens == len(ids) + len(generated)


def test_completion_text_and_token_ids(client, local):
    tokenizer = local[1]
    want = expected(local, tokenizer.encode("The quick brown fox"), max_tokens=10)
    text = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10)
    assert text.choices[0].text == want and text.usage.completion_tokens <= 10
    assert text.usage.prompt_tokens == len(tokenizer.encode("The quick brown fox"))
    streamed = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    ids = [1, 40, 7, 250, 33]  # token ids are taken as they are (no BOS added)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == expected(local, ids, max_tokens=8)
    assert by_ids.usage.prompt_tokens == len(ids)


def test_stop_strings_end_the_text_before_them(client, local):
    prompt = "Apple silicon runs"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=30).choices[0].text
    assert len(full) > 8, f"the tiny model should say something: {full!r}"
    stop = full[5:8]
    cut = full[: full.find(stop)]
    for stream in (False, True):
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, stop=[stop, "zzz"],
                                             stream=stream)
        choices = [c.choices[0] for c in response] if stream else response.choices
        assert "".join(c.text for c in choices) == cut
        assert choices[-1].finish_reason == "stop"


def test_seed_reproduces_a_sampled_reply(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=CHAT, temperature=1.0, seed=seed,
                                              max_tokens=16).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9))


def test_logprobs_match_the_model(client, local):
    ids = local[1].apply_chat_template(CHAT)
    model, tokenizer = local
    steps = list(stream_generate(model, tokenizer, ids, max_tokens=6, logits_processors=make_logits_processors(1.2),
                                 sampler=make_sampler()))
    response = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, logprobs=True,
                                              top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == len(steps)
    for entry, step in zip(content, steps):
        assert entry.logprob == pytest.approx(step.logprobs[step.token].item(), abs=1e-4)
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True) and len(top) == 3
        assert top[0] == pytest.approx(entry.logprob, abs=1e-6)  # greedy picks the most likely token
    streamed = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, logprobs=True,
                                              top_logprobs=3, stream=True)
    entries = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for e in chunk.choices[0].logprobs.content]
    assert [(e.token, len(e.top_logprobs)) for e in entries] == [(e.token, len(e.top_logprobs)) for e in content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-4)
    legacy = client.completions.create(model="tiny", prompt=ids, max_tokens=6, logprobs=2).choices[0].logprobs
    assert legacy.token_logprobs == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert all(len(t) <= 2 for t in legacy.top_logprobs) and len(legacy.tokens) == len(steps)


def test_stream_usage_comes_last_when_asked(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_next_chat_turn_reuses_the_cached_prefix(server, client, local):
    first = CHAT[:1] + [{"role": "user", "content": "The dog sleeps."}]
    reply = client.chat.completions.create(model="tiny", messages=first, max_tokens=8)
    first_ids = local[1].apply_chat_template(first)
    second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "And the fox?"}]
    before = health(server)["cached_prompt_tokens"]
    response = client.chat.completions.create(model="tiny", messages=second, max_tokens=8)
    cached = response.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(first_ids)
    assert health(server)["cached_prompt_tokens"] - before == cached
    assert response.choices[0].message.content == expected(local, local[1].apply_chat_template(second), 8)


def test_concurrent_clients_get_their_own_answers(client, local):
    prompts = ["Once upon a time", "The quick brown fox", "Emoji are fun", "Apple silicon"]
    want = [expected(local, local[1].encode(p), max_tokens=16) for p in prompts]

    def ask(i):
        if i % 2:
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16, stream=True)
            return "".join(c.choices[0].text for c in stream)
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == want


def test_concurrent_requests_decode_in_one_batch_and_each_gets_its_own_answer(server, client, local):
    """Rows with their own lengths, penalties, stop strings and limits end without changing the others'."""
    tokenizer = local[1]
    long_ids = tokenizer.encode("Once")
    stop = expected(local, tokenizer.encode("Apple silicon runs"), max_tokens=30)[5:8]
    asks = [("The quick brown fox", dict(max_tokens=3)),
            ("Apple silicon runs", dict(max_tokens=30, stop=[stop])),
            ("Emoji are fun", dict(max_tokens=20, extra_body={"repetition_penalty": 1.0})),
            ("The dog", dict(max_tokens=12, extra_body={"repetition_penalty": 1.5}))]

    def want(prompt, options):
        penalty = options.get("extra_body", {}).get("repetition_penalty", 1.2)
        return generate(*local, tokenizer.encode(prompt), max_tokens=options["max_tokens"],
                        logits_processors=make_logits_processors(penalty), stop=options.get("stop"))

    long = iter(client.completions.create(model="tiny", prompt="Once", max_tokens=300, stream=True))
    text = next(long).choices[0].text  # the long row is decoding while the others join and leave
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda a: client.completions.create(model="tiny", prompt=a[0], **a[1]), asks))
    text += "".join(c.choices[0].text for c in long)
    assert [a.choices[0].text for a in answers] == [want(*a) for a in asks]
    assert answers[1].choices[0].finish_reason == "stop"
    assert text == expected(local, long_ids, max_tokens=300)
    assert health(server)["largest_batch"] >= 2


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_the_generation(server, client, stream):
    before = health(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}", **JSON},
                       body=json.dumps({"prompt": "Once", "max_tokens": 2000, "stream": stream}))
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        response.close()
    else:
        while health(server)["active"] == 0:
            time.sleep(0.01)
    connection.close()
    deadline = time.monotonic() + 20
    while (now := health(server))["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert now["active"] == 0
    assert now["generated_tokens"] - before["generated_tokens"] < 2000
    assert client.completions.create(model="tiny", prompt="Once", max_tokens=3).usage.completion_tokens == 3


ERRORS = [
    ("POST", "/v1/chat/completions", b"{not json", 400, None, None),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "n": 2}, 400, "n", None),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools[0].function",
     None),  # a function tool without its function
    ("POST", "/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, 400, "temperature", None),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "min_p": 1}, 400, "min_p", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id",
     None),  # a tool result needs the id of the call it answers
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    ("POST", "/v1/completions", {"prompt": [5] * 2049}, 400, "prompt", "context_length_exceeded"),
    # JSON that Python's parser refuses with RecursionError or a plain ValueError (were 500s with a traceback)
    ("POST", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000, 400, None, None),
    ("POST", "/v1/chat/completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, None, None),
    # JSON can carry lone surrogates, which are not UTF-8 text (was a 500 and a traceback in the log)
    ("POST", "/v1/completions", b'{"prompt": "\\ud800 x"}', 400, "prompt", None),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udfff"}]}', 400, "messages", None),
    ("POST", "/v1/completions", {"prompt": "x" * (LIMIT + 1)}, 413, None, "request_too_large"),
    ("POST", "/v1/nowhere", {}, 404, None, "unknown_url"),
    ("GET", "/v1/chat/completions", None, 404, None, "unknown_url"),
    ("DELETE", "/v1/models", None, 404, None, "unknown_url"),
]


@pytest.mark.parametrize("method, path, body, status, param, code", ERRORS)
def test_errors_are_openai_shaped(server, method, path, body, status, param, code):
    got, reply = raw(server, method, path, body)
    assert got == status
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert health(server)["status"] == "ok"


def test_a_negative_content_length_is_a_bad_request(server):
    got, reply = raw(server, "POST", "/v1/completions", None, headers={"Content-Length": "-5"})
    assert (got, reply["error"]["message"]) == (400, "Content-Length must be a number of bytes, got -5")
    assert health(server)["status"] == "ok"


def test_client_sees_typed_errors(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[5] * 2049)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.chat.completions.create(model="tiny", messages=CHAT, n=3)
    assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2).usage.completion_tokens == 2


def test_sigterm_mid_stream_exits_cleanly(hf_checkpoint):
    s = start_server(hf_checkpoint, "--max-tokens", "2000")
    connection = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "Once", "stream": True}), headers=JSON)
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=20) == 0
    rest = response.read()
    assert b"shutting down" in rest and b"[DONE]" not in rest
    assert "stopped" in "".join(s.log)


def test_speculative_server_gives_the_greedy_text_and_reuses_both_caches(hf_checkpoint, local):
    s = start_server(hf_checkpoint, "--draft-model", str(hf_checkpoint), "--num-draft-tokens", "3")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        first = [{"role": "user", "content": "Once upon a time"}]
        reply = client.chat.completions.create(model="x", messages=first, max_tokens=12)
        ids = local[1].apply_chat_template(first)
        assert reply.choices[0].message.content == expected(local, ids, 12)
        second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                          {"role": "user", "content": "The dog sleeps."}]
        again = client.chat.completions.create(model="x", messages=second, max_tokens=12)
        assert again.usage.prompt_tokens_details.cached_tokens >= len(ids)
        assert again.choices[0].message.content == expected(local, local[1].apply_chat_template(second), 12)
    finally:
        s.proc.send_signal(signal.SIGINT)  # Ctrl-C: the same clean stop as SIGTERM
        assert s.proc.wait(timeout=20) == 0
    assert "stopped" in "".join(s.log)


def test_a_tokenizer_json_model_serves_chat_completions_and_logprobs(json_checkpoint):
    local_json = load(json_checkpoint, dtype="float32")
    s = start_server(json_checkpoint, "--max-tokens", "10")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        ids = local_json[1].apply_chat_template(CHAT)
        want = expected(local_json, ids, 10)
        chunks = list(client.chat.completions.create(model="x", messages=CHAT, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        reply = client.chat.completions.create(model="x", messages=CHAT, logprobs=True, top_logprobs=2)
        assert reply.choices[0].message.content == want and reply.usage.prompt_tokens == len(ids)
        content = reply.choices[0].logprobs.content  # each token's bytes, byte-level pieces as they are
        assert bytes(b for entry in content for b in entry.bytes).decode(errors="replace") == want
        text = client.completions.create(model="x", prompt="The quick brown fox", max_tokens=6)
        assert text.choices[0].text == expected(local_json, local_json[1].encode("The quick brown fox"), 6)
    finally:
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=20) == 0


def test_prompt_cache_copies_the_longest_prefix_and_supersedes_older_turns(local):
    import mlx.core as mx

    from mlx_openelm.model import make_cache
    from mlx_openelm.cache import PromptCache

    model = local[0]

    def filled(ids):
        cache = make_cache(model)
        model(mx.array(ids)[None], cache=cache)
        return cache

    store = PromptCache(lambda: make_cache(model), capacity=2)
    assert store.fetch([1, 5, 6])[1] == 0  # empty: a fresh cache
    turn1 = [1, 5, 6, 7]
    store.store(turn1, filled(turn1))
    cache, n = store.fetch(turn1 + [8, 9])
    assert n == 4 and all(c.offset == 4 for c in cache)
    # the copy is independent: growing it leaves the stored entry as it was
    model(mx.array([[8, 9]]), cache=cache)
    again, n = store.fetch(turn1)
    assert n == 3 and mx.allclose(again[0].state[0], cache[0].state[0][..., :3, :]).item()
    store.store(turn1 + [8, 9], cache)  # the next turn replaces the previous one
    assert [ids for ids, _ in store.entries] == [turn1 + [8, 9]]
    store.store([1, 20], filled([1, 20]))
    store.store([1, 30], filled([1, 30]))  # capacity 2: the least recently used goes
    assert [ids for ids, _ in store.entries] == [[1, 20], [1, 30]]


def test_a_taken_port_fails_before_loading(server, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlx_openelm.cli", "serve", "--model", str(tmp_path / "absent"),
                             "--port", str(server.port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"--host/--port: cannot listen on 127.0.0.1:{server.port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_requests_are_interleaved_not_queued(server, client):
    """A short request that arrives while a long one streams finishes first (they decode side by side)."""
    finished = {}
    long = client.completions.create(model="tiny", prompt="Once", max_tokens=600, stream=True,
                                     stream_options={"include_usage": True})
    chunks = iter(long)
    next(chunks)

    def drain():
        finished["long_tokens"] = [c.usage for c in chunks][-1].completion_tokens
        finished["long"] = time.monotonic()

    reader = threading.Thread(target=drain)
    reader.start()
    short = client.completions.create(model="tiny", prompt="The dog", max_tokens=4)
    finished["short"] = time.monotonic()
    reader.join(60)
    assert short.usage.completion_tokens == 4 and finished["long_tokens"] > 100  # far from done when short came
    assert finished["short"] < finished["long"]


# ---- every request field, as a chat app sends them ---------------------------------------------


def test_max_completion_tokens_wins_over_max_tokens(client):
    both = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=9, max_completion_tokens=3)
    assert (both.usage.completion_tokens, both.choices[0].finish_reason) == (3, "length")
    legacy = client.completions.create(model="tiny", prompt="Once upon", max_tokens=4)
    assert (legacy.usage.completion_tokens, legacy.choices[0].finish_reason) == (4, "length")


@pytest.mark.parametrize("fields", [{"top_p": 1e-6}, {"extra_body": {"top_k": 1}},
                                    {"extra_body": {"min_p": 0.999}}])
def test_each_filter_reaches_the_sampler(client, local, fields):
    """Each field alone leaves only the most likely token, so a hot, seeded draw is the greedy text."""
    ids = local[1].apply_chat_template(CHAT)
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=1.5, seed=4,
                                           **fields)
    assert reply.choices[0].message.content == expected(local, ids, 12)
    hot = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=1.5, seed=4)
    assert hot.choices[0].message.content != reply.choices[0].message.content  # the filter made the difference


@pytest.mark.parametrize("penalty", [1.0, 1.6])
def test_repetition_penalty_field(client, local, penalty):
    model, tokenizer = local
    ids = tokenizer.encode("Once upon a time")
    got = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16,
                                    extra_body={"repetition_penalty": penalty}).choices[0].text
    assert got == generate(model, tokenizer, ids, max_tokens=16, logits_processors=make_logits_processors(penalty))
    assert got != expected(local, ids, 16)  # not the server's default 1.2


def test_completion_stream_usage_comes_last_when_asked(client, local):
    chunks = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(local[1].encode("Once upon")), 5)
    assert usage.total_tokens == usage.prompt_tokens + 5


def test_a_chat_app_conversation(server, client, local):
    """A system prompt, then turns streamed with a stop string, each sent with the whole history
    (what chat apps do): every reply is `generate`'s with the same stop, and earlier turns come from
    the conversation cache."""
    model, tokenizer = local
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    system_only = len(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    reused, said = [], []
    for text in ("Hello there", "What is MLX?", "Thanks"):
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages)
        full = expected(local, ids, 16)
        stop = next((c for c in full[1:] if c not in ("\ufffd", full[0])), full[1:3])  # it says much U+FFFD
        want = expected(local, ids, 16, stop=[stop])
        assert want == full[: full.find(stop)]
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stream=True,
                                                     stop=stop, stream_options={"include_usage": True}))
        reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert reply == want
        said.append(want)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.prompt_tokens == len(ids)
        reused.append(chunks[-1].usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": reply})
    assert system_only < reused[1] < reused[2]
    assert sum(bool(text) for text in said) >= 2, said  # (a reply of only invalid UTF-8 has no stop to cut at)


def test_a_request_without_the_key_gets_401_and_health_needs_none(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=json.dumps({"messages": CHAT}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 401 and error["code"] == "invalid_api_key" and error["type"]
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    connection.close()


@pytest.mark.parametrize("host, warned", [
    ("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False), ("::1", False), ("[::1]", False),
    ("0.0.0.0", True), ("::", True), ("192.168.1.20", True), ("my-mac.local", True),
])
def test_binding_beyond_loopback_warns(host, warned):
    from mlx_openelm.serve.server import exposure_warning

    warning = exposure_warning(host, api_key=None)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "--api-key" in warning
        assert "--api-key" not in exposure_warning(host, api_key="k")


def test_an_ipv6_loopback_host_binds():
    import socket

    from mlx_openelm.serve.server import make_server

    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    httpd = make_server(None, "::1", 0)
    try:
        assert httpd.server_address[0] == "::1" and httpd.server_address[1] > 0
    finally:
        httpd.server_close()


def test_the_event_stream_is_data_lines_ending_with_done(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}", **JSON},
                       body=json.dumps({"messages": CHAT, "max_tokens": 3, "stream": True, "tool_choice": "none"}))
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = response.read().decode().split("\n\n")
    connection.close()
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * len(chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert len({c["id"] for c in chunks}) == 1
