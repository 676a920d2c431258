"""mlx-lm's habits in our generation API: its keyword names, and `generate(verbose=True)`.

People arrive with mlx-lm code (``mlx_lm/generate.py``). `stream_generate` accepts its
keyword names where they mean the same thing here, and refuses the rest with a message
listing what is accepted, instead of a TypeError from deep inside or a silent no-op.
`print_generation` is the documented exception to "library code does not print": mlx-lm's
`generate(..., verbose=True)` prints the text and statistics to stdout, and so does ours.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Mapping

# mlx-lm's name -> ours, for arguments that mean the same thing.
MLX_LM_ALIASES = {
    "prompt_cache": "cache",
    "prompt_progress_callback": "prompt_progress",
}

# mlx-lm options with no counterpart here, and what they do there.
MLX_LM_UNSUPPORTED = {
    "max_kv_size": "a rotating KV cache of bounded size",
    "kv_bits": "KV-cache quantization",
    "kv_group_size": "KV-cache quantization",
    "quantized_kv_start": "KV-cache quantization",
    "input_embeddings": "input embeddings instead of token ids",
    "stream": "choosing the MLX stream",
}

# Older mlx-lm took sampling settings as keywords; here they build a sampler/processors.
SAMPLING_SETTINGS = ("temp", "temperature", "top_p", "top_k", "min_p", "min_tokens_to_keep",
                     "repetition_penalty", "repetition_context_size", "logit_bias")


def keyword_names(*functions: Callable) -> list[str]:
    """The optional arguments `functions` take by name (those with defaults; not **kwargs)."""
    names = set()
    for fn in functions:
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty:
                names.add(p.name)
    return sorted(names)


def translate_kwargs(kwargs: Mapping, accepted: Iterable[str], caller: str = "stream_generate") -> dict:
    """`kwargs` with mlx-lm's names replaced by ours; unknown or unsupported names raise TypeError."""
    accepted = list(accepted)
    listing = (f"accepted: {', '.join(accepted)} (mlx-lm's "
               f"{', '.join(f'{a}={b}' for a, b in MLX_LM_ALIASES.items())} also work)")
    out = {}
    for name, value in kwargs.items():
        ours = MLX_LM_ALIASES.get(name, name)
        if ours in accepted:
            if ours in out or (ours != name and ours in kwargs):
                raise TypeError(f"{caller}() got both {ours!r} and mlx-lm's {name!r}; pass one")
            out[ours] = value
        elif name in MLX_LM_UNSUPPORTED:
            raise TypeError(f"{caller}(): {name!r} ({MLX_LM_UNSUPPORTED[name]} in mlx-lm) is not supported; "
                            f"{listing}")
        elif name in SAMPLING_SETTINGS:
            raise TypeError(f"{caller}(): {name!r} is not a keyword here: pass sampler=make_sampler(temp=..., "
                            "top_p=..., ...) and logits_processors=make_logits_processors(repetition_penalty=...); "
                            f"{listing}")
        else:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}; {listing}")
    return out


def print_generation(responses: Iterable) -> str:
    """Print each response's text as it comes, then the statistics, as mlx-lm's verbose
    `generate` does; returns the whole text."""
    print("=" * 10)
    pieces, last = [], None
    for response in responses:
        print(response.text, end="", flush=True)
        pieces.append(response.text)
        last = response
    print()
    print("=" * 10)
    text = "".join(pieces)
    if not text:
        print("No text generated for this prompt")
    if last is not None:
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {last.peak_memory_gb:.3f} GB")
        if last.context_full:
            print("Stopped: the model's context is full")
    return text
