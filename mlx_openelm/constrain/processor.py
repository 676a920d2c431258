"""The per-request logits processor that keeps generation inside a grammar.

`make_constraint(tokenizer, json_schema=..., regex=..., grammar=...)` returns a `GrammarProcessor`
for one generation: a logits processor like the others (`(history, logits) -> logits`). Each call
it brings its llguidance matcher to the tokens generated so far (the history after the first
call's), fills the matcher's bitmask of allowed tokens and applies it with pure MLX ops (shift,
and, where: Metal, CUDA and CPU alike), so disallowed tokens get -inf. EOS is allowed only where
the grammar accepts; once the grammar is complete only EOS is. Columns past the tokenizer (a
padded logits row) are never allowed.

The matcher follows the history it is shown, rolling back what the history no longer holds:
speculative decoding shows it drafts, then each verified position, then the accepted tokens, and
every mask matches plain decoding's at that position. `valid_prefix` cuts a draft at its first
token the grammar refuses, so the verification never feeds the matcher an invalid token.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import GrammarError, OpenELMError
from .grammar import ConstraintSpec, first_line, validate_constraint
from .vocabulary import is_sentencepiece_vocabulary, matcher_tokenizer


class ConstraintError(OpenELMError):
    """The grammar matcher failed during generation (a token it did not allow reached it): the
    generation stops rather than continue outside the constraint."""


_SHIFTS = mx.arange(32, dtype=mx.int32)


@mx.compile
def apply_bitmask(logits: mx.array, bits: mx.array) -> mx.array:
    """`logits` (B, V) with -inf where the bitmask `bits` (B, ceil(V/32)) int32, bit i of word j
    standing for token 32j + i, has a 0; columns past 32 * words are -inf too."""
    allowed = ((bits[..., None] >> _SHIFTS) & 1).reshape(bits.shape[0], -1)
    width = logits.shape[-1]
    if allowed.shape[-1] < width:
        allowed = mx.pad(allowed, [(0, 0), (0, width - allowed.shape[-1])])
    return mx.where(allowed[:, :width].astype(mx.bool_), logits, -math.inf)


def _limits():
    from llguidance import LLParserLimits

    return LLParserLimits(verbose_errors=False)


class GrammarProcessor:
    """A logits processor for one generation under one grammar (see the module docstring).

    `overlap`: start evaluating the logits (`mx.async_eval`) before filling the mask, so the
    model's forward pass runs while the CPU computes the mask.
    """

    def __init__(self, matcher, vocab_size: int, eos: list[int], overlap: bool = True):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = eos
        self.overlap = overlap
        self.start: Optional[int] = None  # history length at the first call: the prompt
        self.fed: list[int] = []  # generated tokens the matcher has consumed, in order
        self.bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar matcher failed: {first_line(self.matcher.get_error())}")

    def _matched(self, tokens: list[int]) -> int:
        """How many of `tokens` the matcher holds: EOS never reaches it (llguidance does not count an EOS
        consumed after the grammar completes when rolling back), it is tracked here."""
        return sum(t not in self.eos for t in tokens)

    def _advance(self, tokens: list[int], ended: bool) -> int:
        """Consume the longest allowed prefix of `tokens` (after an EOS when `ended`); return its length."""
        n = 0
        while n < len(tokens):
            if tokens[n] in self.eos:
                if not (ended or self.matcher.is_accepting() or self.matcher.is_stopped()):
                    break
                ended, n = True, n + 1
                continue
            if ended:  # nothing but EOS follows EOS
                break
            run = tokens[n:]
            run = run[: next((i for i, t in enumerate(run) if t in self.eos), len(run))]
            valid = self.matcher.validate_tokens(run)
            if valid and not self.matcher.consume_tokens(run[:valid]):
                self._check()
            n += valid
            if valid < len(run):
                break
        return n

    def _sync(self, tokens: list[int]) -> int:
        """Bring the matcher to `tokens` (rolling back what differs); returns how many it accepted."""
        common = 0
        for a, b in zip(self.fed, tokens):
            if a != b:
                break
            common += 1
        if len(self.fed) > common:
            self.matcher.rollback(self._matched(self.fed[common:]))
            del self.fed[common:]
        n = self._advance(tokens[common:], self._ended)
        self.fed += tokens[common : common + n]
        self._check()
        return len(self.fed)

    @property
    def _ended(self) -> bool:
        return bool(self.fed) and self.fed[-1] in self.eos

    def _generated(self, history: mx.array) -> list[int]:
        if self.start is None:
            self.start = history.size
        if history.size < self.start:
            raise ConstraintError("a grammar processor serves one generation: make a new one for each")
        return history[self.start:].tolist() if history.size > self.start else []

    def valid_prefix(self, history: mx.array, proposals: mx.array) -> int:
        """How many leading `proposals` (drafted after `history`) the grammar allows."""
        tokens = self._generated(history)
        if self._sync(tokens) < len(tokens):
            raise ConstraintError("the history holds a token the grammar does not allow")
        drafted = proposals.tolist()
        n = self._advance(drafted, self._ended)
        self.matcher.rollback(self._matched(drafted[:n]))
        self._check()
        return n

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if self.overlap:
            mx.async_eval(logits)
        tokens = self._generated(history)
        accepted = self._sync(tokens)
        if accepted < len(tokens):
            raise ConstraintError(f"token {tokens[accepted]} is outside the grammar")
        import llguidance.numpy

        if self._ended:  # after EOS only EOS (generation stops there; a pipelined step may still ask)
            words = self.bitmask.view(np.uint32)
            words[:] = 0
            for token in self.eos:
                words[0, token // 32] |= np.uint32(1 << (token % 32))
        else:
            llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        self._check()
        bits = mx.array(self.bitmask.copy())
        if logits.shape[0] != 1:
            bits = mx.broadcast_to(bits, (logits.shape[0], bits.shape[1]))
        return apply_bitmask(logits, bits)

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete under the grammar."""
        return self.matcher.is_accepting()


def make_constraint(tokenizer, json_schema=None, regex: Optional[str] = None, grammar=None, strict: bool = False,
                    vocab_size: Optional[int] = None, spec: Optional[ConstraintSpec] = None,
                    overlap: bool = True) -> Optional[GrammarProcessor]:
    """A `GrammarProcessor` for one generation with `tokenizer`, or None when no constraint is given.

    One of `json_schema` (a dict, JSON text or a JSON file's path), `regex` (the whole output
    matches it) or `grammar` (Lark text, or a `pathlib.Path` to a Lark file); or an already
    validated `spec` (see `validate_constraint`). `strict`: a schema keyword the matcher does not
    implement is an error instead of being ignored. `vocab_size`: the model's logits width
    (`model.args.vocab_size`; default the tokenizer's). Raises `GrammarError` naming what does
    not compile. Add the processor last in `logits_processors`; make a new one per generation.
    """
    from llguidance import LLMatcher

    spec = spec or validate_constraint(json_schema, regex, grammar, strict)
    if spec is None:
        return None
    vocab_size = vocab_size or tokenizer.vocab_size
    lltokenizer = matcher_tokenizer(tokenizer, vocab_size)
    grammar_text = spec.grammar(sentencepiece=is_sentencepiece_vocabulary(tokenizer))
    matcher = LLMatcher(lltokenizer, grammar_text, log_level=0, limits=_limits())
    if matcher.is_error():
        raise GrammarError(f"{spec.kind}: {first_line(matcher.get_error())}")
    return GrammarProcessor(matcher, vocab_size, list(lltokenizer.eos_tokens), overlap)
