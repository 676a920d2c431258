"""Text generation in three layers: `generate_step` -> `stream_generate` -> `generate`."""

from __future__ import annotations

import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import mlx.core as mx

from .cache import KVCache
from .compat import keyword_names, print_generation, translate_kwargs
from .drafting import LOOKUP_NGRAM
from .errors import ContextLengthError, OptionError, PromptError
from .model import Model, make_cache
from .sampling import LogitsProcessor, Sampler, greedy, to_logprobs
from .speculative import DraftProposer, SpeculativeDecoder, SpeculativeOptions
from .stopping import StopMatcher
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
    if progress:
        progress(0, total)
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


def token_budget(context: int, prompt_size: int, max_tokens: int, cached: int = 0) -> int:
    """How many tokens can follow a prompt of `prompt_size` tokens after `cached` ones, in a
    context of `context` tokens: `max_tokens`, capped by the room left. The one rule for it.

    The k-th new token needs the prompt and the k-1 new tokens before it in the context (the
    last new token is never fed), so a prompt that fills the context still gets one token.
    Raises `ContextLengthError` when the prompt itself does not fit.
    """
    if cached + prompt_size > context:
        raise ContextLengthError(
            f"prompt of {prompt_size} tokens (+{cached} cached) does not fit the model's context of "
            f"{context} tokens"
        )
    return max(0, min(max_tokens, context - cached - prompt_size + 1))


class GenerationStep(NamedTuple):
    """One token from `generate_step`, with running totals for speculative decoding."""

    token: int
    logprobs: mx.array  # the target's log-probabilities for this position (after logits processors)
    from_draft: bool = False  # proposed (draft model or prompt lookup) and accepted by the target
    last: bool = False  # the token budget (`max_tokens`, or the context) ends with this token
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    target_forward_passes: int = 0  # target passes that produced the tokens so far (prefill not counted)


def check_prompt(prompt: Union[mx.array, Sequence[int]], model: Model) -> mx.array:
    """`prompt` as a 1-D uint32 array of token ids in `model`'s vocabulary, or a `PromptError` saying why not."""
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.ndim != 1 or prompt.size == 0:
        raise PromptError(f"prompt must be a non-empty 1-D list of token ids, got shape {prompt.shape}")
    vocab_size = model.args.vocab_size
    if mx.issubdtype(prompt.dtype, mx.floating) or not (0 <= prompt.min().item() and prompt.max().item() < vocab_size):
        raise PromptError(f"prompt token ids must be integers in [0, {vocab_size}), the model's vocabulary")
    return prompt.astype(mx.uint32)


def _check_cached_ids(cached_ids, cache) -> list[int]:
    if cached_ids is None:  # unknown: the logits processors and prompt lookup see only `prompt` on
        return []
    ids = [int(t) for t in mx.array(cached_ids).tolist()]
    held = cache[0].offset if cache else 0
    if len(ids) != held:
        raise OptionError(f"cached_ids has {len(ids)} tokens but the cache holds {held} positions: "
                          "pass the token ids the cache holds")
    return ids


def _speculative_options(model, speculative, draft_model, num_draft_tokens, prompt_lookup, ngram) -> SpeculativeOptions:
    """`speculative`, or the options the separate keywords give (one or the other), checked against
    `model` unless they already were."""
    if speculative is None:
        return SpeculativeOptions(draft_model, num_draft_tokens, prompt_lookup, ngram, target=model)
    if draft_model is not None or prompt_lookup:
        raise OptionError("pass speculative decoding's options either as speculative= or as draft_model= / "
                          "prompt_lookup=, not both")
    return speculative.for_target(model)


