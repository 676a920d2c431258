"""One decoding step's time, ours (`generate_step`) and mlx-lm's on the very same arrays, alternated in
one process: a steadier old-against-new check than `bench`'s medians on a loaded machine.

    python scripts/measure_decode_step.py [--preset 270M] [--bits 16|4] [--tokens 32] [--rounds 3]

Each round generates `--tokens` greedy tokens after a 16-token prompt with each engine (the first
side swaps every round) and records the time between consecutive tokens; the printed figure per
engine is the fastest quarter's mean (the steps the other jobs on a shared machine disturbed least)
and the median, in ms per token. To compare two checkouts, run this file with each checkout's
Python in turn (`/path/to/other/.venv/bin/python scripts/measure_decode_step.py ...`): it imports
only what both have (`mlx_openelm.bench.core`, `generate_step`), so it measures whichever
`mlx_openelm` that interpreter imports. Which BLAS ran is MLX's bundled one unless OpenBLAS is
preloaded (LD_PRELOAD=.../libopenblas.so.0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import mlx.core as mx

import mlx_openelm
from mlx_openelm.bench import core
from mlx_openelm.config import preset_args
from mlx_openelm.generation import generate_step
from mlx_openelm.model import make_cache


def _gaps(tokens) -> list[float]:
    """Seconds between consecutive tokens of an iterator (the first token, after the prompt, excluded)."""
    stamps = []
    for _ in tokens:
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _ours(model, prompt, n):
    return (s.token for s in generate_step(prompt, model, max_tokens=n, cache=make_cache(model)))


def _mlx_lm(lm_model, prompt, n):
    _, lm_generate_step, make_prompt_cache = core.import_mlx_lm()
    steps = lm_generate_step(prompt, lm_model, max_tokens=n, prompt_cache=make_prompt_cache(lm_model))
    return (token for token, _ in steps)


def _summary(gaps: list[float]) -> dict:
    fastest = sorted(gaps)[: max(1, len(gaps) // 4)]
    return {"fast_quarter_ms": 1e3 * sum(fastest) / len(fastest), "median_ms": 1e3 * statistics.median(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="270M")
    parser.add_argument("--bits", type=int, default=16, help="16: float32 as stored; 4 or 8: quantized, group 64")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = core.random_model(preset_args(args.preset), mx.float32)
    if args.bits != 16:
        core.quantize(model, args.bits, 64)
        mx.eval(model.parameters())
    lm_model = core.mlx_lm_model(model)
    prompt = mx.arange(16, dtype=mx.uint32) * 7 % model.args.vocab_size + 3
    sides = {"ours": lambda: _ours(model, prompt, args.tokens), "mlx-lm": lambda: _mlx_lm(lm_model, prompt, args.tokens)}
    gaps = {name: [] for name in sides}
    for name in sides:  # warm-up
        _gaps(sides[name]())
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            gaps[name] += _gaps(sides[name]())
    blas = "OpenBLAS" if "openblas" in os.environ.get("LD_PRELOAD", "") else "bundled BLAS"
    result = {"mlx_openelm": os.path.dirname(mlx_openelm.__file__), "blas": blas, "preset": args.preset,
              "bits": args.bits, "load": os.getloadavg()[0], **{name: _summary(g) for name, g in gaps.items()}}
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
