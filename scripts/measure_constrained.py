"""Constrained decoding's cost on the trained test model (SmolLM2-135M-Instruct as OpenELM, float32).

Measures, on one chat prompt:

- generation tok/s (from the median time between tokens) unconstrained vs under a grammar that allows
  all text (the same greedy tokens, so the same work but the mask), with the mask overlapped with the
  forward pass (`mx.async_eval`, the default) and without; runs interleaved (A B C D A B ...), the
  median run reported;
- tok/s under a JSON schema (a different, shorter reply: its own row);
- the matcher's mask fill per token (llguidance, p50/p99) and the whole processor step (sync, fill,
  the MLX bitmask apply, evaluated), replaying the JSON reply's tokens;
- first-request costs: the matcher's tokenizer (once per loaded tokenizer) and a new schema's compile;
- 8 batched rows (`mlx_openelm.batching.Batch`), all constrained vs none: total tok/s.

    python scripts/measure_constrained.py [--tokens 48] [--repeats 3]

Prefix `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0` to run the matmuls on
OpenBLAS (the wheel's reference BLAS is the same fp32 math, slower); say which in any table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from support import trained

from mlx_openelm import load
from mlx_openelm.constrain import make_constraint, vocabulary
from mlx_openelm.generation import generate_step
from mlx_openelm.model import make_cache
from mlx_openelm.batching import Batch

ALL_TEXT = r"(?s:.*)"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "hobbies": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
PROMPT = "Describe a fictional person as JSON with a name, an age and a list of hobbies."


def tok_per_s(model, prompt, processors_factory, tokens: int) -> tuple[float, list[int]]:
    """Decode tok/s from the median time between tokens (robust to bursts of load from other
    processes; the first token, which carries the prompt, excluded) and the tokens."""
    out, times = [], []
    for step in generate_step(prompt, model, max_tokens=tokens, logits_processors=processors_factory()):
        out.append(step.token)
        times.append(time.perf_counter())
    return 1 / statistics.median(np.diff(times)), out


def speed_rows(model, tokenizer, prompt, args) -> dict:
    vocab = model.args.vocab_size
    configs = {
        "unconstrained": lambda: [],
        "all-text grammar, mask overlapped with the forward": lambda: [
            make_constraint(tokenizer, regex=ALL_TEXT, vocab_size=vocab)],
        "all-text grammar, not overlapped": lambda: [
            make_constraint(tokenizer, regex=ALL_TEXT, vocab_size=vocab, overlap=False)],
        "JSON schema (its own, shorter reply)": lambda: [make_constraint(tokenizer, json_schema=SCHEMA,
                                                                         vocab_size=vocab)],
    }
    results = {name: [] for name in configs}
    tokens = {}
    for _ in range(args.repeats):
        for name, factory in configs.items():
            speed, out = tok_per_s(model, prompt, factory, args.tokens)
            results[name].append(speed)
            tokens[name] = out
    assert tokens["all-text grammar, mask overlapped with the forward"] == tokens["unconstrained"]
    return {name: (statistics.median(v), len(tokens[name])) for name, v in results.items()}, tokens


def mask_times(model, tokenizer, prompt, reply: list[int]) -> dict:
    import llguidance.numpy

    processor = make_constraint(tokenizer, json_schema=SCHEMA, vocab_size=model.args.vocab_size, overlap=False)
    logits = mx.zeros((1, model.args.vocab_size))
    mx.eval(logits)
    history = list(prompt)
    fills, steps = [], []
    for token in reply:
        t0 = time.perf_counter()
        out = processor(mx.array(history), logits)
        mx.eval(out)
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(processor.matcher, processor.bitmask)
        fills.append(time.perf_counter() - t0)
        history.append(token)

    def p(values, q):
        return float(np.percentile(np.array(values) * 1e6, q))

    return {"mask fill (llguidance) µs p50/p99": (p(fills, 50), p(fills, 99)),
            "processor step (sync, fill, MLX apply, eval) µs p50/p99": (p(steps, 50), p(steps, 99)),
            "tokens replayed": len(reply)}


def first_request(model, tokenizer) -> dict:
    vocabulary._CACHE.clear()
    t0 = time.perf_counter()
    vocabulary.matcher_tokenizer(tokenizer, model.args.vocab_size)
    built = time.perf_counter() - t0
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"], "fresh": {"type": "boolean"}}}
    t0 = time.perf_counter()
    processor = make_constraint(tokenizer, json_schema=schema, vocab_size=model.args.vocab_size)
    compiled = time.perf_counter() - t0
    t0 = time.perf_counter()
    mx.eval(processor(mx.array([1]), mx.zeros((1, model.args.vocab_size))))
    first = time.perf_counter() - t0
    return {"matcher tokenizer build ms (once per tokenizer)": built * 1e3,
            "new schema: compile ms": compiled * 1e3, "new schema: first mask ms": first * 1e3}


def batched(model, tokenizer, prompt, tokens: int, constrained: bool) -> float:
    batch = Batch(model)
    greedy = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
    rows = [batch.add(prompt, make_cache(model), greedy,
                      [make_constraint(tokenizer, json_schema=SCHEMA, vocab_size=model.args.vocab_size)]
                      if constrained else [], tokens) for _ in range(8)]
    produced, start = 0, None
    while any(row in batch for row in rows):
        batch.step()
        for row in rows:
            if row in batch and row.ready:
                step = next(row)
                produced += 1
                if step.last or step.token == tokenizer.eos_id:
                    batch.remove(row)
        if start is None:
            start, produced = time.perf_counter(), 0  # from the first decode step on
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load(trained.trained_model_path())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    print(f"first request: {first_request(model, tokenizer)}")
    speeds, tokens = speed_rows(model, tokenizer, prompt, args)
    base = speeds["unconstrained"][0]
    print("| decoding | tokens | tok/s (median) | vs unconstrained |\n|---|---|---|---|")
    for name, (speed, n) in speeds.items():
        print(f"| {name} | {n} | {speed:.1f} | x{speed / base:.2f} |")
    print(mask_times(model, tokenizer, prompt, tokens["JSON schema (its own, shorter reply)"]))
    plain, constrained = [], []
    for _ in range(args.repeats):
        plain.append(batched(model, tokenizer, prompt, args.tokens, False))
        constrained.append(batched(model, tokenizer, prompt, args.tokens, True))
    print(f"8 batched rows: unconstrained {statistics.median(plain):.1f} tok/s, all JSON-constrained "
          f"{statistics.median(constrained):.1f} tok/s (x{statistics.median(constrained) / statistics.median(plain):.2f})")


if __name__ == "__main__":
    main()
