"""A real `mlx-openelm serve` process for the tests: started on a free port, spoken to over HTTP.

The server runs as a subprocess because MLX must run on a process's main thread (see
serve/scheduler.py). `expected` is what the same settings give through `generate` in this process.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from mlx_openelm import generate, make_logits_processors

KEY = "test-key"  # the --api-key of the servers that need one
MAX_TOKENS = 24  # the servers' --max-tokens where a test relies on the default reply length


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: list

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(checkpoint, *extra, python=("-m", "mlx_openelm.cli")) -> Server:
    """`mlx-openelm serve` on a free port; `python` is what follows the interpreter (the CLI module)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, *python, "serve", "--model", str(checkpoint), "--port", "0", *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log = []
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        log.append(line)
        match = re.search(r"Serving .* on http://\S+:(\d+)/v1", line)
        if match:
            break
        assert time.monotonic() < deadline, "".join(log)
    else:
        raise AssertionError("server did not start:\n" + "".join(log))
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
    return Server(proc, int(match.group(1)), log)


def expected(local, prompt_ids, max_tokens=MAX_TOKENS, **kwargs) -> str:
    """The greedy reply (repetition penalty 1.2, the servers' default) of the (model, tokenizer) `local`."""
    model, tokenizer = local
    return generate(model, tokenizer, prompt_ids, max_tokens=max_tokens,
                    logits_processors=make_logits_processors(1.2), **kwargs)


def raw(server, method, path, body=None, headers=None):
    """(status, decoded JSON) of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                **(headers or {})})
    response = connection.getresponse()
    result = response.status, json.loads(response.read())
    connection.close()
    return result


def health(server) -> dict:
    return raw(server, "GET", "/health")[1]
