"""How long a long prompt's prefill stalls the streams already decoding, with and without chunked prefill.

For each `--prefill-chunk` value, runs the real server in this process (generation on the main
thread, HTTP in a thread, as `serve` does) on the tiny synthetic model (fp32, 2048-token context),
starts `--streams` streaming completions, and once each has had 20 tokens sends one request with a
`--prompt-tokens` prompt (token ids, one new token). Reports, over `--trials` runs, the decoding
streams' worst inter-token gap while that prompt was read (the median over trials of each trial's
worst gap), their median gap, and the long request's time to its first token:

    python scripts/measure_prefill_stall.py --prompt-tokens 1500 --chunks 0,256,64

0 reads a whole prompt in one worker turn (the behaviour before chunking). Not part of the test
suite. Timing is client-side: the arrival of each streamed token (`logprobs` makes every token an
event).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlx_openelm import load
from mlx_openelm.serve.server import ServerApp, make_server, serve
from support import synthetic

WARM_TOKENS = 20  # tokens each stream has before the long prompt is sent


def stream(port: int, prompt: list[int], max_tokens: int, times: list[float], started: threading.Event) -> None:
    """One streamed completion; the arrival time of each of its tokens goes to `times`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "logprobs": 1, "repetition_penalty": 1.0}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    for line in connection.getresponse():
        if line.startswith(b"data: {"):
            times.append(time.perf_counter())
            if len(times) == WARM_TOKENS:
                started.set()
    connection.close()


def trial(port: int, streams: int, prompt_tokens: int, vocab: int) -> dict:
    times = [[] for _ in range(streams)]
    started = [threading.Event() for _ in range(streams)]
    long_prompt = [1] + [(31 * j) % (vocab - 3) + 3 for j in range(prompt_tokens - 1)]
    with ThreadPoolExecutor(streams) as pool:
        for i in range(streams):
            pool.submit(stream, port, [1, 5 + i, 9], 1000, times[i], started[i])
        for event in started:
            event.wait()
        sent, first = time.perf_counter(), []
        stream(port, long_prompt, 1, first, threading.Event())
        done = first[0]
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    during = [b - a for t in times for a, b in zip(t, t[1:]) if b > sent and a < done]
    assert all(t[-1] > done for t in times), "a stream ended before the long prompt was read: raise max_tokens"
    return {"worst_gap": max(during), "median_gap": statistics.median(gaps), "ttft": done - sent}


def measure(model, tokenizer, chunk: int, args) -> dict:
    app = ServerApp(model, tokenizer, "tiny", prompt_cache_size=0, prefill_chunk=chunk)
    httpd = make_server(app, "127.0.0.1", 0)
    results = []

    def drive():
        try:
            trial(httpd.server_address[1], args.streams, 64, model.args.vocab_size)  # warm-up
            results.extend(trial(httpd.server_address[1], args.streams, args.prompt_tokens, model.args.vocab_size)
                           for _ in range(args.trials))
        finally:
            app.stop()

    threading.Thread(target=drive, daemon=True).start()
    serve(httpd)

    def median_ms(key):
        return round(1000 * statistics.median(r[key] for r in results), 1)

    return {"prefill_chunk": chunk, "worst_gap_ms": median_ms("worst_gap"), "median_gap_ms": median_ms("median_gap"),
            "long_prompt_ttft_ms": median_ms("ttft"),
            "worst_gap_ms_per_trial": [round(1000 * r["worst_gap"], 1) for r in results]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--chunks", default="0,256,64", help="comma-separated --prefill-chunk values")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp())
    tokenizer_path = synthetic.train_tokenizer(folder / "tokenizer.model")
    config = synthetic.TINY_CONFIG
    weights = synthetic.random_weights(config, seed=0)
    synthetic.write_hf_checkpoint(folder / "model", config, weights, tokenizer=tokenizer_path)
    model, tokenizer = load(folder / "model", dtype="float32")
    rows = [measure(model, tokenizer, int(c), args) for c in args.chunks.split(",")]
    print(json.dumps({"model": "tiny synthetic (fp32)", "streams": args.streams, "prompt_tokens": args.prompt_tokens,
                      "trials": args.trials, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
