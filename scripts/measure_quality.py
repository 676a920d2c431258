"""Quantization quality on the trained test model (SmolLM2-135M-Instruct as OpenELM, tests/trained.py).

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0   # see below
    python scripts/measure_quality.py grid    /tmp/quality --bits 2,3,4,5,6,8 --groups 32,64,128 \\
                                              --methods minmax,optimal,calibrated
    python scripts/measure_quality.py grid    /tmp/quality --recipes mixed-2-4,mixed-3-6,mixed-4-8 --groups 64
    python scripts/measure_quality.py parts   /tmp/quality --bits 3 --groups 64 --methods minmax --tokens 1024 \\
                                              --parts head,layers:0-3,layers:13-16,layers:26-29
    python scripts/measure_quality.py table   /tmp/quality
    python scripts/measure_quality.py paired  /tmp/quality --bits 8 --groups 64 --methods minmax,optimal --tokens 16384

Each conversion is `mlx_openelm.convert.convert` (what `mlx-openelm convert` runs; its own 64-token KL
check is skipped, as with `--no-eval`); `calibrated` is `optimal` with `--calibration-text` on the
calibration half of `tests/trained.py`'s `real_text` (the converter reads its first 512 tokens). Each
score is `mlx_openelm.evaluate.evaluate` (what `mlx-openelm eval --reference FLOAT` runs) on the first
2048 tokens of the held-out half (`real_text("eval")`, cut at a line end: DIR/eval.txt), windows of 1024
tokens (the next one starting at the last one's last token, so every token is scored once, from up to 1023 earlier ones): KL(float || quantized) per token, perplexity, top-1 agreement. Nothing scored is
ever calibration text.

Compute: MLX's CPU matmuls here use the reference BLAS of the mlx[cpu] wheel (~1.5 GFLOP/s) and its
quantized matmuls are slow too, so the quantized model is scored through its dequantized float copy
(`mx.dequantize` of exactly the stored codes, scales and biases: the same function up to float32
round-off; each result records the largest logit difference between the two on a few tokens), and
the measurement runs with OpenBLAS preloaded (same float32 results to round-off, ~20x faster). The
float reference's log-probabilities are computed once per run.

`parts` quantizes one part of the model at a time (the tied embedding/head, each decoder layer, each
kind of linear across all layers) with the converter's quantizer, in memory, everything else float:
each part's share of the KL. Its `optimal` weighs columns by the norms' data-free importance, as the
converter does without `--calibration-text` (`calibrated` is not offered there). Results go to DIR/results.jsonl (one JSON line each; finished ones are
skipped on a rerun), `table` prints them as Markdown.

`paired` tells a perplexity difference from noise: each setting's per-token negative log-likelihood on
the first `--tokens` tokens of the whole held-out half (same windows), then the mean difference
against float and against min/max at the same bits and group, each with its standard error (over
blocks of 64 tokens, since neighbouring tokens' losses are correlated).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

CONTEXT, STRIDE = 1024, 1023  # windows of 1024 tokens, overlapping by one: each token scored once
EVAL_TOKENS = 2048  # DIR/eval.txt: the held-out text up to the line end after this many tokens
CHECK_TOKENS = 8  # the quantized model itself vs its dequantized copy, on this many tokens


def write_texts(folder: Path, tokenizer, tokens: int = EVAL_TOKENS) -> Path:
    """DIR/eval.txt (the held-out text's start, cut at a line end after `tokens` tokens) and
    DIR/calibration.txt (the calibration half); returns the eval file."""
    from support import trained

    text = trained.real_text("eval")
    ids = tokenizer.encode(text)
    prefix = tokenizer.decode(ids[1 : tokens + 1])
    cut = text.find("\n", len(prefix))
    (folder / "eval.txt").write_text(text if cut < 0 else text[:cut] + "\n", encoding="utf-8")
    (folder / "calibration.txt").write_text(trained.real_text("calibration"), encoding="utf-8")
    return folder / "eval.txt"


class CachedModel:
    """A model whose logits are computed once per input (the float reference of every score)."""

    def __init__(self, model):
        self.model, self.args, self.cache = model, model.args, {}

    def __call__(self, tokens):
        import mlx.core as mx

        key = tuple(tokens[0].tolist())
        if key not in self.cache:
            self.cache[key] = self.model(tokens)
            mx.eval(self.cache[key])
        return self.cache[key]


def dequantized_copy(model):
    """The model with every quantized layer replaced by a float one holding mx.dequantize of its
    stored codes, scales and biases (float32)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    swaps = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(module.weight, module.scales.astype(mx.float32),
                                   module.biases.astype(mx.float32), group_size=module.group_size,
                                   bits=module.bits).astype(mx.float32)
            rows, cols = weight.shape
            new = nn.Linear(cols, rows, bias=False) if isinstance(module, nn.QuantizedLinear) else nn.Embedding(rows, cols)
            new.weight = weight
            swaps.append((path, new))
    model.update_modules(tree_unflatten(swaps))
    mx.eval(model.parameters())
    return model


def score(model, tokens: list, reference) -> dict:
    from mlx_openelm.evaluate import evaluate

    context = min(CONTEXT, len(tokens))
    r = evaluate(model, tokens, context=context, stride=min(STRIDE, context - 1), reference=reference)
    return {"tokens": r.tokens, "kl": r.kl_mean, "kl_max": r.kl_max, "top1": r.top1_agreement,
            "ppl": r.perplexity, "ref_ppl": r.reference_perplexity, "eval_seconds": r.seconds}


def convert_and_score(work: Path, source: Path, label: str, quant: dict, tokens: list, reference) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_openelm import load_model
    from mlx_openelm.convert import convert

    out = work / "models" / label
    start = time.perf_counter()
    report = convert(source, out, evaluate=False, force=True, **quant)
    seconds = time.perf_counter() - start
    model = load_model(out, dtype="float32")
    probe = mx.array([tokens[:CHECK_TOKENS]])
    quantized_logits = np.array(model(probe))
    model = dequantized_copy(model)
    check = float(np.abs(np.array(model(probe)) - quantized_logits).max())
    result = {"label": label, **quant, "bits_per_weight": report.bits_per_weight, "convert_seconds": seconds,
              "max_rel_error": report.max_rel_error, "dequantized_max_logit_diff": check,
              "calibration": report.calibration, **score(model, tokens, reference)}
    shutil.rmtree(out, ignore_errors=True)
    return result


def token_nlls(model, tokens: list) -> "np.ndarray":
    """Per-token negative log-likelihood of tokens[1:], in the same windows as `score`."""
    import mlx.core as mx
    import numpy as np

    from mlx_openelm.evaluate import sliding_windows, window_log_probs

    out = []
    for window in sliding_windows(len(tokens), CONTEXT, STRIDE):
        log_probs = window_log_probs(model, tokens, window)
        targets = mx.array(tokens[window.first : window.end])[:, None]
        out.append(np.array(-mx.take_along_axis(log_probs, targets, axis=-1)[:, 0]))
    return np.concatenate(out)


BLOCK = 64  # tokens per block for the standard error of a mean loss difference


def mean_and_error(differences) -> tuple[float, float]:
    """Mean of per-token differences and its standard error over blocks of BLOCK tokens."""
    import numpy as np

    n = len(differences) // BLOCK * BLOCK
    blocks = differences[:n].reshape(-1, BLOCK).mean(axis=1)
    return float(differences.mean()), float(blocks.std(ddof=1) / np.sqrt(len(blocks)))


def paired(args) -> None:
    import numpy as np

    from mlx_openelm import load, load_model
    from mlx_openelm.convert import convert

    from support import trained

    work = Path(args.folder)
    (work / "nll").mkdir(parents=True, exist_ok=True)
    source = trained.trained_model_path()
    model, tokenizer = load(source, dtype="float32")
    tokens = tokenizer.encode(trained.real_text("eval"))[: args.tokens or 16384]
    nlls = {"float": token_nlls(model, tokens)}
    for label, quant in grid_settings(args, work):
        path = work / "nll" / f"{label}-{len(tokens)}.npy"
        if not path.exists():
            out = work / "models" / label
            convert(source, out, evaluate=False, force=True, **quant)
            np.save(path, token_nlls(dequantized_copy(load_model(out, dtype="float32")), tokens))
            shutil.rmtree(out, ignore_errors=True)
        nlls[label] = np.load(path)
    print(f"{len(tokens) - 1} tokens; float perplexity {np.exp(nlls['float'].mean()):.4f}")
    print("| setting | perplexity | mean NLL - float's (nats/token) | - min/max's |\n|---|---|---|---|")
    for label, nll in nlls.items():
        if label == "float":
            continue
        vs_float = "%+.5f ± %.5f" % mean_and_error(nll - nlls["float"])
        baseline = nlls.get(label.rsplit("-", 1)[0] + "-minmax")
        vs_minmax = "%+.5f ± %.5f" % mean_and_error(nll - baseline) if baseline is not None and baseline is not nll else ""
        print(f"| {label} | {np.exp(nll.mean()):.4f} | {vs_float} | {vs_minmax} |")


def grid_settings(args, work: Path) -> list[tuple[str, dict]]:
    settings = []
    widths = [("recipe", r) for r in args.recipes.split(",") if r] or [("bits", int(b)) for b in args.bits.split(",")]
    for key, width in widths:
        for group in map(int, args.groups.split(",")):
            for method in args.methods.split(","):
                quant = {key: width, "group_size": group, "method": "optimal" if method == "calibrated" else method}
                if method == "calibrated":
                    quant["calibration_text"] = str(work / "calibration.txt")
                settings.append((f"{width}-g{group}-{method}", quant))
    return settings


def part_names(spec: str, num_layers: int) -> list[tuple[str, callable]]:
    """(part label, which tensor names it holds) for `parts`: "head" (the tied embedding), "layers:A-B"
    (decoder layers A..B), "kind:ffn.proj_2" (that linear in every layer), "all" (each of those: the
    head, every layer alone and every kind)."""
    if spec == "all":
        kinds = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")
        spec = ",".join(["head"] + [f"layers:{i}-{i}" for i in range(num_layers)] + [f"kind:{k}" for k in kinds])
    parts = []
    for part in spec.split(","):
        if part == "head":
            parts.append((part, lambda n: n.startswith("transformer.token_embeddings.")))
        elif part.startswith("layers:"):
            low, high = map(int, part[len("layers:"):].split("-"))
            parts.append((part, lambda n, r=range(low, high + 1): n.startswith("transformer.layers.")
                          and int(n.split(".")[2]) in r))
        else:
            parts.append((part, lambda n, k=part[len("kind:"):]: n.endswith(f".{k}.weight")))
    return parts


def part_scores(source: Path, settings, spec: str, tokens: list, reference, done: set):
    """Yield one result per (setting, part): that part quantized (in memory), all else float."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_openelm import load_model
    from mlx_openelm.convert.importance import data_free_importance
    from mlx_openelm.quantizers import quantize

    model = load_model(source, dtype="float32")
    original = dict(tree_flatten(model.parameters()))
    importance = data_free_importance(model.args, original.__getitem__)  # what the converter's optimal uses
    for label, quant in settings:
        for part, holds in part_names(spec, model.args.num_transformer_layers):
            name = f"{label} {part}"
            if name in done:
                continue
            changed = []
            for key, weight in original.items():
                if holds(key) and weight.ndim == 2:
                    bits, group = quant["bits"], quant["group_size"]
                    q = quantize(weight, bits, group, quant["method"], mx.float16,
                                 importance.get(key) if quant["method"] == "optimal" else None)
                    changed.append((key, mx.dequantize(*[a.astype(mx.float32) if a.dtype != mx.uint32 else a
                                                         for a in q], group_size=group, bits=bits)))
            model.load_weights(changed, strict=False)
            yield {"label": name, "part": part, **quant, **score(model, tokens, reference)}
            model.load_weights([(k, original[k]) for k, _ in changed], strict=False)


def run(args) -> None:
    from mlx_openelm import load

    from support import trained

    work = Path(args.folder)
    (work / "models").mkdir(parents=True, exist_ok=True)
    source = trained.trained_model_path()
    float_model, tokenizer = load(source, dtype="float32")
    eval_file = write_texts(work, tokenizer)
    tokens = tokenizer.encode(eval_file.read_text(encoding="utf-8"))[: args.tokens]
    results = work / "results.jsonl"
    done = {json.loads(line)["label"] for line in results.read_text().splitlines()} if results.exists() else set()
    reference = CachedModel(float_model)
    if args.command == "grid":
        jobs = ((label, lambda label=label, quant=quant: convert_and_score(work, source, label, quant, tokens,
                                                                           reference))
                for label, quant in grid_settings(args, work) if label not in done)
        stream = (job() for _, job in jobs)
    else:
        stream = part_scores(source, grid_settings(args, work), args.parts, tokens, reference, done)
    for result in stream:
        with open(results, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: result[k] for k in ("label", "kl", "ppl", "ref_ppl", "top1")}), flush=True)


def table(folder: str) -> None:
    rows = [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines()]
    grid = [r for r in rows if "part" not in r]
    print("| setting | bits/weight | KL | perplexity (float: %.3f) | top-1 | seconds |" % grid[0]["ref_ppl"])
    print("|---|---|---|---|---|---|")
    for r in sorted(grid, key=lambda r: (r["bits_per_weight"], r["label"])):
        print(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['kl']:.4g} | {r['ppl']:.3f} | "
              f"{100 * r['top1']:.1f}% | {r['convert_seconds']:.0f} |")
    parts = [r for r in rows if "part" in r]
    if parts:
        print("\n| setting, part quantized alone | KL | perplexity | top-1 |\n|---|---|---|---|")
        for r in parts:
            print(f"| {r['label']} | {r['kl']:.4g} | {r['ppl']:.3f} | {100 * r['top1']:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("grid", "parts", "table", "paired"))
    parser.add_argument("folder")
    parser.add_argument("--bits", default="2,3,4,5,6,8")
    parser.add_argument("--groups", default="32,64,128")
    parser.add_argument("--methods", default="minmax,optimal,calibrated")
    parser.add_argument("--recipes", default="", help="mixed-LOW-HIGH,... instead of --bits")
    parser.add_argument("--parts", default="all", help="parts: head,layers:0-3,kind:ffn.proj_2,... or all")
    parser.add_argument("--tokens", type=int, default=None,
                        help="score only the first N tokens of DIR/eval.txt (paired: of the held-out half; 16384)")
    args = parser.parse_args()
    {"table": lambda: table(args.folder), "paired": lambda: paired(args)}.get(args.command, lambda: run(args))()


if __name__ == "__main__":
    main()
