"""Perplexity of a model on a text, and its divergence from a reference model.

Long texts are scored with a sliding window, as in Hugging Face's perplexity guide:
windows of at most `context` tokens start every `stride` tokens, and each window scores
only the tokens that no earlier window scored, so every token after the first is
predicted exactly once, from up to `context - 1` tokens of history (more history the
smaller the stride, at more compute; the stride must be less than the context). With `reference`, the same windows also run
through a reference model (e.g. the float original of a quantized model), giving the
mean KL(reference || model) and how often both pick the same top-1 token. All
log-probabilities are computed in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import mlx.core as mx

from .errors import ContextLengthError, OptionError

Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)


class Window(NamedTuple):
    """Run tokens[begin:end]; score the targets tokens[first:end] (each from its prefix)."""

    begin: int
    end: int
    first: int


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..num_tokens-1 once each (token 0 has no history)."""
    if context < 2:
        raise OptionError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride < context:
        # stride == context would leave each window's first token without history: unscored
        raise OptionError(f"stride must be at least 1 and less than the context ({context}), got {stride}")
    windows, scored_until = [], 1  # tokens before `scored_until` are scored (or have no history)
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        if end > scored_until:
            windows.append(Window(begin, end, scored_until))
            scored_until = end
        if end == num_tokens:
            break
    return windows


@dataclass
class EvalResult:
    tokens: int  # tokens scored (all but the first)
    bytes: Optional[int]  # UTF-8 bytes of the text, when known
    nll: float  # summed negative log-likelihood, nats
    context: int
    stride: int
    windows: int
    seconds: float
    kl_mean: Optional[float] = None  # KL(reference || model), nats per token
    kl_max: Optional[float] = None
    top1_agreement: Optional[float] = None
    reference_nll: Optional[float] = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> Optional[float]:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    @property
    def reference_perplexity(self) -> Optional[float]:
        return None if self.reference_nll is None else math.exp(self.reference_nll / self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "reference_perplexity": self.reference_perplexity, "tokens_per_second": self.tokens_per_second}


def window_log_probs(model, tokens: Sequence[int], window: Window) -> mx.array:
    """float32 log-probabilities (targets, vocab) predicting tokens[first:end] in `window`."""
    logits = model(mx.array([list(tokens[window.begin : window.end])]))[0]
    logits = logits[window.first - 1 - window.begin : window.end - 1 - window.begin].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def evaluate(
    model,
    tokens: Sequence[int],
    context: int = 1024,
    stride: Optional[int] = None,
    reference=None,
    num_bytes: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> EvalResult:
    """Perplexity of `model` on `tokens` (and divergence from `reference`), sliding-window scored.

    `stride` defaults to half the context. `num_bytes`: the text's UTF-8 length, for bits per byte. Raises ContextLengthError when
    `context` exceeds a model's context window, ValueError for fewer than two tokens.
    """
    if len(tokens) < 2:
        raise OptionError(f"the text has {len(tokens)} token(s); at least two are needed to score one")
    for m in (model, reference):
        if m is not None and context > m.args.max_context_length:
            raise ContextLengthError(f"`context={context}` exceeds the model's context of "
                                     f"{m.args.max_context_length} tokens")
    stride = stride or max(1, context // 2)
    windows = sliding_windows(len(tokens), context, stride)
    total = len(tokens) - 1
    start = time.perf_counter()
    nll, ref_nll, kl_sum, kl_max, agree = mx.array(0.0), mx.array(0.0), mx.array(0.0), mx.array(0.0), mx.array(0)
    for window in windows:
        targets = mx.array(list(tokens[window.first : window.end]))[:, None]
        log_q = window_log_probs(model, tokens, window)
        nll = nll - mx.take_along_axis(log_q, targets, axis=-1).sum()
        if reference is not None:
            log_p = window_log_probs(reference, tokens, window)
            ref_nll = ref_nll - mx.take_along_axis(log_p, targets, axis=-1).sum()
            kl = mx.sum(mx.exp(log_p) * (log_p - log_q), axis=-1)
            kl_sum, kl_max = kl_sum + kl.sum(), mx.maximum(kl_max, kl.max())
            agree = agree + mx.sum(log_p.argmax(-1) == log_q.argmax(-1))
        mx.eval(nll, ref_nll, kl_sum, kl_max, agree)
        if progress is not None:
            progress(window.end - 1, total)
    result = EvalResult(tokens=total, bytes=num_bytes, nll=nll.item(), context=context, stride=stride,
                        windows=len(windows), seconds=time.perf_counter() - start)
    if reference is not None:
        result.kl_mean, result.kl_max = kl_sum.item() / total, kl_max.item()
        result.top1_agreement = agree.item() / total
        result.reference_nll = ref_nll.item()
    return result


def evaluate_text(model, tokenizer, text: str, **kwargs) -> EvalResult:
    """`evaluate` on `text`, tokenized with BOS first (as OpenELM always sees it)."""
    return evaluate(model, tokenizer.encode(text), num_bytes=len(text.encode("utf-8")), **kwargs)
