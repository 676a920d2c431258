"""Aggregate generation throughput of `mlx-openelm serve` for 1 vs N concurrent clients.

    python -m mlx_openelm.bench.serve_load --preset 270M --tokenizer tokenizer.model --clients 1,4

Runs the real server (`mlx_openelm.serve.server`) in this process on a random-weight model of
a published shape (generation on the main thread, HTTP in a thread, as `serve` does),
then for each client count starts that many streaming `/v1/completions` requests at
once (token-id prompts, greedy, fixed length) and reports generated tokens per second
of wall time over all of them. The tokenizer only decodes (any tokenizer.model or tokenizer.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def stream_completion(port: int, prompt: list[int], max_tokens: int) -> int:
    """Run one streamed completion; return its completion token count (from the usage chunk)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "repetition_penalty": 1.0}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    tokens = 0
    for line in response:
        if line.startswith(b"data: {"):
            usage = json.loads(line[6:]).get("usage")
            tokens = usage["completion_tokens"] if usage else tokens
    connection.close()
    return tokens


def measure(port: int, clients: int, prompt_tokens: int, max_tokens: int, vocab: int) -> dict:
    prompts = [[1] + [(17 * i + 31 * j) % (vocab - 3) + 3 for j in range(prompt_tokens - 1)] for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(lambda p: stream_completion(port, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    return {"clients": clients, "tokens": sum(counts), "seconds": round(seconds, 2),
            "aggregate_tps": round(sum(counts) / seconds, 1), "per_client_tps": round(sum(counts) / seconds / clients, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="270M")
    parser.add_argument("--tokenizer", required=True,
                        help="a tokenizer.model or tokenizer.json (only decodes; a tokenizer.json's BOS/EOS: the "
                             "preset's ids 1 and 2)")
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import mlx.core as mx

    from mlx_openelm.bench.core import random_model
    from mlx_openelm.config import preset_args
    from mlx_openelm.errors import OpenELMError
    from mlx_openelm.serve.server import ServerApp, make_server, serve
    from mlx_openelm.tokenizer import Tokenizer

    try:
        model_args = preset_args(args.preset)
        tokenizer = Tokenizer(args.tokenizer, bos_id=model_args.bos_token_id, eos_id=model_args.eos_token_id)
    except OpenELMError as e:
        parser.error(str(e))  # one line and exit 2, as for a bad flag
    model = random_model(model_args, mx.float32)
    # prompt cache off: every request pays its own prefill, as distinct clients would
    app = ServerApp(model, tokenizer, f"random-{args.preset}", prompt_cache_size=0)
    httpd = make_server(app, "127.0.0.1", 0)
    port = httpd.server_address[1]
    results = []

    def drive():
        try:
            measure(port, 1, args.prompt_tokens, 4, model_args.vocab_size)  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                results.append(measure(port, clients, args.prompt_tokens, args.max_tokens, model_args.vocab_size))
        finally:
            app.stop()

    threading.Thread(target=drive, daemon=True).start()
    serve(httpd)  # generation runs here, on the main thread, until `drive` stops it
    print(json.dumps({"preset": args.preset, "dtype": "float32", "prompt_tokens": args.prompt_tokens,
                      "max_tokens": args.max_tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
