"""Perplexity parity on real weights: our OpenELM model against mlx-lm's `llama` on the same float32 weights.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/measure_trained_parity.py [--tokens 20461] [--context 1024] [--stride 1023]
        [--gguf-windows 4] [--jobs 1] [--json]

The model is the trained test model (SmolLM2-135M-Instruct imported into OpenELM form, tests/trained.py);
the text is the held-out half of Python's `pydoc_data` Language Reference topics (`trained.real_text("eval")`),
tokenized with BOS first, its first `--tokens` tokens. Three models score the same sliding windows
(`mlx_openelm.evaluate.sliding_windows`, `window_log_probs`):

- ours: the imported folder loaded by `mlx_openelm.load_model` (rotate-half RoPE, fused qkv/gate-up);
- mlx-lm's `llama` holding the same arrays (split back into q/k/v and gate/up), rotate-half RoPE;
- mlx-lm's `llama` on the GGUF's own q/k row order with interleaved ("traditional") RoPE, on the first
  `--gguf-windows` windows: checks the importer's un-permutation on real text.

Prints each perplexity beside ours on the same windows, the relative difference and the largest
per-token log-probability difference (`--jobs N` deals the windows to N processes), and exits 1 if a relative difference exceeds 1e-4. MLX's Linux CPU wheel ships the reference
BLAS (about 40x slower on these matmuls): preload OpenBLAS as above for this measurement (results agree to
float32 round-off; never for speed numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_openelm import load_model
from mlx_openelm.evaluate import sliding_windows, window_log_probs
from mlx_openelm.tokenizer import Tokenizer
from support import trained  # the test support code: importer, real text, mlx-lm's llama

TOLERANCE = 1e-4


OURS, LLAMA, GGUF = "mlx-openelm", "mlx-lm llama", "mlx-lm llama, GGUF rows, traditional RoPE"


def build_models(with_gguf: bool) -> dict:
    model = load_model(trained.trained_model_path(), dtype="float32")
    llama = trained.mlx_lm_llama(dict(tree_flatten(model.parameters())), model.args.to_dict())
    models = {OURS: model, LLAMA: llama}
    if with_gguf:
        gguf_config, gguf_weights = trained.gguf_layout_weights()
        models[GGUF] = trained.mlx_lm_llama(gguf_weights, gguf_config, traditional_rope=True)
    return models


def score_windows(job: tuple) -> list[dict]:
    """Per window: each model's summed NLL of the window's targets and its largest |log p - ours|."""
    tokens, windows, gguf_windows = job
    models = build_models(with_gguf=any(i < gguf_windows for i, _ in windows))
    out = []
    for i, window in windows:
        targets = mx.array(tokens[window.first : window.end])[:, None]
        picked = {name: mx.take_along_axis(window_log_probs(m, tokens, window), targets, axis=-1)[:, 0]
                  for name, m in models.items() if name != GGUF or i < gguf_windows}
        out.append({"window": i, "targets": window.end - window.first,
                    "nll": {name: -lp.sum().item() for name, lp in picked.items()},
                    "worst": {name: mx.abs(lp - picked[OURS]).max().item() for name, lp in picked.items()}})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)  # partial results survive an interrupted run
    return out


def score(tokens: list[int], context: int, stride: int, gguf_windows: int, jobs: int) -> list[dict]:
    """Every window's scores, the windows dealt round-robin to `jobs` processes (each loads the models)."""
    windows = list(enumerate(sliding_windows(len(tokens), context, stride)))
    parts = [(tokens, windows[j::jobs], gguf_windows) for j in range(jobs)]
    if jobs == 1:
        return score_windows(parts[0])
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return sorted((w for part in pool.map(score_windows, parts) for w in part), key=lambda w: w["window"])


def summarise(per_window: list[dict]) -> list[dict]:
    """Per model: perplexity over the windows it scored, and ours over the same windows."""
    rows = []
    for name in (OURS, LLAMA, GGUF):
        scored = [w for w in per_window if name in w["nll"]]
        if not scored:
            continue
        targets = sum(w["targets"] for w in scored)
        ppl = math.exp(sum(w["nll"][name] for w in scored) / targets)
        ours = math.exp(sum(w["nll"][OURS] for w in scored) / targets)
        rows.append({"model": name, "tokens_scored": targets, "windows": len(scored), "perplexity": ppl,
                     "ours_on_the_same_windows": ours, "relative_difference": abs(ppl / ours - 1),
                     "worst_logprob_difference": max(w["worst"][name] for w in scored)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20461, help="tokens of the text (all but the first scored)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=None, help="default: context - 1 (no overlap)")
    parser.add_argument("--gguf-windows", type=int, default=4, help="windows the GGUF-layout variant scores")
    parser.add_argument("--jobs", type=int, default=1, help="processes scoring windows in parallel")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tokenizer = Tokenizer(trained.trained_model_path() / "tokenizer.json", bos_id=1, eos_id=2)
    tokens = tokenizer.encode(trained.real_text("eval"))[: args.tokens]
    stride = args.stride or args.context - 1
    rows = summarise(score(tokens, args.context, stride, args.gguf_windows, args.jobs))
    summary = {"text": "trained.real_text('eval'): pydoc_data.topics, odd-indexed topics in sorted order",
               "tokens": len(tokens), "context": args.context, "stride": stride, "rows": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"context {args.context}, stride {stride}")
        print(f"{'model':<44} {'tokens':>6} {'perplexity':>11} {'ours':>11} {'rel. diff':>9} {'max |dlogp|':>11}")
        for r in rows:
            print(f"{r['model']:<44} {r['tokens_scored']:>6} {r['perplexity']:>11.6f} "
                  f"{r['ours_on_the_same_windows']:>11.6f} {r['relative_difference']:>9.2e} "
                  f"{r['worst_logprob_difference']:>11.2e}")
    failed = [r["model"] for r in rows if r["relative_difference"] > TOLERANCE]
    if failed:
        print(f"FAILED: relative difference above {TOLERANCE}: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
