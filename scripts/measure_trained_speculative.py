"""Speculative decoding on real text with the trained test model: acceptance, target passes per token, tok/s,
against plain decoding and mlx-lm's plain (and draft-model) decoding in the same rounds.

    python scripts/measure_trained_speculative.py [--draft q4:64] [--draft layers:0-9,25-29] [--draft FOLDER]
        [--tokens 48] [--draft-tokens 2,3,4,5,6] [--lookup 2,3,4,6,8,10] [--prompts repeat,edit,code,summarize,story,continue]
        [--plain-every 1] [--mlx-lm] [--fixed] [--json PATH]

A draft (repeatable): `qBITS:GROUP`, the target quantized in memory (the self-draft; `q4:64` is what
`mlx-openelm convert -q` writes); `layers:SPEC`, the target's own layers SPEC (e.g. 0-9,25-29: a layer-skipping
self-draft sharing the target's arrays, no training); or a model folder. The target is the trained test model
in float32 (SmolLM2-135M-Instruct imported as OpenELM, tests/trained.py); the passages come from the held-out
text (`trained.real_text("eval")`). Prompts:

- input-grounded (the answer copies the input, where prompt lookup should shine): `repeat` (plain text:
  a passage, then 'The same text, quoted: "' and its first six words), `edit` (chat: rewrite a passage with one
  word replaced), `code` (chat: rename a function in a short Python file, `CODE`), `summarize` (chat: a passage in one
  sentence);
- free generation: `story` (chat: a short story), `continue` (plain text: the passage, continued).

`--mlx-lm` adds mlx-lm's plain greedy decoding (its generate_step on the same arrays, in this process, so on
the same BLAS) next to every plain run, and mlx-lm's speculative_generate_step for each quantized draft at each
k. `--fixed` drafts the full length every round (SpeculativeOptions(adaptive=False)), the rule before the adaptive one.

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
import os
import sys
import time
from pathlib import Path

import mlx_openelm  # noqa: F401  first: the optimized BLAS is loaded before MLX (mlx_openelm/blas.py)

import mlx.core as mx

from mlx_openelm import generate_step, load, load_model, make_cache
from mlx_openelm.blas import describe
from mlx_openelm.cache import truncate_caches
from mlx_openelm.speculative import SpeculativeOptions
from support import trained  # the test support code: the trained folder and real text


def _passage(words: int = 70) -> str:
    """About `words` words of the held-out text, cut at a sentence end."""
    text = " ".join(trained.real_text("eval").split()[200 : 200 + words])
    return text[: text.rfind(".") + 1]


CODE = '''def decode_run(model, prompt, caches, tokens):
    """One greedy decoding after the prefilled prompt; the caches are trimmed back afterwards."""
    start = time.perf_counter()
    steps = list(generate_step(prompt[-1:], model, max_tokens=tokens, cache=caches["target"]))
    seconds = time.perf_counter() - start
    for cache in caches.values():
        truncate_caches(cache, len(prompt) - 1)
    return {"tokens": [s.token for s in steps], "seconds": seconds, "tps": len(steps) / seconds}
'''  # a fixed Python function to edit (versions before this one quoted a fragment of this script by mistake)


EOS = 2  # <|im_end|>, the trained model's end of a reply (main() checks it against the tokenizer)
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
        "code": ("grounded", "Rename the function `decode_run` to `timed_decode` in this Python code and show "
                             f"the whole code.\n\n```python\n{CODE}```"),
        "summarize": ("grounded", f"Summarize this text in one sentence.\n\n{passage}"),
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


def _until_eos(items, token):
    """`items` up to and including the one whose `token(item)` ends the reply (EOS), as the product's
    commands stop there."""
    for item in items:
        yield item
        if token(item) == EOS:
            return


def decode_run(model, prompt: list[int], caches: dict, tokens: int, adaptive: bool = True, **speculative) -> dict:
    """One greedy decoding after the prefilled `prompt[:-1]`, to EOS or `tokens` tokens; the caches are trimmed
    back afterwards."""
    kwargs = {"speculative": SpeculativeOptions(**speculative, adaptive=adaptive)} if speculative else {}
    if "draft_model" in speculative:
        kwargs["draft_cache"] = caches[id(speculative["draft_model"])]
    start = time.perf_counter()
    steps = list(_until_eos(generate_step(prompt[-1:], model, max_tokens=tokens, cache=caches["target"],
                                          cached_ids=prompt[:-1], **kwargs), lambda step: step.token))
    seconds = time.perf_counter() - start
    for key in ("target", id(speculative.get("draft_model"))):
        if key in caches:
            truncate_caches(caches[key], len(prompt) - 1)
    last = steps[-1]
    return {"tokens": [s.token for s in steps], "seconds": seconds, "tps": len(steps) / seconds,
            "drafted": last.drafted_tokens, "accepted": last.accepted_tokens,
            "passes_per_token": (last.target_forward_passes or len(steps)) / len(steps)}


def mlx_lm_run(lm, caches: list, prompt: list[int], tokens: int, draft=None, k: int = 0) -> dict:
    """mlx-lm's greedy decoding (plain, or speculative with `draft` at k) from its prefilled caches."""
    from mlx_lm.generate import generate_step as lm_step, speculative_generate_step
    from mlx_lm.models.cache import trim_prompt_cache

    start = time.perf_counter()
    if draft is None:
        produced = ((int(t), False) for t, _ in lm_step(mx.array(prompt[-1:]), lm, max_tokens=tokens,
                                                        prompt_cache=caches[0]))
    else:
        produced = ((int(t), d) for t, _, d in speculative_generate_step(
            mx.array(prompt[-1:]), lm, draft, num_draft_tokens=k, max_tokens=tokens, prompt_cache=caches[0] + caches[1]))
    steps = list(_until_eos(produced, lambda step: step[0]))
    seconds = time.perf_counter() - start
    for cache in caches:
        trim_prompt_cache(cache, cache[0].offset - (len(prompt) - 1))
    accepted = sum(d for _, d in steps)
    return {"tokens": [t for t, _ in steps], "tps": len(steps) / seconds, "accepted": accepted,
            "drafted": None, "passes_per_token": None}


