"""The worker's scheduling through a real `mlx-openelm serve`: a long prompt read in chunks while other
requests decode gives the answers each would have alone; a fault injected into one request's sampler
fails that request alone (a 500, or an error event mid-stream), the requests batched with it finish
with the tokens they would have had alone, and the server keeps serving."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from mlx_openelm import load, make_logits_processors, stream_generate  # noqa: E402
from serving import expected, health, start_server  # noqa: E402

FAULTY_SEED = 666  # a request with this seed gets a sampler that raises after FAULT_AFTER tokens
FAULT_AFTER = 3
# The server's own CLI, with the scheduler's make_sampler wrapped to inject the fault.
LAUNCH = f"""
import sys
import mlx_openelm.serve.scheduler as scheduler
from mlx_openelm.cli import main

def make_sampler(**options):
    sampler, calls = real(**options), []
    if options.get("seed") != {FAULTY_SEED}:
        return sampler
    def faulty(logprobs):
        calls.append(1)
        if len(calls) > {FAULT_AFTER}:
            raise RuntimeError("injected sampler fault")
        return sampler(logprobs)
    return faulty

real, scheduler.make_sampler = scheduler.make_sampler, make_sampler
sys.argv[0] = "mlx-openelm"
main()
"""


@pytest.fixture(scope="module")
def server(hf_checkpoint):
    s = start_server(hf_checkpoint, "--max-tokens", "24", "--prompt-cache-size", "0", "--prefill-chunk", "64",
                     python=("-c", LAUNCH))
    yield s
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=20) == 0, "".join(s.log)


@pytest.fixture(scope="module")
def local(hf_checkpoint):
    return load(hf_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_long_prompt_read_in_chunks_while_others_decode_changes_no_answer(client, local):
    model, tokenizer = local
    long_ids = [1] + [(31 * j) % 380 + 3 for j in range(599)]  # 10 chunks of 64
    steps = list(stream_generate(model, tokenizer, long_ids, max_tokens=8, logits_processors=make_logits_processors(1.2)))
    stream = iter(client.completions.create(model="tiny", prompt="Once", max_tokens=300, stream=True))
    streamed = next(stream).choices[0].text  # decoding while the long prompt is read
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda ids: client.completions.create(model="tiny", prompt=ids, max_tokens=8,
                                                                      logprobs=1),
                                [long_ids, long_ids[:300]]))
    streamed += "".join(c.choices[0].text for c in stream)
    assert streamed == expected(local, tokenizer.encode("Once"), max_tokens=300)
    assert answers[0].choices[0].text == "".join(s.text for s in steps)
    assert answers[0].choices[0].logprobs.token_logprobs == pytest.approx(
        [s.logprobs[s.token].item() for s in steps], abs=1e-4)
    assert answers[1].choices[0].text == expected(local, long_ids[:300], max_tokens=8)


def test_a_fault_in_one_request_fails_it_alone_and_the_server_keeps_serving(server, client, local):
    tokenizer = local[1]
    long = iter(client.completions.create(model="tiny", prompt="Once", max_tokens=300, stream=True))
    long_text = next(long).choices[0].text  # decoding while the faulty requests join the batch and fail

    def faulty_stream(_):
        text = ""
        with pytest.raises(openai.APIError, match="generation failed: RuntimeError"):
            for chunk in client.completions.create(model="tiny", prompt="The dog", stream=True, seed=FAULTY_SEED):
                text += chunk.choices[0].text
        return text

    def faulty_reply(_):
        with pytest.raises(openai.InternalServerError, match="generation failed"):
            client.completions.create(model="tiny", prompt="The quick brown fox", seed=FAULTY_SEED)

    def good(_):
        return client.completions.create(model="tiny", prompt="Apple silicon runs", max_tokens=20).choices[0].text

    with ThreadPoolExecutor(3) as pool:
        streamed, _, answer = [f.result() for f in [pool.submit(faulty_stream, 0), pool.submit(faulty_reply, 0),
                                                    pool.submit(good, 0)]]
    long_text += "".join(c.choices[0].text for c in long)
    assert long_text == expected(local, tokenizer.encode("Once"), max_tokens=300)
    assert answer == expected(local, tokenizer.encode("Apple silicon runs"), max_tokens=20)
    # the faulty stream sent its first tokens before the error event
    assert streamed == expected(local, tokenizer.encode("The dog"), max_tokens=FAULT_AFTER) != ""
    status = health(server)
    assert status["failed"] == 2 and status["largest_batch"] >= 2 and status["active"] == 0
    after = client.completions.create(model="tiny", prompt="The dog", max_tokens=24).choices[0].text
    assert after == expected(local, tokenizer.encode("The dog"))
    assert "injected sampler fault" in "".join(server.log)  # logged for the operator, never sent to the client
