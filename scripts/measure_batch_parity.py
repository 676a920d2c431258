"""Our `batch_generate` against mlx-lm's (`mlx_lm.generate.batch_generate`) on the same weights and
prompts (the numbers in docs/batching.md).

    python scripts/measure_batch_parity.py [--batch 1,4,8] [--tokens 16] [--trials 2] [--json PATH]

The trained test model (SmolLM2-135M-Instruct as an OpenELM folder, float32, tests/trained.py) is
loaded twice: by `mlx_openelm.load` and by `mlx_lm.load` (mlx-lm's own OpenELM and tokenizer). B chat
questions, their token ids from our tokenizer's chat template, given to both; greedy (each side's
default), the same `--tokens` limit, each side stopping at its own EOS ids (printed; they must agree).
Per batch size the two sides alternate `--trials` times (the first side swaps each trial) and the
fastest of each is kept: wall-clock seconds from the call to the results, generated tokens per
second (prompt reading included, EOS not counted) and ours/mlx-lm. The greedy tokens are compared
prompt by prompt. On a shared machine mind the load average printed first and last; which BLAS ran
is MLX's bundled one unless OpenBLAS is preloaded (LD_PRELOAD=.../libopenblas.so.0).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import mlx_openelm  # noqa: F401  first: the optimized BLAS is loaded before MLX (mlx_openelm/blas.py)

import mlx.core as mx

from measure_batching import QUESTIONS, _timed, blas
from mlx_openelm import batch_generate, load
from support import trained  # the test support code: the trained folder


def _load_both(folder: str):
    import mlx_lm

    ours, tokenizer = load(folder, dtype="float32")
    theirs, their_tokenizer = mlx_lm.load(folder)
    ours_eos, their_eos = set(tokenizer.eos_ids), set(their_tokenizer.eos_token_ids)
    assert ours_eos == their_eos, f"EOS ids differ: ours {ours_eos}, mlx-lm {their_eos}"
    dtypes = {p.dtype for m in (ours, theirs) for p in _arrays(m)}
    assert dtypes == {mx.float32}, f"both models must be float32, got {dtypes}"
    print(f"EOS ids {sorted(ours_eos)} on both sides; both models float32", flush=True)
    return (ours, tokenizer), (theirs, their_tokenizer), ours_eos


def _arrays(model):
    from mlx.utils import tree_flatten

    return [p for _, p in tree_flatten(model.parameters())]


def _without_eos(tokens: list[int], eos: set) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Prompts whose greedy tokens are equal, and for the others where they first differ."""
    diverged = []
    for n, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diverged.append({"prompt": n, "at_token": at, "ours_len": len(a), "mlx_lm_len": len(b)})
    return {"equal": len(ours) - len(diverged), "of": len(ours), "diverged": diverged}


def compare(both, eos: set, sizes: list[int], tokens: int, trials: int) -> list[dict]:
    """Per batch size: ours and mlx-lm's batch_generate alternated `trials` times, the fastest of each."""
    from mlx_lm.generate import batch_generate as lm_batch_generate

    (ours, tokenizer), (theirs, their_tokenizer) = both
    rows = []
    for size in sizes:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(size)]
        prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
        sides = {
            "ours": lambda: batch_generate(ours, tokenizer, prompts, tokens).token_ids,
            "mlx-lm": lambda: lm_batch_generate(theirs, their_tokenizer, prompts, max_tokens=tokens,
                                                return_token_ids=True).token_ids,
        }
        times, outputs = {"ours": [], "mlx-lm": []}, {}
        for trial in range(trials + 1):  # the first round warms both up
            for name in (["ours", "mlx-lm"] if trial % 2 else ["mlx-lm", "ours"]):
                seconds, ids = _timed(sides[name])
                outputs[name] = [_without_eos(list(t), eos) for t in ids]
                if trial:
                    times[name].append(seconds)
        generated = {name: sum(len(t) for t in out) for name, out in outputs.items()}
        tps = {name: generated[name] / min(times[name]) for name in times}
        agree = _agreement(outputs["ours"], outputs["mlx-lm"])
        rows.append({"batch": size, "generated": generated, "seconds": {k: min(v) for k, v in times.items()},
                     "tps": tps, "ratio": tps["ours"] / tps["mlx-lm"], "agreement": agree})
        print(f"B={size}: ours {generated['ours']} tokens in {min(times['ours']):.2f} s ({tps['ours']:.1f} tok/s), "
              f"mlx-lm {generated['mlx-lm']} in {min(times['mlx-lm']):.2f} s ({tps['mlx-lm']:.1f} tok/s), "
              f"ours/mlx-lm x{tps['ours'] / tps['mlx-lm']:.2f}; greedy tokens equal for {agree['equal']} of "
              f"{agree['of']} prompts {agree['diverged'] or ''}", flush=True)
    return rows


def _load_line() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,4,8", help="batch sizes, comma list")
    parser.add_argument("--tokens", type=int, default=16, help="the most tokens per reply")
    parser.add_argument("--trials", type=int, default=2, help="timed runs of each side per batch size")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(f"{blas()}, {mx.default_device()}, {_load_line()}", flush=True)
    ours, theirs, eos = _load_both(str(trained.trained_model_path()))
    rows = compare((ours, theirs), eos, [int(b) for b in args.batch.split(",")], args.tokens, args.trials)
    print(f"end: {_load_line()}", flush=True)
    if args.json:
        result = {"model": "SmolLM2-135M-Instruct (trained, float32)", "blas": blas(), "tokens": args.tokens,
                  "trials": args.trials, "rows": rows}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