def build_draft(model, spec: str, folder):
    """A draft from `qBITS:GROUP`, `layers:SPEC` or a folder (see the module docstring), and its label."""
    from mlx_openelm.bench.core import quantize
    from mlx_openelm.config import ModelArgs
    from mlx_openelm.model import Model

    if spec.startswith("q"):
        bits, group = (int(x) for x in spec[1:].split(":"))
        draft = load_model(folder, dtype="float32")
        quantize(draft, bits, group)
        return draft, f"{bits}-bit g{group} self-draft"
    if spec.startswith("layers:"):
        keep = [i for part in spec[7:].split(",") for i in
                (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))]
        config = model.args.to_dict()
        config["num_transformer_layers"] = len(keep)
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            config[key] = [config[key][i] for i in keep]
        draft = Model(ModelArgs.from_dict(config))
        draft.transformer.layers = [model.transformer.layers[i] for i in keep]  # the target's own arrays
        draft.transformer.token_embeddings = model.transformer.token_embeddings
        draft.transformer.norm = model.transformer.norm
        return draft, f"layers {spec[7:]} ({len(keep)} of {len(model.transformer.layers)})"
    return load_model(spec, dtype="float32"), Path(spec).name


def settings(drafts: list, draft_tokens: list[int], lookups: list[int]) -> list[tuple[str, dict]]:
    return ([(f"{label} k={k}", {"draft_model": draft, "num_draft_tokens": k})
             for draft, label in drafts for k in draft_tokens]
            + [(f"lookup N={n}", {"prompt_lookup": n}) for n in lookups])


def prefilled(model, prompt: list[int]) -> list:
    cache = make_cache(model)
    mx.eval(model(mx.array([prompt[:-1]]), cache=cache))
    return cache


