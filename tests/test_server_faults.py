"""Failure isolation through a real `mlx-openelm serve`: a fault injected into one request's sampler
fails that request alone (a 500, or an error event mid-stream); the requests batched with it finish
with the tokens they would have had alone, and the server keeps serving."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from mlx_openelm import load  # noqa: E402
from test_server import expected, health, start_server  # noqa: E402

FAULTY_SEED = 666  # a request with this seed gets a sampler that raises after FAULT_AFTER tokens
FAULT_AFTER = 3
# The server's own CLI, with the scheduler's make_sampler wrapped to inject the fault.
LAUNCH = f"""
import sys
import mlx_openelm.scheduler as scheduler
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
    s = start_server(hf_checkpoint, "--max-tokens", "24", "--prompt-cache-size", "0", python=("-c", LAUNCH))
    yield s
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=20) == 0, "".join(s.log)


def test_a_fault_in_one_request_fails_it_alone_and_the_server_keeps_serving(server, hf_checkpoint):
    local = load(hf_checkpoint, dtype="float32")
    tokenizer = local[1]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
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
