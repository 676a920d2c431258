"""The trained test model before and after its folder's conventions (docs/chat-templates.md).

1. A plain prompt, greedy: the old rule (BOS always first, Apple's 1.2 repetition penalty on every
   folder) against the folder's (SmolLM2 adds no BOS, penalty 1.0), each compared with mlx-lm's greedy
   continuation of the same text (`mlx_lm.load` on the folder, `mlx_lm.generate`).
2. A chat question: OpenELM-Instruct's format (what every folder got before) against the folder's own
   ChatML template: prompt tokens and the greedy reply.
3. What rendering costs: the SmolLM2 template through `ChatTemplate.render` (messages rebuilt as plain
   data, the clock and size checks) against the same sandbox without them, per render.

Usage: python scripts/measure_chat_template.py [--tokens 48]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PROMPT = 'def mean(values):\n    """'
QUESTION = "What is the capital of France?"


def plain_prompt(model, tok, tokens: int, folder: Path) -> None:
    import mlx_lm

    from mlx_openelm.cache import common_prefix_length
    from mlx_openelm.generation import generate_step
    from mlx_openelm.sampling import make_logits_processors

    their_model, their_tok = mlx_lm.load(str(folder))
    ref_ids = [r.token for r in mlx_lm.stream_generate(their_model, their_tok, PROMPT, max_tokens=tokens)]
    print(f"mlx-lm's greedy continuation ({len(ref_ids)} tokens): {tok.decode(ref_ids)!r}")
    for label, add_bos, penalty in (("before: BOS, penalty 1.2", True, 1.2), ("BOS, penalty 1.0", True, 1.0),
                                    ("after: the folder's rule (no BOS), penalty 1.0", None, 1.0)):
        prompt = tok.encode(PROMPT, add_bos=add_bos)
        ids = [s.token for s in generate_step(prompt, model, max_tokens=tokens,
                                              logits_processors=make_logits_processors(penalty))]
        print(f"{label}: prompt {len(prompt)} tokens; first {common_prefix_length(ids, ref_ids)} of {len(ids)} tokens equal "
              f"mlx-lm's; text {tok.decode(ids)!r}")


def chat(model, tok, tokens: int) -> None:
    from mlx_openelm.generation import generate_step

    messages = [{"role": "user", "content": QUESTION}]
    template, tok.chat_template = tok.chat_template, None
    formats = (("OpenELM-Instruct's format", tok.apply_chat_template(messages)),)
    tok.chat_template = template
    formats += (("the folder's ChatML template", tok.apply_chat_template(messages)),)
    for label, prompt in formats:
        ids = []
        for step in generate_step(prompt, model, max_tokens=tokens):
            if step.token in tok.eos_ids:
                break
            ids.append(step.token)
        print(f"{label}: prompt {len(prompt)} tokens; reply {len(ids)} tokens {tok.decode(ids)!r}")


def render_cost(tok, repeats: int = 2000) -> None:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "system", "content": "Be brief."}] + [
        {"role": r, "content": f"message {i}"} for i in range(8) for r in ("user", "assistant")]
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
                                             ).from_string(tok.chat_template.source)
    variables = {"messages": messages, "add_generation_prompt": True, **tok.special_tokens}
    for label, render in (("ChatTemplate.render (bounded)", lambda: tok.render_chat(messages)),
                          ("plain sandboxed Jinja render (no bounds)", lambda: template.render(**variables))):
        start = time.perf_counter()
        for _ in range(repeats):
            render()
        print(f"{label}: {(time.perf_counter() - start) / repeats * 1e6:.0f} us per render of 17 messages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    from support import trained

    from mlx_openelm import load

    folder = trained.trained_model_path()
    model, tok = load(folder, dtype="float32")
    plain_prompt(model, tok, args.tokens, folder)
    chat(model, tok, args.tokens)
    render_cost(tok)


if __name__ == "__main__":
    main()