def mlx_lm_side(model, drafts: list, prompt: list[int]) -> dict:
    """mlx-lm's copies of the target and of the quantized drafts (the same arrays), their caches prefilled."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_openelm.bench.core import mlx_lm_model

    side = {"target": mlx_lm_model(model)}
    side["drafts"] = {id(d): mlx_lm_model(d) for d, label in drafts if label.endswith("self-draft")}
    for lm in [side["target"], *side["drafts"].values()]:
        cache = make_prompt_cache(lm)
        mx.eval(lm(mx.array([prompt[:-1]]), cache=cache))
        side[id(lm)] = cache
    return side


def measure(model, drafts: list, tokenizer, args) -> list[dict]:
    rows = []
    for name, (kind, prompt) in prompts(tokenizer, args.prompts).items():
        caches = {"target": prefilled(model, prompt), **{id(d): prefilled(d, prompt) for d, _ in drafts}}
        lm = mlx_lm_side(model, drafts, prompt) if args.mlx_lm else None
        reference = lm_plain = None
        for i, (label, speculative) in enumerate(settings(drafts, args.draft_tokens, args.lookup)):
            if i % args.plain_every == 0:
                plain = decode_run(model, prompt, caches, args.tokens)
                reference = reference or plain["tokens"]
                assert plain["tokens"] == reference, f"{name}: plain greedy decoding changed between runs"
                if lm:
                    lm_plain = mlx_lm_run(lm["target"], [lm[id(lm["target"])]], prompt, args.tokens)
                    assert lm_plain["tokens"] == reference, f"{name}: mlx-lm's greedy tokens differ from ours"
            run = decode_run(model, prompt, caches, args.tokens, adaptive=not args.fixed, **speculative)
            assert run["tokens"] == reference, f"{name}, {label}: speculative output differs from plain greedy"
            rows.append(row(name, kind, prompt, label, run, plain, lm_plain))
            draft = speculative.get("draft_model")
            if lm and id(draft) in lm["drafts"]:
                lm_draft = lm["drafts"][id(draft)]
                theirs = mlx_lm_run(lm["target"], [lm[id(lm["target"])], lm[id(lm_draft)]], prompt, args.tokens,
                                    lm_draft, speculative["num_draft_tokens"])
                assert theirs["tokens"] == reference, f"{name}: mlx-lm's speculative tokens differ"
                rows.append(row(name, kind, prompt, f"mlx-lm {label}", theirs, plain, lm_plain))
        if lm_plain:
            rows.append(row(name, kind, prompt, "mlx-lm plain", lm_plain, plain, lm_plain))
        print(f"{name}: {tokenizer.decode(reference)!r}", file=sys.stderr, flush=True)
    return rows


def row(name, kind, prompt, label, run, plain, lm_plain) -> dict:
    out = {"prompt": name, "kind": kind, "prompt_tokens": len(prompt), "setting": label,
           "acceptance": run["accepted"] / run["drafted"] if run["drafted"] else None,
           "passes_per_token": run["passes_per_token"], "tps": run["tps"], "plain_tps": plain["tps"],
           "ratio": run["tps"] / plain["tps"], "mlx_lm_plain_tps": lm_plain and lm_plain["tps"],
           "ratio_to_mlx_lm_plain": lm_plain and run["tps"] / lm_plain["tps"]}
    lm_text = f", x{out['ratio_to_mlx_lm_plain']:.2f} mlx-lm plain {lm_plain['tps']:.2f}" if lm_plain else ""
    acceptance = f"{out['acceptance']:6.1%}" if out["acceptance"] is not None else "     -"
    print(f"{name:<9} {label:<34} accepted {acceptance}  {out['tps']:.2f} vs plain {out['plain_tps']:.2f} tok/s "
          f"(x{out['ratio']:.2f}{lm_text})", file=sys.stderr, flush=True)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", action="append", default=None,
                        help="qBITS:GROUP, layers:SPEC or a folder (repeatable; default q4:64)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per run")
    parser.add_argument("--draft-tokens", type=_ints, default=[2, 3, 4, 5, 6])
    parser.add_argument("--lookup", type=_ints, default=[2, 3, 4, 6, 8, 10])
    parser.add_argument("--prompts", type=lambda s: s.split(","), default=["repeat", "edit", "code", "summarize", "story", "continue"])
    parser.add_argument("--plain-every", type=int, default=1, help="a plain run before every Nth setting")
    parser.add_argument("--mlx-lm", action="store_true", help="mlx-lm's plain (and draft) decoding beside ours")
    parser.add_argument("--fixed", action="store_true", help="draft the full length every round (not adaptive)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = trained.trained_model_path()
    model, tokenizer = load(folder, dtype="float32")
    assert tokenizer.eos_id == EOS, f"the trained model's EOS is {tokenizer.eos_id}"
    drafts = [build_draft(model, spec, folder) for spec in args.draft or ["q4:64"]]
    load_before = os.getloadavg()[0]
    rows = measure(model, drafts, tokenizer, args)
    print(f"BLAS: {describe()}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; {args.tokens} tokens "
          f"per run; {'fixed' if args.fixed else 'adaptive'} draft length")
    print("| prompt | kind | setting | accepted | target passes/token | tok/s | plain tok/s | x plain | x mlx-lm plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        accepted = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        passes = f"{r['passes_per_token']:.2f}" if r["passes_per_token"] is not None else "-"
        lm = f"{r['ratio_to_mlx_lm_plain']:.2f}" if r["ratio_to_mlx_lm_plain"] else "-"
        print(f"| {r['prompt']} | {r['kind']} | {r['setting']} | {accepted} | {passes} | {r['tps']:.2f} | "
              f"{r['plain_tps']:.2f} | {r['ratio']:.2f} | {lm} |")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "blas": describe(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
