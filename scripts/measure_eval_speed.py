"""Task scoring speed and agreement: mlx-openelm's batched scorer against `mlx_lm.evaluate.MLXLM`.

Three self-built multiple-choice tasks over text cut from this repository's README (no Hub data
here): HellaSwag-like (a ~60-word context, 4 endings of ~15 words), PIQA-like (a ~20-word goal, 2
solutions of ~25 words) and MMLU-like (a question with 4 lettered options, the answers " A".." D").
Both scorers get the same (context, continuation) requests on the same model folder. mlx-lm encodes
without BOS and without moving trailing spaces; its tokenizer is given BOS here (the contexts end
without spaces), so both read the same tokens and the log-likelihoods are comparable. Reports the
largest log-likelihood difference, whether the chosen answers agree, items/s, CPU seconds per item (this
process's CPU time: steadier than wall time on a shared machine) and peak memory, and the load average.

    python scripts/measure_eval_speed.py [--model FOLDER] [--items 100] [--batch-size auto]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def words() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"[A-Za-z][A-Za-z'-]+", text)


def span(pool, rng, n) -> str:
    start = rng.randrange(len(pool) - n)
    return " ".join(pool[start: start + n])


def make_tasks(items: int, seed: int = 0) -> dict[str, list[list[tuple[str, str]]]]:
    """{task: [item: [(context, continuation), ...]]}"""
    rng, pool = random.Random(seed), words()
    hellaswag = [[(span(pool, rng, 60).capitalize() + ".", " " + span(pool, rng, 15) + ".")
                  for _ in range(1)] for _ in range(items)]
    hellaswag = [[(item[0][0], " " + span(pool, rng, rng.randint(10, 20)) + ".") for _ in range(4)]
                 for item in hellaswag]
    piqa = []
    for _ in range(items):
        goal = "Goal: " + span(pool, rng, 20) + "\nSolution:"
        piqa.append([(goal, " " + span(pool, rng, rng.randint(18, 30))) for _ in range(2)])
    mmlu = []
    for _ in range(items):
        options = "\n".join(f"{letter}. {span(pool, rng, 8)}" for letter in "ABCD")
        question = f"Question: {span(pool, rng, 30)}?\n{options}\nAnswer:"
        mmlu.append([(question, f" {letter}") for letter in "ABCD"])
    return {"hellaswag-like (4 endings)": hellaswag, "piqa-like (2 solutions)": piqa,
            "mmlu-like (one-token answers)": mmlu}


def run_ours(model, tokenizer, requests, batch_size, share):
    import mlx.core as mx

    from mlx_openelm.evaluation.scoring import score

    mx.reset_peak_memory()
    start, cpu = time.perf_counter(), time.process_time()
    scores = score(model, tokenizer, requests, batch_size=batch_size, share_prefixes=share)
    return [s for s, _ in scores], time.perf_counter() - start, time.process_time() - cpu, mx.get_peak_memory() / 1e9


def run_mlx_lm(folder, requests):
    import mlx.core as mx
    from mlx_lm.evaluate import MLXLM

    lm = MLXLM(str(folder), use_chat_template=False, max_tokens=2048)
    tokenizer = lm.tokenizer
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
    lm._tokenize = lambda texts: [[bos] + tokenizer.encode(t, add_special_tokens=False) for t in texts]
    mx.reset_peak_memory()
    start, cpu = time.perf_counter(), time.process_time()
    scores = lm.loglikelihood([SimpleNamespace(args=r) for r in requests])
    return [s for s, _ in scores], time.perf_counter() - start, time.process_time() - cpu, mx.get_peak_memory() / 1e9


def chosen(items, scores):
    out, at = [], 0
    for item in items:
        values = scores[at: at + len(item)]
        out.append(max(range(len(values)), key=values.__getitem__))
        at += len(item)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the trained test model)")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--batch-size", default="auto")
    args = parser.parse_args()
    from mlx_openelm import load

    folder = args.model
    if folder is None:
        from support import trained

        folder = trained.trained_model_path()
    model, tokenizer = load(folder, dtype="float32")
    run_ours(model, tokenizer, [("Warm up the kernels.", " Now.")] * 4, args.batch_size, True)
    print(f"model {folder}, {args.items} items per task, batch size {args.batch_size}")
    print(f"{'task':<30} {'scorer':<28} {'items/s':>8} {'CPU s/item':>10} {'peak GB':>8} {'max |dlogp|':>12} "
          f"{'same answers':>12}")
    for task, items in make_tasks(args.items).items():
        requests = [r for item in items for r in item]
        theirs, seconds, cpu, peak = run_mlx_lm(folder, requests)
        print(f"{task:<30} {'mlx_lm.evaluate':<28} {len(items) / seconds:>8.2f} {cpu / len(items):>10.2f} {peak:>8.3f} "
              f"{'-':>12} {'-':>12}", flush=True)
        for share in (True, False):
            ours, seconds, cpu, peak = run_ours(model, tokenizer, requests, args.batch_size, share)
            diff = max(abs(a - b) for a, b in zip(ours, theirs))
            same = sum(a == b for a, b in zip(chosen(items, ours), chosen(items, theirs)))
            name = "mlx-openelm" + ("" if share else " (no prefix sharing)")
            print(f"{task:<30} {name:<28} {len(items) / seconds:>8.2f} {cpu / len(items):>10.2f} {peak:>8.3f} "
                  f"{diff:>12.2e} {same:>5}/{len(items)}", flush=True)
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
