"""Speculative decoding on real text with the trained test model: acceptance, target passes per token, tok/s.

    python scripts/measure_trained_speculative.py --draft DRAFT_FOLDER [--tokens 48]
        [--draft-tokens 2,3,4,5,6] [--lookup 2,3,4,6,8,10] [--prompts repeat,edit,story,continue] [--plain-every 1] [--json PATH]

DRAFT_FOLDER: a 4-bit copy of the model written by `mlx-openelm convert -q` (the self-draft). The target
is the trained test model in float32 (SmolLM2-135M-Instruct imported as OpenELM, tests/trained.py); the
passages come from the held-out text (`trained.real_text("eval")`). Prompts:

- input-grounded (the answer copies the input, where prompt lookup should shine): `repeat` (plain text:
  a passage, then 'The same text, quoted: "' and its first six words), `edit` (chat: rewrite a passage with one
  word replaced);
- free generation: `story` (chat: a short story), `continue` (plain text: the passage, continued).

Chat prompts use the model's own format (ChatML with SmolLM2's default system message, `chatml`), not
the product's OpenELM-Instruct template, which this model was not tuned with.

Greedy decoding without repetition penalty. Each prompt is read once (its KV caches, target's and
draft's, are trimmed back to it after every run), so the times are decoding only. A plain run comes
before every `--plain-every`-th setting (1: A B A B ...), and the ratio is speculative tok/s over the
latest plain run's. Every speculative output is asserted to equal plain greedy decoding, token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_openelm import generate_step, load, load_model, make_cache
from mlx_openelm.cache import truncate_caches
from support import trained  # the test support code: the trained folder and real text


def _passage(words: int = 70) -> str:
    """About `words` words of the held-out text, cut at a sentence end."""
    text = " ".join(trained.real_text("eval").split()[200 : 200 + words])
    return text[: text.rfind(".") + 1]


SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default


def chatml(tokenizer, message: str) -> list[int]:
    """SmolLM2's own chat format (ChatML, the template in its GGUF), not the product's OpenELM one:
    <|im_start|> is BOS (1) and <|im_end|> EOS (2), as ids; the text between them encoded."""
    ids = []
    for role, text in (("system", SYSTEM), ("user", message)):
        ids += [tokenizer.bos_id] + tokenizer.encode_text(f"{role}\n{text}") + [tokenizer.eos_id] + tokenizer.encode_text("\n")
    return ids + [tokenizer.bos_id] + tokenizer.encode_text("assistant\n")


def prompts(tokenizer, names: list[str]) -> dict[str, tuple[str, list[int]]]:
    """name -> (kind, token ids)."""
    passage = _passage()
    chat = {  # user messages in the chat format
        "edit": ("grounded", f"Rewrite the following text, replacing the word \"target\" with \"name\".\n\n{passage}"),
        "story": ("free", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    }
    plain = {  # plain text
        "repeat": ("grounded", f"Text: {passage}\n\nThe same text, quoted: \"{' '.join(passage.split()[:6])}"),
        "continue": ("free", passage),
    }
    out = {}
    for name in names:
        if name in chat:
            kind, message = chat[name]
            out[name] = (kind, chatml(tokenizer, message))
        else:
            kind, text = plain[name]
            out[name] = (kind, tokenizer.encode(text))
    return out


def decode_run(model, prompt: list[int], caches: dict, tokens: int, **speculative) -> dict:
    """One greedy decoding after the prefilled `prompt[:-1]`; the caches are trimmed back afterwards."""
    kwargs = dict(speculative)
    if "draft_model" in kwargs:
        kwargs["draft_cache"] = caches["draft"]
    start = time.perf_counter()
    steps = list(generate_step(prompt[-1:], model, max_tokens=tokens, cache=caches["target"],
                               cached_ids=prompt[:-1], **kwargs))
    seconds = time.perf_counter() - start
    for cache in caches.values():
        truncate_caches(cache, len(prompt) - 1)
    last = steps[-1]
    return {"tokens": [s.token for s in steps], "seconds": seconds, "tps": len(steps) / seconds,
            "drafted": last.drafted_tokens, "accepted": last.accepted_tokens,
            "passes_per_token": (last.target_forward_passes or len(steps)) / len(steps)}


def settings(draft, draft_tokens: list[int], lookups: list[int]) -> list[tuple[str, dict]]:
    return ([(f"draft k={k}", {"draft_model": draft, "num_draft_tokens": k}) for k in draft_tokens]
            + [(f"lookup N={n}", {"prompt_lookup": n}) for n in lookups])


def measure(model, draft, tokenizer, args) -> list[dict]:
    rows = []
    for name, (kind, prompt) in prompts(tokenizer, args.prompts).items():
        caches = {"target": make_cache(model), "draft": make_cache(draft)}
        mx.eval(model(mx.array([prompt[:-1]]), cache=caches["target"]))
        mx.eval(draft(mx.array([prompt[:-1]]), cache=caches["draft"]))
        reference = None
        for i, (label, speculative) in enumerate(settings(draft, args.draft_tokens, args.lookup)):
            if i % args.plain_every == 0:
                plain = decode_run(model, prompt, caches, args.tokens)
                reference = reference or plain["tokens"]
                assert plain["tokens"] == reference, f"{name}: plain greedy decoding changed between runs"
            run = decode_run(model, prompt, caches, args.tokens, **speculative)
            assert run["tokens"] == reference, f"{name}, {label}: speculative output differs from plain greedy"
            row = {"prompt": name, "kind": kind, "prompt_tokens": len(prompt), "setting": label,
                   "acceptance": run["accepted"] / run["drafted"] if run["drafted"] else 0.0,
                   "passes_per_token": run["passes_per_token"], "tps": run["tps"], "plain_tps": plain["tps"],
                   "ratio": run["tps"] / plain["tps"]}
            rows.append(row)
            print(f"{name:<9} {label:<12} accepted {row['acceptance']:6.1%}  passes/token "
                  f"{row['passes_per_token']:.2f}  {row['tps']:.2f} vs plain {row['plain_tps']:.2f} tok/s "
                  f"(x{row['ratio']:.2f})", file=sys.stderr, flush=True)
        print(f"{name}: {tokenizer.decode(reference)!r}", file=sys.stderr, flush=True)
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, help="4-bit copy of the model (mlx-openelm convert -q)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per run")
    parser.add_argument("--draft-tokens", type=_ints, default=[2, 3, 4, 5, 6])
    parser.add_argument("--lookup", type=_ints, default=[2, 3, 4, 6, 8, 10])
    parser.add_argument("--prompts", type=lambda s: s.split(","), default=["repeat", "edit", "story", "continue"])
    parser.add_argument("--plain-every", type=int, default=1, help="a plain run before every Nth setting")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer = load(trained.trained_model_path(), dtype="float32")
    draft = load_model(args.draft, dtype="float32")
    rows = measure(model, draft, tokenizer, args)
    print(f"{'prompt':<9} {'kind':<8} {'setting':<12} {'accepted':>8} {'passes/token':>12} {'tok/s':>6} "
          f"{'plain':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['prompt']:<9} {r['kind']:<8} {r['setting']:<12} {r['acceptance']:>8.1%} "
              f"{r['passes_per_token']:>12.2f} {r['tps']:>6.2f} {r['plain_tps']:>6.2f} {r['ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
