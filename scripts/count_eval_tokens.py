"""Tokens each scorer pushes through the model per item, padding included, counted without running the model.

On a compute-bound CPU a forward's time follows the tokens it reads, whatever the batch shape, so this
count (not items/s on a shared machine) is what decides which scorer can be faster. The tasks are
`measure_eval_speed.py`'s. mlx-lm's count follows `mlx_lm.evaluate.MLXLM.loglikelihood`: each context
once, then each continuation but its first token from a copy of the context's cache; its head runs on
every position it reads.

    python scripts/count_eval_tokens.py [--model FOLDER] [--items 40]
"""

from __future__ import annotations

import argparse

from measure_eval_speed import make_tasks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the trained test model)")
    parser.add_argument("--items", type=int, default=40)
    args = parser.parse_args()
    import mlx.core as mx

    from mlx_openelm import load
    from mlx_openelm.evaluation import scoring

    folder = args.model
    if folder is None:
        from support import trained

        folder = trained.trained_model_path()
    model, tokenizer = load(folder, dtype="float32")
    forwards, head_rows = [], []

    def count_forward(m, tokens, cache=None, mask=None):  # the shapes only: caches grow, nothing is computed
        rows, length = tokens.shape
        forwards.append((rows * length, int((tokens != 0).sum().item())))
        for layer in cache or []:
            empty = mx.zeros((rows, layer.num_kv_heads, length, layer.head_dim))
            layer.update_and_fetch(empty, empty)
        return mx.zeros((rows, length, 1))

    def count_head(m, hidden, spans):
        head_rows.append(sum(len(targets) for _, _, targets in spans))
        return [(0.0, True)] * len(spans)

    scoring._hidden, scoring._gather_scores = count_forward, count_head
    n = args.items
    print(f"{'task':<30} {'scorer':<30} {'tokens/item':>11} {'real':>6} {'head rows/item':>14} {'forwards':>8}")
    for task, items in make_tasks(n).items():
        pairs = [scoring.encode_pair(tokenizer, c, k) for item in items for c, k in item]
        contexts = {}
        for context, continuation in pairs:
            contexts.setdefault(tuple(context), []).append(len(continuation))
        theirs = sum(len(c) + sum(k - 1 for k in ks) for c, ks in contexts.items())
        calls = sum(1 + sum(k > 1 for k in ks) for ks in contexts.values())
        print(f"{task:<30} {'mlx_lm.evaluate':<30} {theirs / n:>11.1f} {theirs / n:>6.1f} {theirs / n:>14.1f} "
              f"{calls:>8}")
        for share in (True, False):
            forwards.clear()
            head_rows.clear()
            scoring.score_tokens(model, pairs, share_prefixes=share)
            name = "mlx-openelm" + ("" if share else " (no prefix sharing)")
            print(f"{task:<30} {name:<30} {sum(f[0] for f in forwards) / n:>11.1f} "
                  f"{sum(f[1] for f in forwards) / n:>6.1f} {sum(head_rows) / n:>14.1f} {len(forwards):>8}")


if __name__ == "__main__":
    main()
