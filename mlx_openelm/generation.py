"""Text generation in three layers: `generate_step` -> `stream_generate` -> `generate`."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from .cache import KVCache
from .errors import ContextLengthError
from .model import Model, make_cache
from .sampling import LogitsProcessor, Sampler, greedy
from .tokenizer import Tokenizer


def prefill(
    model: Model,
    prompt: mx.array,
    cache: Sequence[KVCache],
    step_size: int,
    progress: Optional[Callable[[int, int], None]] = None,
) -> mx.array:
    """Run all but the last prompt token through the model in chunks; return the rest.

    Chunking bounds the attention scores' memory for long prompts.
    """
    done, total = 0, prompt.size
    while total - done > 1:
        n = min(step_size, total - done - 1)
        model(prompt[None, done : done + n], cache=cache)  # only the cache is evaluated: no output head
        mx.eval([c.state for c in cache])
        done += n
        if progress:
            progress(done, total)
        mx.clear_cache()
    return prompt[done:]


@contextmanager
def wired_limit():
    """On Apple GPUs, raise MLX's wired-memory limit to the recommended working set
    while generating, so the weights are not paged out between tokens; restored after.
    A no-op where the device reports no recommended size (the CPU backend)."""
    size = mx.device_info().get("max_recommended_working_set_size")
    if size is None:
        yield
        return
    previous = mx.set_wired_limit(size)
    try:
        yield
    finally:
        mx.synchronize()  # the limit must not change under a running async eval
        mx.set_wired_limit(previous)


def token_budget(model: Model, cache: Optional[Sequence[KVCache]], prompt_size: int, max_tokens: int) -> int:
    """How many tokens can follow a prompt: `max_tokens`, capped by the context left.

    Raises `ContextLengthError` when the prompt itself does not fit.
    """
    context = model.args.max_context_length
    start = cache[0].offset if cache else 0
    if start + prompt_size > context:
        raise ContextLengthError(
            f"prompt of {prompt_size} tokens (+{start} cached) does not fit the model's context of "
            f"{context} tokens"
        )
    # The k-th new token needs the prompt and k-1 new tokens in the context.
    return max(0, min(max_tokens, context - start - prompt_size + 1))


def generate_step(
    prompt: Union[mx.array, Sequence[int]],
    model: Model,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    cache: Optional[Sequence[KVCache]] = None,
    prefill_step_size: int = 512,
    prompt_progress: Optional[Callable[[int, int], None]] = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token, logprobs)` for up to `max_tokens` new tokens after `prompt`.

    `prompt` is token ids (BOS included if wanted). Generation also ends when the
    model's context (`max_context_length`) is full. `cache` (from `make_cache`)
    continues an earlier conversation. While a token is handed out, the next one
    is already being computed (`mx.async_eval`), so the cache then holds the prompt
    and every token yielded so far; only a token that ends the budget (the last of
    `max_tokens`, or one that fills the context) is never fed to the model.
    """
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(f"prompt must be a non-empty 1-D list of token ids, got shape {prompt.shape}")
    vocab_size = model.args.vocab_size
    if mx.issubdtype(prompt.dtype, mx.floating) or not (0 <= prompt.min().item() and prompt.max().item() < vocab_size):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), the model's vocabulary")
    prompt = prompt.astype(mx.uint32)
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    cache = make_cache(model) if cache is None else cache
    limit = token_budget(model, cache, prompt.size, max_tokens)
    if limit == 0:
        return
    sampler = sampler or greedy
    processors = list(logits_processors or [])

    def next_token(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(tokens[None], cache=cache)[:, -1, :].astype(mx.float32)  # (1, vocab)
        if processors:
            history = mx.concatenate([history, tokens])
            for process in processors:
                logits = process(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    with wired_limit():
        prompt_tail = prefill(model, prompt, cache, prefill_step_size, prompt_progress)
        history = prompt[: prompt.size - prompt_tail.size]
        token, logprobs = next_token(prompt_tail)
        mx.async_eval(token, logprobs)
        for n in range(limit):
            if n + 1 < limit:
                following = next_token(token)
                mx.async_eval(*following)
            yield int(token.item()), logprobs
            if n + 1 < limit:
                token, logprobs = following


@dataclass
class GenerationResponse:
    """One streamed step: the text this token completed and running statistics."""

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length", on the last response


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream a completion of `prompt` (text, which gets BOS, or token ids).

    Keyword arguments go to `generate_step` (sampler, logits_processors, cache, ...).
    EOS ends generation with finish reason "stop"; running out of `max_tokens` or
    of the model's context ends it with "length".
    """
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    prompt_size = len(prompt_ids)
    limit = token_budget(model, kwargs.get("cache"), prompt_size, max_tokens)
    detokenizer = tokenizer.detokenizer()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    first_token_time = prompt_tps = 0.0
    steps = generate_step(prompt_ids, model, max_tokens=max_tokens, **kwargs)
    for n, (token, logprobs) in enumerate(steps, start=1):
        now = time.perf_counter()
        if n == 1:
            first_token_time = now
            prompt_tps = prompt_size / (now - tic)
        generation_tps = (n - 1) / (now - first_token_time) if n > 1 else 0.0
        if token == tokenizer.eos_id:
            finish = "stop"
            text = detokenizer.finalize()
        else:
            text = detokenizer.add_token(token)
            finish = "length" if n == limit else None
            if finish:
                text += detokenizer.finalize()
        response = GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            prompt_tokens=prompt_size,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=generation_tps,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        yield response
        if finish:
            return


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    **kwargs,
) -> str:
    """The completion of `prompt` as one string (see `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))
