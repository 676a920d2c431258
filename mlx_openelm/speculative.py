"""Speculative decoding: something cheap proposes tokens, the target model checks them all in one pass.

Proposals come from a draft model (a smaller OpenELM, or a quantized copy of the target) or from
prompt lookup (the tokens that followed the latest n-gram's first earlier occurrence, as in
Hugging Face's `prompt_lookup_num_tokens`). Each round the target runs once over the pending token
and the k proposals (with its KV cache), keeps the longest acceptable prefix, adds one token of its
own, and both caches are trimmed back to the tokens kept.

Which tokens are kept, so that the output is distributed exactly as the target's alone:

- Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), for samplers that expose their
  filtered distribution (`make_sampler` at temp > 0): a proposal x drawn from q is accepted with
  probability min(1, p(x) / q(x)); the first rejected one is replaced by a draw from the residual
  max(p - q, 0), normalised; when all are accepted the target adds a draw from its next p. Prompt
  lookup proposes deterministically: q is a point mass.
- Matching, for other samplers (greedy included): the target samples its own token at every
  position and proposals are kept while they equal it. For greedy decoding this gives the target's
  greedy tokens, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import mlx.core as mx

from .cache import KVCache, truncate_caches
from .config import same_vocabulary
from .drafting import LOOKUP_NGRAM, DraftLength, find_lookup_tokens
from .errors import ConfigError, OptionError
from .model import Model
from .sampling import LogitsProcessor, Sampler, to_logprobs


def check_draft(target: Model, draft: Model) -> None:
    """Refuse a draft model that cannot propose tokens for `target` (different tokenizer or shorter context)."""
    if not isinstance(draft, Model):
        raise TypeError(f"draft_model must be a loaded model (mlx_openelm.load_model(path)), got {type(draft).__name__}")
    t_vocab, d_vocab = target.args.vocab_size, draft.args.vocab_size
    if not same_vocabulary(t_vocab, d_vocab):  # CoreNet's padded 32128 drafts for 32000 and back
        raise ConfigError(
            f"the draft model's vocabulary has {d_vocab} tokens, the target's {t_vocab}: a draft model must "
            "use the target's tokenizer (any OpenELM, or a quantized copy of the target)"
        )
    t_context, d_context = target.args.max_context_length, draft.args.max_context_length
    if d_context < t_context:
        raise ConfigError(
            f"the draft model's context ({d_context} tokens) is shorter than the target's ({t_context} tokens)"
        )


@dataclass(frozen=True)
class SpeculativeOptions:
    """How tokens are proposed: a `draft_model` drafting `num_draft_tokens` per target pass, or
    `prompt_lookup` > 0 copying up to that many tokens after the context's last n-gram (n up to
    `prompt_lookup_ngram`); neither: plain decoding. With `adaptive` those counts are upper bounds:
    rounds that keep few proposals shorten the drafts or pause drafting (`DraftLength`).

    The fields are checked when the options are made (this is their one validator), and with a
    `target`, whether the draft fits it (`check_draft`). `for_target(model)` gives the options
    checked against `model`; the library's entry points (`generate_step`, `ChatSession`, the
    server's scheduler) take them that way once, and options already bound to the model pass through
    unchecked.
    """

    draft_model: Optional[Model] = None
    num_draft_tokens: int = 3
    prompt_lookup: int = 0
    prompt_lookup_ngram: int = LOOKUP_NGRAM
    adaptive: bool = True
    target: Optional[Model] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.draft_model is not None and not isinstance(self.draft_model, Model):
            raise TypeError("draft_model must be a loaded model (mlx_openelm.load_model(path)), got "
                            f"{type(self.draft_model).__name__}")
        if self.draft_model is not None and self.prompt_lookup:
            raise OptionError("use either draft_model or prompt_lookup, not both")
        if self.draft_model is not None and self.num_draft_tokens < 1:
            raise OptionError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if self.prompt_lookup < 0 or self.prompt_lookup_ngram < 1:
            raise OptionError(f"prompt_lookup must be >= 0 and prompt_lookup_ngram >= 1, got {self.prompt_lookup}, "
                              f"{self.prompt_lookup_ngram}")
        if self.target is not None and self.draft_model is not None:
            check_draft(self.target, self.draft_model)

    @property
    def enabled(self) -> bool:
        """Whether anything proposes tokens (else decoding is plain)."""
        return self.draft_model is not None or self.prompt_lookup > 0

    def for_target(self, target: Model) -> "SpeculativeOptions":
        """These options checked against `target` (see `check_draft`): themselves when already bound to it."""
        if self.target is target:
            return self
        return replace(self, target=target)


def match_vocab(logits: mx.array, vocab_size: int) -> mx.array:
    """Draft logits (..., V) over the target's `vocab_size` ids: padded ids dropped, or added at -inf."""
    size = logits.shape[-1]
    if size > vocab_size:
        return logits[..., :vocab_size]
    if size < vocab_size:
        pad = mx.full((*logits.shape[:-1], vocab_size - size), -mx.inf, dtype=logits.dtype)
        return mx.concatenate([logits, pad], axis=-1)
    return logits


