"""What a speculative round proposes and how much: prompt lookup's n-gram search and the adaptive
draft length, with the defaults measured on the trained test model (docs/performance.md). No MLX here:
the CLI reads these defaults at startup."""

from __future__ import annotations

from typing import Sequence

LOOKUP_NGRAM = 8  # longest n-gram prompt lookup matches: 2 (Hugging Face's default) copied less on the trained
# model's grounded prompts (docs/performance.md); past 8 nothing changed.
LOOKUP_MIN_NGRAM = 2  # a match of one token proposes nothing: on the trained model such proposals were mostly
# rejected, and a verified proposal is not free on a CPU (docs/performance.md).
SINGLE_STREAM_LOOKUP = 4  # `generate` and `chat` draft this many tokens by prompt lookup unless told otherwise:
# on a Linux CPU with OpenBLAS it was the fastest length on grounded prompts and near plain decoding on free ones.


def find_lookup_tokens(context: Sequence[int], num_tokens: int, max_ngram_size: int = LOOKUP_NGRAM,
                       min_ngram_size: int = LOOKUP_MIN_NGRAM) -> list[int]:
    """Prompt lookup: up to `num_tokens` tokens that followed the first earlier occurrence of the
    context's longest repeated suffix of at most `max_ngram_size` tokens, or nothing when that suffix is
    shorter than `min_ngram_size` (at most `max_ngram_size`). With `min_ngram_size=1` this is Hugging Face's
    rule (n = `max_ngram_size` down to 1, the first match at the largest n that has one), computed here by
    narrowing the one-token matches one position at a time."""
    import numpy as np  # here: the CLI reads this module's constants at startup

    tokens = np.asarray(context)
    length = tokens.size
    if length < 2 or num_tokens < 1:
        return []
    starts = np.flatnonzero(tokens[:-1] == tokens[-1]) + 1  # where each match's continuation starts
    matched = 1
    for n in range(2, min(max_ngram_size, length - 1) + 1):
        longer = starts[starts >= n]
        longer = longer[tokens[longer - n] == tokens[length - n]]
        if not longer.size:
            break
        starts, matched = longer, n
    if not starts.size or matched < min(min_ngram_size, max_ngram_size):
        return []
    return tokens[starts[0] : starts[0] + num_tokens].tolist()


class DraftLength:
    """How many tokens to propose next round, from how many were kept so far; the output never
    depends on it (every proposal is verified), only the speed does.

    It starts at `limit`. A round that keeps every proposal grows it by one (up to `limit`); one that
    does not sets it to one more than were kept. A round that keeps fewer than `min_rate` of its
    proposals is a miss: after `patience` misses in a row drafting pauses for `pause` rounds (plain
    decoding steps, since verifying proposals makes a target pass dearer and a draft model's passes
    are lost), then probes with one proposal. A miss right after a pause pauses again, twice as long
    (up to `max_pause`); a round that is not a miss ends the doubling.
    """

    def __init__(self, limit: int, min_rate: float = 0.25, patience: int = 2, pause: int = 4, max_pause: int = 64):
        self.limit, self.min_rate, self.patience = limit, min_rate, patience
        self.first_pause, self.max_pause = pause, max_pause
        self.length, self.pause, self.misses, self.paused = limit, pause, 0, 0

    def next(self) -> int:
        """Proposals for the next round (0: a plain step)."""
        if self.paused:
            self.paused -= 1
            return 0
        return self.length

    def update(self, drafted: int, kept: int) -> None:
        """Record a round that proposed `drafted` tokens and kept `kept` of them."""
        if drafted == 0:  # a pause, or prompt lookup that found nothing: no evidence
            return
        self.length = min(self.limit, self.length + 1) if kept == drafted else kept + 1
        if kept >= self.min_rate * drafted:
            self.misses, self.pause = 0, self.first_pause
            return
        self.misses += 1
        if self.misses >= self.patience:
            self.paused, self.pause = self.pause, min(self.max_pause, 2 * self.pause)
            self.misses = self.patience - 1  # one more miss pauses again
