"""Prompt and decoding speed on the trained test model: ours against mlx-lm, float32 against each
quantized width and group size, interleaved, on whichever BLAS this process loads.

    python scripts/measure_cpu_speed.py [--prompt-tokens 128] [--generation-tokens 24] [--rounds 3]
        [--quant 8:64,6:64,5:64,4:32,4:64,3:64,2:64] [--no-mlx-lm] [--json PATH]
    MLX_OPENELM_BLAS=0 python scripts/measure_cpu_speed.py ...   # MLX's bundled BLAS (mlx-lm out of the box)

The model is the trained test model in float32 (tests/trained.py), quantized in memory (every linear
and the tied embedding, min/max, as `bench --bits` does; group 128 does not divide the model's width, 576). Each round runs every engine once, in the same order (A B C ... A B C ...), on
a fixed random prompt from a fresh cache; the table gives median tok/s over rounds and the ratio to our
float32 in the same rounds. mlx-lm runs the very same arrays (bench.core.mlx_lm_model) in this
process, so on the same BLAS. Greedy outputs of ours and mlx-lm are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import mlx_openelm  # noqa: F401  first: the optimized BLAS is loaded before MLX (mlx_openelm/blas.py)

from mlx_openelm import load_model
from mlx_openelm.bench import core
from mlx_openelm.blas import describe, info
from support import trained  # the test support code: the trained folder


def engines(folder, quant: list[tuple[int, int]], with_mlx_lm: bool) -> dict:
    float_model = load_model(folder)
    found = {"ours float32": core.OursEngine(float_model)}
    if with_mlx_lm:
        found["mlx-lm float32"] = core.MlxLmEngine(core.mlx_lm_model(float_model))
    for bits, group in quant:
        model = load_model(folder)
        core.quantize(model, bits, group)
        found[f"ours {bits}-bit g{group}"] = core.OursEngine(model)
        if with_mlx_lm and (bits, group) == (4, 64):
            found[f"mlx-lm {bits}-bit g{group}"] = core.MlxLmEngine(core.mlx_lm_model(model))
    return found


def measure(found: dict, prompt, generation_tokens: int, rounds: int) -> dict:
    trials = {name: [] for name in found}
    outputs = {}
    for round_ in range(rounds + 1):  # round 0 warms up and keeps the outputs, untimed
        for name, engine in found.items():
            if round_:
                trials[name].append(core.run_trial(engine, prompt, generation_tokens))
            else:
                outputs[name] = list(engine.tokens(prompt, generation_tokens))
        if round_:
            print(f"round {round_}: " + ", ".join(f"{n} {t[-1].generation_tps:.1f}" for n, t in trials.items()),
                  file=sys.stderr)
    if "mlx-lm float32" in outputs:
        assert outputs["mlx-lm float32"] == outputs["ours float32"], "greedy outputs differ"
    return trials


def table(trials: dict) -> list[dict]:
    rows = []
    base = trials["ours float32"]
    for name, runs in trials.items():
        row = {"engine": name}
        for key in ("prompt_tps", "generation_tps"):
            row[key] = statistics.median(getattr(t, key) for t in runs)
            row[f"{key}_ratio"] = statistics.median(getattr(t, key) / getattr(b, key) for t, b in zip(runs, base))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--generation-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quant", default="8:64,6:64,5:64,4:32,4:64,3:64,2:64")
    parser.add_argument("--no-mlx-lm", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quant = [tuple(int(x) for x in item.split(":")) for item in args.quant.split(",") if item]
    folder = trained.trained_model_path()
    found = engines(folder, quant, not args.no_mlx_lm)
    prompt = core.make_prompt(49152, args.prompt_tokens, seed=0)
    load_before = os.getloadavg()[0]
    rows = table(measure(found, prompt, args.generation_tokens, args.rounds))
    machine = {"cpu": core_cpu(), "blas": describe(), "load_average": [load_before, os.getloadavg()[0]]}
    print(f"BLAS: {machine['blas']}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"{args.prompt_tokens}-token prompt, {args.generation_tokens} tokens, {args.rounds} rounds (medians)")
    print("| engine | prompt tok/s | x ours float32 | generation tok/s | x ours float32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['prompt_tps']:.1f} | {r['prompt_tps_ratio']:.2f} | {r['generation_tps']:.2f} | "
              f"{r['generation_tps_ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "blas": info(), "settings": vars(args) | {"json": None},
                                         "rows": rows}, indent=1))


def core_cpu() -> str:
    from mlx_openelm.bench.hardware import cpu_name

    return cpu_name()


if __name__ == "__main__":
    main()