# ---- the acceptance rule, batched over leading dimensions so it can be checked on many draws at once


def acceptance_probabilities(target_probs: mx.array, draft_probs: mx.array, proposals: mx.array) -> mx.array:
    """min(1, p(x) / q(x)) for each proposal x; probs (..., k, V), proposals (..., k)."""
    index = proposals[..., None].astype(mx.int32)
    p = mx.take_along_axis(target_probs, index, axis=-1)[..., 0]
    q = mx.take_along_axis(draft_probs, index, axis=-1)[..., 0]
    return mx.minimum(1.0, p / q)  # q(x) > 0: x was drawn from q


def count_accepted(accept_probs: mx.array, uniforms: mx.array) -> mx.array:
    """How many leading proposals are accepted: proposal i is when uniforms[i] < accept_probs[i]."""
    return mx.cumprod((uniforms < accept_probs).astype(mx.int32), axis=-1).sum(axis=-1)


def residual_distribution(target_probs: mx.array, draft_probs: mx.array) -> mx.array:
    """max(p - q, 0) normalised: what a rejected proposal is replaced with. Where it vanishes
    (p == q, so a rejection cannot happen except by round-off) it falls back to p."""
    residual = mx.maximum(target_probs - draft_probs, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    return mx.where(mass > 1e-12, residual / mx.maximum(mass, 1e-30), target_probs)


def speculative_sample(
    target_probs: mx.array, draft_probs: mx.array, proposals: mx.array, key: Optional[mx.array] = None
) -> tuple[mx.array, mx.array]:
    """Speculative sampling: (accepted count, the token after the accepted proposals).

    `target_probs` (..., k+1, V): the target's distribution after each of k proposals' prefixes
    and after the last proposal; `draft_probs` (..., k, V) what each proposal was drawn from.
    """
    uniform_key, draw_key = mx.random.split(key) if key is not None else (None, None)
    k = proposals.shape[-1]
    accept = acceptance_probabilities(target_probs[..., :k, :], draft_probs, proposals)
    accepted = count_accepted(accept, mx.random.uniform(shape=accept.shape, key=uniform_key))
    # Row i < k: the residual after rejecting proposal i; row k: the target's own next distribution.
    rows = mx.concatenate([residual_distribution(target_probs[..., :k, :], draft_probs), target_probs[..., k:, :]], -2)
    chosen = mx.take_along_axis(rows, accepted[..., None, None].astype(mx.int32), axis=-2)[..., 0, :]
    return accepted, mx.random.categorical(mx.log(chosen), axis=-1, key=draw_key)


def match_sample(target_logprobs: mx.array, proposals: mx.array, sampler: Sampler) -> tuple[mx.array, mx.array]:
    """The matching rule: (accepted count, the token after them); the target samples every position."""
    own = sampler(target_logprobs)  # (k+1,)
    accepted = mx.cumprod((own[:-1] == proposals).astype(mx.int32)).sum() if proposals.size else mx.array(0)
    return accepted, own[accepted]


# ---- proposers


class DraftProposer:
    """A draft model with its own KV cache, drafting with the target's sampler and logits processors."""

    def __init__(self, model: Model, cache: Sequence[KVCache], vocab_size: int):
        self.model = model
        self.cache = cache
        self.vocab_size = vocab_size

    def propose(self, feed: mx.array, k: int, history: mx.array, sampler: Sampler, processors) -> tuple:
        """Draft k tokens after feeding `feed` (the context the draft cache lacks; `history` is the whole
        context); returns the tokens (k,) and the log-probabilities they were drawn from (k, V), both lazy."""
        tokens, rows = [], []
        for _ in range(k):
            logits = self.model(feed[None], cache=self.cache)[:, -1, :].astype(mx.float32)
            logprobs = to_logprobs(match_vocab(logits, self.vocab_size), history, processors)
            feed = sampler(logprobs).astype(mx.uint32)
            mx.async_eval(feed)
            tokens.append(feed)
            rows.append(logprobs)
            if processors:
                history = mx.concatenate([history, feed])
        return mx.concatenate(tokens), mx.concatenate(rows)


class SpeculativeDecoder:
    """Rounds of propose -> verify -> accept -> trim for one generation.

    `context` is what prompt lookup and the logits processors see (the conversation the cache
    already held when its ids are known, the prompt, then every token produced); the caches
    hold `start` earlier positions not in it plus all of `context` but its last token.
    `adaptive`: the proposals per round follow `DraftLength` (up to the number asked for),
    else always that number.
    """

    def __init__(
        self,
        model: Model,
        cache: Sequence[KVCache],
        context: list[int],
        sampler: Sampler,
        processors: Sequence[LogitsProcessor],
        draft: Optional[DraftProposer] = None,
        num_draft_tokens: int = 3,
        prompt_lookup: int = 0,
        lookup_ngram_size: int = LOOKUP_NGRAM,
        adaptive: bool = True,
    ):
        self.model = model
        self.cache = cache
        self.start = cache[0].offset - (len(context) - 1)
        self.context = context
        self.sampler = sampler
        self.processors = list(processors)
        self.draft = draft
        self.num_proposals = num_draft_tokens if draft is not None else prompt_lookup
        self.length = DraftLength(self.num_proposals) if adaptive else None
        self.lookup_ngram_size = lookup_ngram_size
        self.drafted = 0
        self.target_passes = 0

    def _history(self) -> mx.array:
        """What the logits processors see before the first proposal: the whole context."""
        if not self.processors:
            return mx.array([], dtype=mx.uint32)
        return mx.array(self.context, dtype=mx.uint32)

    def _unfed(self, cache: Sequence[KVCache]) -> mx.array:
        return mx.array(self.context[cache[0].offset - self.start :], dtype=mx.uint32)

    def _propose(self, k: int, history: mx.array) -> tuple[mx.array, Optional[mx.array]]:
        """k (or, for prompt lookup, up to k) proposals and the draft's log-probabilities (None for lookup)."""
        if k == 0:
            return mx.array([], dtype=mx.uint32), None
        if self.draft is None:
            found = find_lookup_tokens(self.context, k, self.lookup_ngram_size)
            return self._allowed(mx.array(found, dtype=mx.uint32), None, history)
        proposals, logprobs = self.draft.propose(self._unfed(self.draft.cache), k, history, self.sampler,
                                                 self.processors)
        return self._allowed(proposals, logprobs, history)

    def _allowed(self, proposals: mx.array, logprobs, history: mx.array) -> tuple[mx.array, Optional[mx.array]]:
        """The proposals up to the first one a processor with `valid_prefix` (a grammar) refuses: the
        target never verifies a token its constraint could not produce."""
        n = proposals.size
        for process in self.processors:
            if n and hasattr(process, "valid_prefix"):
                n = min(n, process.valid_prefix(history, proposals[:n]))
        if n == proposals.size:
            return proposals, logprobs
        return proposals[:n], None if logprobs is None else logprobs[:n]

    def _verify(self, proposals: mx.array, history: mx.array) -> mx.array:
        """The target's processed log-probabilities (k+1, V) after the pending token and each proposal."""
        feed = mx.concatenate([self._unfed(self.cache), proposals])
        k = proposals.size
        logits = self.model(feed[None], cache=self.cache)[0, -(k + 1) :, :].astype(mx.float32)
        self.target_passes += 1
        if not self.processors:
            return to_logprobs(logits, history, ())
        seen = mx.concatenate([history, proposals])  # row i sees the context and proposals before i
        return mx.concatenate(
            [to_logprobs(logits[i : i + 1], seen[: history.size + i], self.processors) for i in range(k + 1)]
        )

    def _accept(self, proposals: mx.array, draft_logprobs, target_logprobs: mx.array) -> tuple[mx.array, mx.array]:
        k = proposals.size
        filtered = getattr(self.sampler, "filtered_logits", None)
        if filtered is None or k == 0:
            return match_sample(target_logprobs, proposals, self.sampler)
        p = mx.softmax(filtered(target_logprobs), axis=-1)
        if draft_logprobs is None:  # prompt lookup: the proposals are certain
            q = (mx.arange(p.shape[-1])[None] == proposals[:, None]).astype(p.dtype)
        else:
            q = mx.softmax(filtered(draft_logprobs), axis=-1)
        return speculative_sample(p, q, proposals, self.sampler.next_key())

    def level_draft(self) -> None:
        """Feed the draft what the target has and it lacks (after a round that accepted every
        proposal, the last one), so that both caches hold the same tokens when generation ends."""
        if self.draft is None or self.draft.cache[0].offset >= self.cache[0].offset:
            return
        missing = self.context[self.draft.cache[0].offset - self.start : self.cache[0].offset - self.start]
        self.draft.model(mx.array(missing, dtype=mx.uint32)[None], cache=self.draft.cache)
        mx.eval([c.state for c in self.draft.cache])

    def round(self, budget: int) -> list[tuple[int, mx.array, bool]]:
        """One verification pass: 1 to k+1 `(token, logprobs, from_draft)`, never more than `budget`."""
        wanted = self.length.next() if self.length is not None else self.num_proposals
        k = min(wanted, budget - 1)  # the target's own token needs one place in the budget
        history = self._history()
        proposals, draft_logprobs = self._propose(k, history)
        k = proposals.size
        self.drafted += k
        target_logprobs = self._verify(proposals, history)
        accepted, token = self._accept(proposals, draft_logprobs, target_logprobs)
        mx.eval(accepted, token, proposals, target_logprobs)
        n = accepted.item()
        if self.length is not None:
            self.length.update(k, n)
        tokens = proposals[:n].tolist() + [token.item()]
        self.context.extend(tokens)
        kept = self.start + len(self.context) - 1  # the last token is pending, as after a plain step
        truncate_caches(self.cache, kept)
        if self.draft is not None:
            truncate_caches(self.draft.cache, kept)
        return [(t, target_logprobs[i], i < n) for i, t in enumerate(tokens)]
