"""The load and soak test's requests (`serve_soak`): each kind, sent over plain HTTP and timed.

Every request is a streamed `/v1/completions` on 127.0.0.1 with per-token log-probabilities
(`logprobs: 0`), so each generated token arrives as its own event and the time to the first
token and the gaps between tokens are measured exactly. The kinds mix what a busy server sees:
plain streams, greedy spot checks and stop strings (whose answers are known from asking alone),
clients that disconnect mid-stream, and deliberate errors that must get their status.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from dataclasses import dataclass, field
from typing import Optional

JSON = {"Content-Type": "application/json"}
# (what is wrong, the request's changes, the status it must get)
DELIBERATE = [
    ("bad field", {"body": {"temperature": "hot"}}, 400),
    ("foreign Host", {"headers": {"Host": "evil.example"}}, 403),
    ("text/plain body", {"headers": {"Content-Type": "text/plain"}}, 415),
    ("unknown URL", {"path": "/v1/nowhere"}, 404),
]
KINDS = ["stream"] * 11 + ["spot"] * 2 + ["stop"] * 2 + ["disconnect"] * 2 + ["deliberate"] * 3


@dataclass
class Outcome:
    """What one request got: `ok` when it is what its kind must get (errors are the rest)."""

    kind: str
    ok: bool
    status: int = 0
    tokens: int = 0
    ttft: Optional[float] = None  # seconds from sending to the first token
    gaps: list[float] = field(default_factory=list)  # seconds between successive tokens
    text: str = ""
    finish_reason: Optional[str] = None
    error: str = ""
    spot: Optional[bool] = None  # spot checks: the text equals the answer alone


def stream(port: int, body: dict, headers: Optional[dict] = None, path: str = "/v1/completions",
           disconnect_after: Optional[int] = None, timeout: float = 300) -> Outcome:
    """Send one streamed completion and read its events (closing early after `disconnect_after` tokens)."""
    body = {**body, "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    outcome = Outcome("", ok=False)
    try:
        start = last = time.perf_counter()
        connection.request("POST", path, body=json.dumps(body), headers={**JSON, **(headers or {})})
        response = connection.getresponse()
        outcome.status = response.status
        if response.status != 200:
            outcome.error = json.loads(response.read() or b"{}").get("error", {}).get("message", "")
            return outcome
        text = []
        for line in response:
            if line.startswith(b"data: [DONE]"):
                outcome.ok = True
                break
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                outcome.error = chunk["error"]["message"]
                break
            if chunk.get("usage"):
                outcome.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                now = time.perf_counter()
                tokens = len((choice.get("logprobs") or {}).get("tokens") or [])
                if tokens:
                    if outcome.ttft is None:
                        outcome.ttft = now - start
                    else:
                        outcome.gaps.append(now - last)
                    last = now
                    outcome.tokens += tokens
                text.append(choice.get("text", ""))
                outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
                if disconnect_after is not None and outcome.tokens >= disconnect_after:
                    response.close()
                    outcome.ok = True
                    break
        outcome.text = "".join(text)
    except (OSError, http.client.HTTPException, ValueError) as e:
        outcome.error = f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    return outcome


@dataclass(frozen=True)
class SpotPrompt:
    """A prompt whose greedy answer alone is known, and a stop string cut from that answer."""

    prompt: list[int]
    answer: str
    stop: Optional[str]


def spot_prompts(port: int, vocab: int, count: int, max_tokens: int, seed: int) -> list[SpotPrompt]:
    """Ask `count` token-id prompts alone, one after another: the reference answers."""
    rng = random.Random(seed)
    spots = []
    for _ in range(count):
        prompt = random_prompt(rng, vocab)
        alone = stream(port, {"prompt": prompt, "max_tokens": max_tokens})
        if not alone.ok:
            raise RuntimeError(f"a spot-check prompt failed alone: {alone.status} {alone.error}")
        text = alone.text
        stop = text[5:8] if len(text) >= 9 and text[5:8].strip() else None
        spots.append(SpotPrompt(prompt, text, stop))
    return spots


def random_prompt(rng: random.Random, vocab: int, low: int = 4, high: int = 32) -> list[int]:
    return [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(low, high) - 1)]


def one_request(port: int, rng: random.Random, vocab: int, spots: list[SpotPrompt], spot_tokens: int) -> Outcome:
    """One request of a kind drawn from `KINDS`."""
    kind = rng.choice(KINDS)
    if kind == "stop" and not any(s.stop for s in spots):
        kind = "spot"
    if kind in ("spot", "stop"):
        spot = rng.choice([s for s in spots if s.stop] if kind == "stop" else spots)
        body = {"prompt": spot.prompt, "max_tokens": spot_tokens}
        want = spot.answer
        if kind == "stop":
            body["stop"] = [spot.stop]
            want = spot.answer[: spot.answer.find(spot.stop)]
        outcome = stream(port, body)
        outcome.spot = outcome.ok and outcome.text == want
    elif kind == "deliberate":
        _, change, status = rng.choice(DELIBERATE)
        body = {"prompt": random_prompt(rng, vocab), "max_tokens": 4, **change.get("body", {})}
        outcome = stream(port, body, change.get("headers"), change.get("path", "/v1/completions"))
        outcome.ok = outcome.status == status
    else:
        body = {"prompt": random_prompt(rng, vocab), "max_tokens": rng.randint(8, 24), "repetition_penalty": 1.0}
        outcome = stream(port, body, disconnect_after=rng.randint(1, 3) if kind == "disconnect" else None)
    outcome.kind = kind
    return outcome
