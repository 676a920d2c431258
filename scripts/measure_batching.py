"""`batch_generate` against the same prompts one at a time, the cost of one batched decoding step, and a
step-cost model of the same for GPUs (the numbers in docs/batching.md).

    python scripts/measure_batching.py [--batch 1,2,4,8] [--tokens 24] [--context 64] [--steps 5]
        [--preset 270M] [--json PATH]

1. End to end: B chat questions (different lengths) answered greedily, with `stream_generate` one
   after another and with one `batch_generate`, alternated `--trials` times (the fastest of each);
   the tokens are asserted equal (EOS ends a reply on both sides, so both do the same work).
   Wall-clock seconds, generated tok/s, speed-up. On a shared machine take the fastest, and mind
   the load average the first line prints.
2. Step cost: one (B, 1) decoding step with B rows that hold `--context` positions (a batch cache
   built from one prefix), the fastest of `--steps` rounds: ms per step and per row.
3. Model: a decoding step reads every weight once and each row's KV cache, and does 2 flops per
   weight per row: t(B) = overhead + max((W + B*KV) / bandwidth, 2*N*B / flops). B prompts one at
   a time cost B*t(1), batched t(B); the ratio is the speed-up. Printed for the measured model's
   sizes on two GPU profiles (nominal figures; overhead 0, which only favours batching less).

The model is the trained test model (SmolLM2-135M-Instruct as OpenELM, float32, tests/trained.py), or
with `--preset` an OpenELM size with random weights (float32) for parts 2 and 3 only (random weights
never say EOS, so part 1 would only measure the token limit). Which BLAS ran is MLX's bundled one
unless OpenBLAS is preloaded (LD_PRELOAD=.../libopenblas.so.0); the output says which.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import mlx_openelm  # noqa: F401  first: the optimized BLAS is loaded before MLX (mlx_openelm/blas.py)

import mlx.core as mx

from mlx_openelm import batch_generate, load, make_cache, stream_generate
from mlx_openelm.cache import batch_caches
from support import trained  # the test support code: the trained folder

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me a short list of fruits that are red.",
    "What is two plus two?",
    "Describe a cat to someone who has never seen one, in a few words.",
    "Say hello in French.",
]

# name: (memory bandwidth in bytes/s, dense half-precision flops/s), nominal
GPUS = {"Apple M2 Max": (400e9, 27e12), "NVIDIA H100 SXM": (3.35e12, 990e12)}


def blas() -> str:
    from mlx_openelm.blas import describe

    return describe()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def end_to_end(model, tokenizer, sizes: list[int], tokens: int, trials: int) -> list[dict]:
    """Per batch size: one at a time and batched, alternated `trials` times; the fastest of each."""
    rows = []
    for size in sizes:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(size)]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
        sequential, batched = [], []
        for _ in range(trials):
            seconds, alone = _timed(lambda: [[r.token for r in stream_generate(model, tokenizer, p, max_tokens=tokens)]
                                             for p in prompts])
            sequential.append(seconds)
            seconds, together = _timed(lambda: batch_generate(model, tokenizer, prompts, tokens))
            batched.append(seconds)
            assert together.token_ids == alone, "batched tokens differ from one at a time"
        generated, one, many = together.generation_tokens, min(sequential), min(batched)
        rows.append({"batch": size, "generated": generated, "sequential_s": one, "batched_s": many,
                     "sequential_tps": generated / one, "batched_tps": generated / many, "speedup": one / many})
        print(f"B={size}: {generated} tokens, one at a time {one:.2f} s ({generated / one:.1f} tok/s), "
              f"batched {many:.2f} s ({generated / many:.1f} tok/s), x{one / many:.2f}", flush=True)
    return rows


def step_cost(model, sizes: list[int], context: int, steps: int) -> list[dict]:
    """One (B, 1) step's time per batch size, the sizes taken in turn `steps` times; the fastest of each."""
    prefix = make_cache(model)
    model(mx.arange(1, context + 1)[None] % model.args.vocab_size, cache=prefix)
    mx.eval([c.state for c in prefix])
    times = {size: [] for size in sizes}
    for rep in range(steps + 1):  # the first round is a warm-up
        for size in sizes:
            batch = batch_caches([prefix] * size)
            mx.eval([(c.keys, c.values) for c in batch])
            tokens = mx.full((size, 1), 7, dtype=mx.uint32)
            seconds, _ = _timed(lambda: mx.eval(model(tokens, cache=batch, mask=batch[0].mask(1))[:, -1]))
            if rep:
                times[size].append(seconds)
    rows = []
    for size in sizes:
        ms = min(times[size]) * 1e3
        rows.append({"batch": size, "step_ms": ms, "ms_per_row": ms / size})
        print(f"B={size}: one step {ms:.1f} ms, {ms / size:.1f} ms per row", flush=True)
    return rows


def modelled(model, sizes: list[int], contexts: list[int]) -> dict:
    weights = 2 * sum(p.size for _, p in _parameters(model))  # half precision
    parameters = weights // 2
    kv_per_position = 2 * sum(2 * kv * model.args.head_dim for kv in model.args.num_kv_heads)
    table = {}
    for name, (bandwidth, flops) in GPUS.items():
        for context in contexts:
            kv = kv_per_position * context

            def t(b):
                return max((weights + b * kv) / bandwidth, 2 * parameters * b / flops)
            table[f"{name}, context {context}"] = [{"batch": b, "step_ms": t(b) * 1e3, "speedup": b * t(1) / t(b)}
                                                   for b in sizes]
            print(f"{name}, rows of {context} positions: " + ", ".join(
                f"B={b} {t(b) * 1e3:.3f} ms x{b * t(1) / t(b):.2f}" for b in sizes), flush=True)
        bound = weights * flops / (2 * parameters * bandwidth)  # where compute catches up with the weights' read
        print(f"{name}: compute-bound from B = {bound:.0f} (KV reads aside)", flush=True)
    return {"weights_bytes_fp16": weights, "kv_bytes_per_position_fp16": kv_per_position, "gpus": table}


def _parameters(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,2,4,8", help="batch sizes, comma list")
    parser.add_argument("--tokens", type=int, default=24, help="the most tokens per reply")
    parser.add_argument("--context", type=int, default=64, help="positions each row holds in the step-cost part")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size in the step-cost part")
    parser.add_argument("--gpu-contexts", default="64,1024", help="positions per row in the GPU model, comma list")
    parser.add_argument("--trials", type=int, default=2, help="timed runs of each side per batch size (part 1)")
    parser.add_argument("--preset", default=None, help="an OpenELM size with random weights (parts 2 and 3)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch.split(",")]
    print(f"{blas()}, {mx.default_device()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if args.preset:
        from mlx_openelm.bench.core import random_model
        from mlx_openelm.config import preset_args

        model, label, rows = random_model(preset_args(args.preset), mx.float32), f"{args.preset} (random)", None
    else:
        model, tokenizer = load(trained.trained_model_path(), dtype="float32")
        label = "SmolLM2-135M-Instruct (trained, float32)"
        rows = end_to_end(model, tokenizer, sizes, args.tokens, args.trials)
    steps = step_cost(model, sizes, args.context, args.steps)
    result = {"model": label, "blas": blas(), "end_to_end": rows, "step_cost": steps, "context": args.context,
              "model_of_gpus": modelled(model, sizes, [int(c) for c in args.gpu_contexts.split(",")])}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
