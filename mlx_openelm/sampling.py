"""Samplers and logits processors, built as closures.

A sampler maps log-probabilities (B, vocab) to token ids (B,). A logits processor
maps (token history (n,), logits (B, vocab)) to adjusted logits.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import mlx.core as mx

from .errors import OptionError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest entries per row, set the rest to -inf."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    dropped = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, dropped, mx.array(-math.inf, logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_probs = mx.take_along_axis(mx.softmax(logits, axis=-1), order, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < p  # the most likely token always survives
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -math.inf)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the top token's."""
    if min_p <= 0.0:
        return logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logits, -math.inf)


def validate_sampling(temp: float, top_k: int, top_p: float, min_p: float) -> None:
    """Refuse values no sampler can use, with a ValueError naming the option."""
    for name, value in [("temp", temp), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)]:
        if not _is_number(value) or (name == "top_k" and not isinstance(value, numbers.Integral)):
            kind = "an integer" if name == "top_k" else "a number"
            raise OptionError(f"{name} must be {kind}, got {value!r}")
    if not (temp >= 0 and math.isfinite(temp)):
        raise OptionError(f"temp must be a finite number >= 0, got {temp}")
    if top_k < 0:
        raise OptionError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise OptionError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise OptionError(f"min_p must be in [0, 1) (0 disables it), got {min_p}")


def validate_seed(seed: Optional[int]) -> None:
    """A seed is None or an integer in [0, 2**64) (what an MLX PRNG key holds)."""
    if seed is None:
        return
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise OptionError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")


def make_filter(temp: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Callable[[mx.array], mx.array]:
    """The logits a sampler at `temp > 0` draws from: log-probabilities divided by `temp`,
    then the top-k, top-p and min-p masks (-inf outside). Speculative sampling needs this
    distribution itself, not only a draw from it."""

    def filtered(logprobs: mx.array) -> mx.array:
        logits = logprobs / temp
        logits = apply_top_k(logits, top_k)
        logits = apply_top_p(logits, top_p)
        return apply_min_p(logits, min_p)

    return filtered


def make_sampler(
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
) -> Sampler:
    """Greedy at `temp == 0`; otherwise temperature, then top-k, top-p, min-p, then a draw.

    The order follows Hugging Face's warpers. With `seed`, draws come from the
    sampler's own PRNG key, so two samplers with one seed give the same tokens.
    A non-greedy sampler also carries `filtered_logits` (see `make_filter`) and
    `next_key()` (its next PRNG key, None without a seed) for speculative sampling.
    """
    validate_sampling(temp, top_k, top_p, min_p)
    validate_seed(seed)
    if temp == 0:
        return greedy
    filtered = make_filter(temp, top_k, top_p, min_p)
    key = mx.random.key(seed) if seed is not None else None

    def next_key() -> Optional[mx.array]:
        nonlocal key
        if key is None:
            return None
        key, draw_key = mx.random.split(key)
        return draw_key

    def sample(logprobs: mx.array) -> mx.array:
        return mx.random.categorical(filtered(logprobs), axis=-1, key=next_key())

    sample.filtered_logits = filtered
    sample.next_key = next_key
    return sample


def to_logprobs(logits: mx.array, history: mx.array, processors: Sequence[LogitsProcessor]) -> mx.array:
    """Apply the logits processors (seeing the token `history`) to (B, vocab) logits;
    return normalised log-probabilities."""
    for process in processors:
        logits = process(history, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def validate_repetition_penalty(penalty: float) -> None:
    """A repetition penalty is a finite number > 0 (1: off)."""
    if not (_is_number(penalty) and penalty > 0 and math.isfinite(penalty)):
        raise OptionError(f"repetition_penalty must be a positive number, got {penalty}")


def make_repetition_penalty(penalty: float) -> LogitsProcessor:
    """Hugging Face's repetition penalty over every token seen (prompt included):
    positive logits of seen tokens are divided by `penalty`, negative ones multiplied."""
    validate_repetition_penalty(penalty)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        seen = logits[:, tokens]
        logits[:, tokens] = mx.where(seen < 0, seen * penalty, seen / penalty)
        return logits

    return process


def make_logits_processors(repetition_penalty: Optional[float] = None) -> list[LogitsProcessor]:
    """The processors for these options: none when the penalty is None or 1 (off)."""
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    return [make_repetition_penalty(repetition_penalty)]
