"""Stop strings for streamed text: end generation at the first one, never showing it.

Text arrives in pieces (one per token), and a stop string can be split across
pieces, so `StopMatcher` holds back any tail of the text that could still be the
start of a stop string until the next piece decides it.
"""

from __future__ import annotations

from typing import Iterable, Union

from .errors import OptionError


def normalize_stops(stop: Union[str, Iterable[str], None]) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (a single string is one stop string)."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise OptionError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def partial_stop_length(text: str, stops: Iterable[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StopMatcher:
    """Feed streamed text with `feed`; it returns what is safe to show.

    After a stop string is found, `stopped` is true and `feed` has returned the text
    before it (the stop string and anything after it are dropped). When the stream
    ends without one, `flush` returns the text still held back.
    """

    def __init__(self, stop: Union[str, Iterable[str], None]):
        self.stops = normalize_stops(stop)
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        # Text already returned holds no stop string and no start of one, so the
        # earliest match in `text` is the earliest in the whole stream.
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return text[: min(found)]
        keep = partial_stop_length(text, self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