def _draft_cache(cache, draft_model, draft_cache):
    """The draft's cache: `draft_cache`, which must hold as many tokens as `cache`, or a new one."""
    if draft_model is None:
        return None
    if draft_cache is None:
        if cache[0].offset:
            raise OptionError("a cache that already holds tokens needs the draft_cache that holds the same tokens")
        return make_cache(draft_model)
    if draft_cache[0].offset != cache[0].offset:
        raise OptionError(f"draft_cache holds {draft_cache[0].offset} positions, cache {cache[0].offset}: "
                         "they must hold the same tokens")
    return draft_cache


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
    draft_model: Optional[Model] = None,
    draft_cache: Optional[Sequence[KVCache]] = None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
    prompt_lookup_ngram: int = LOOKUP_NGRAM,
    cached_ids: Optional[Sequence[int]] = None,
    speculative: Optional[SpeculativeOptions] = None,
) -> Iterator[GenerationStep]:
    """Yield a `GenerationStep` (token, logprobs, ...) for up to `max_tokens` new tokens after `prompt`.

    `prompt` is token ids (BOS included if wanted). Generation also ends when the
    model's context (`max_context_length`) is full; the step that ends the budget has
    `last` set. `cache` (from `make_cache`) continues an earlier conversation; with
    `cached_ids`, the token ids that cache holds, the logits processors and prompt lookup
    see that conversation before `prompt` (as if it had been the prompt). While a
    token is handed out, the next one is already being computed (`mx.async_eval`), so
    the cache then holds the prompt and every token yielded so far; only a token that
    ends the budget is never fed to the model.

    Speculative decoding (see `speculative`): `draft_model` (same tokenizer; its own
    `draft_cache` holding the same tokens as `cache`) drafts `num_draft_tokens` tokens
    per target pass, or `prompt_lookup` > 0 proposes up to that many tokens copied from
    the context after an n-gram match (n up to `prompt_lookup_ngram`); or pass those
    options as one `speculative` (`SpeculativeOptions`; checked against `model` here unless
    `for_target(model)` already did, as `ChatSession` and the server do once). Greedy output is the target's own,
    and sampled output has the target's distribution. Both caches end as after plain
    decoding, but while tokens are handed out they may run a round ahead.
    """
    prompt = check_prompt(prompt, model)
    earlier = _check_cached_ids(cached_ids, cache)
    if max_tokens < 0:
        raise OptionError(f"max_tokens must be >= 0, got {max_tokens}")
    options = _speculative_options(model, speculative, draft_model, num_draft_tokens, prompt_lookup,
                                   prompt_lookup_ngram)
    cache = make_cache(model) if cache is None else cache
    draft_cache = _draft_cache(cache, options.draft_model, draft_cache)
    limit = token_budget(model.args.max_context_length, prompt.size, max_tokens, cache[0].offset)
    if limit == 0:
        return
    sampler = sampler or greedy
    processors = list(logits_processors or [])
    with wired_limit():
        prompt_tail = prefill(model, prompt, cache, prefill_step_size, prompt_progress)
        if not options.enabled:
            history = mx.array(earlier + prompt[: prompt.size - prompt_tail.size].tolist(), dtype=mx.uint32)
            steps = _plain_steps(model, cache, history, prompt_tail, limit, sampler, processors)
        else:
            draft = None
            if options.draft_model is not None:
                prefill(options.draft_model, prompt, draft_cache, prefill_step_size)
                draft = DraftProposer(options.draft_model, draft_cache, model.args.vocab_size)
            decoder = SpeculativeDecoder(model, cache, earlier + prompt.tolist(), sampler, processors, draft,
                                         options.num_draft_tokens, options.prompt_lookup, options.prompt_lookup_ngram,
                                         options.adaptive)
            steps = _speculative_steps(decoder, limit)
        yield from _prompt_read_at_first_step(steps, prompt_progress, prompt.size)


def _prompt_read_at_first_step(steps: Iterator[GenerationStep], progress, total: int) -> Iterator[GenerationStep]:
    """The prompt's last token is read with the first step: report (total, total) then, as mlx-lm
    does, so a progress bar driven by `prompt_progress` reaches its end."""
    for n, step in enumerate(steps):
        if n == 0 and progress:
            progress(total, total)
        yield step


def _plain_steps(model, cache, history, prompt_tail, limit, sampler, processors) -> Iterator[GenerationStep]:
    """One target pass per token, the next pass queued (`async_eval`) before a token is handed out.
    `history`: the tokens in the cache before `prompt_tail`, which the logits processors see."""

    def next_token(history: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        logits = model(tokens[None], cache=cache)[:, -1, :].astype(mx.float32)  # (1, vocab)
        if processors:
            history = mx.concatenate([history, tokens])
        logprobs = to_logprobs(logits, history, processors)
        return sampler(logprobs), logprobs.squeeze(0), history

    token, logprobs, history = next_token(history, prompt_tail)
    mx.async_eval(token, logprobs)
    for n in range(1, limit + 1):
        if n < limit:
            following = next_token(history, token)
            mx.async_eval(following[:2])
        yield GenerationStep(int(token.item()), logprobs, last=n == limit, target_forward_passes=n)
        if n < limit:
            token, logprobs, history = following


def _speculative_steps(decoder: SpeculativeDecoder, limit: int) -> Iterator[GenerationStep]:
    produced = accepted = 0
    while produced < limit:
        for token, logprobs, from_draft in decoder.round(limit - produced):
            produced += 1
            accepted += from_draft
            yield GenerationStep(token, logprobs, from_draft, produced == limit, decoder.drafted, accepted,
                                 decoder.target_passes)
    decoder.level_draft()  # only at the natural end: a consumer that stops early trims the caches anyway


@dataclass
class GenerationResponse:
    """One streamed step: the text this token completed and running statistics.

    The speculative-decoding counts are running totals (the last response's cover the whole
    generation); `acceptance_rate` is accepted / drafted, None when nothing was drafted.
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length", on the last response
    from_draft: bool = False
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: Optional[float] = None
    target_forward_passes: int = 0
    context_full: bool = False  # finish "length" because the model's context is full, before max_tokens

    @property
    def peak_memory(self) -> float:
        """`peak_memory_gb` under mlx-lm's name."""
        return self.peak_memory_gb


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    stop: Union[str, Sequence[str], None] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream a completion of `prompt` (text, which gets BOS, or token ids).

    Keyword arguments go to `generate_step` (sampler, logits_processors, cache,
    draft_model, prompt_lookup, ...); mlx-lm's names for them work too (prompt_cache,
    prompt_progress_callback), and unknown ones raise a TypeError listing the accepted.
    EOS, or the first of the `stop` strings in the text, ends generation with finish
    reason "stop" (the stop string itself is never returned: text that could be its
    start is held back until decided); running out of `max_tokens` or of the model's
    context ends it with "length" (with `context_full` set for the context).
    `max_tokens=-1` (mlx-lm's "no limit") generates until EOS or a full context.
    """
    kwargs = translate_kwargs(kwargs, keyword_names(stream_generate, generate_step))
    if max_tokens == -1:
        max_tokens = model.args.max_context_length
    prompt_ids = encode_prompt(tokenizer, prompt)
    steps = generate_step(prompt_ids, model, max_tokens=max_tokens, **kwargs)
    yield from stream_responses(steps, tokenizer, len(prompt_ids), max_tokens, stop)


def stream_responses(steps: Iterator[GenerationStep], tokenizer: Tokenizer, prompt_size: int, max_tokens: int,
                     stop: Union[str, Sequence[str], None] = None) -> Iterator[GenerationResponse]:
    """`stream_generate`'s responses for generated `steps` (the server's batched rows have their own)."""
    detokenizer = tokenizer.detokenizer()
    stops = StopMatcher(stop)  # stop="" is refused, not read as "no stop strings"
    mx.reset_peak_memory()
    tic = time.perf_counter()
    first_token_time = prompt_tps = 0.0
    for n, step in enumerate(steps, start=1):
        now = time.perf_counter()
        if n == 1:
            first_token_time = now
            prompt_tps = prompt_size / (now - tic)
        generation_tps = (n - 1) / (now - first_token_time) if n > 1 else 0.0
        if step.token in tokenizer.eos_ids:
            finish = "stop"
            text = detokenizer.finalize()
        else:
            text = detokenizer.add_token(step.token)
            finish = "length" if step.last else None
            if finish:
                text += detokenizer.finalize()
        if stops.stops:
            text = stops.feed(text)
            finish = "stop" if stops.stopped else finish
            text += stops.flush() if finish else ""
        yield GenerationResponse(
            text=text,
            token=step.token,
            logprobs=step.logprobs,
            prompt_tokens=prompt_size,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=generation_tps,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            from_draft=step.from_draft,
            drafted_tokens=step.drafted_tokens,
            accepted_tokens=step.accepted_tokens,
            acceptance_rate=step.accepted_tokens / step.drafted_tokens if step.drafted_tokens else None,
            target_forward_passes=step.target_forward_passes,
            context_full=finish == "length" and n < max_tokens,
        )
        if finish:
            return


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The completion of `prompt` as one string (see `stream_generate`).

    `verbose=True` prints the text as it comes and then the statistics to stdout, as
    mlx-lm's `generate` does.
    """
    responses = stream_generate(model, tokenizer, prompt, max_tokens, **kwargs)
    if verbose:
        return print_generation(responses)
    return "".join(r.text for r in responses)


def encode_prompt(tokenizer: Tokenizer, prompt: Union[str, Sequence[int], mx.array]) -> Union[list[int], mx.array]:
    """The token ids of a prompt: text (encoded, BOS first) or token ids as given.

    Anything else (bytes, None, a 2-D array, a list holding non-integers) is refused with
    a ValueError saying what a prompt may be, rather than misread (bytes are a sequence of
    ints) or failing deep inside MLX.
    """
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, mx.array):
        if prompt.ndim == 1 and mx.issubdtype(prompt.dtype, mx.integer):
            return prompt
        got = f"an mx.array of shape {tuple(prompt.shape)} and dtype {prompt.dtype}"
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        odd = [t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if not odd:
            return [int(t) for t in prompt]
        got = f"a {type(prompt).__name__} holding a {type(odd[0]).__name__}"
    else:
        got = type(prompt).__name__
    raise PromptError(f"prompt must be a str, or a sequence or 1-D mx.array of int token ids; got {got}")
