"""Every way mlx-openelm handles SIGINT, SIGTERM and SIGHUP, in one module.

There are three, because three kinds of work end differently; each installs its handlers
through `_handlers` (main thread only, the previous handlers restored on the way out):

- `signals_as_exit`, around every command (`cli_common.user_errors`): SIGTERM and SIGHUP raise
  `Terminated` (a SystemExit with status 128 + the signal number), so `finally` blocks and
  context managers clean up as they do for Ctrl-C, which keeps Python's own KeyboardInterrupt
  (`chat` uses it to stop a reply and keep the conversation).
- `handle_signals`, around work that writes a folder or an adapter (`convert`, `lora`): all
  three raise `Interrupted` (a KeyboardInterrupt, so the writer's cleanup and the trainer's
  save-on-Ctrl-C treat them alike), only once, and not inside a `signals_deferred` block (the
  creation, install and removal of a temporary folder, `folder.install`), where the signal
  waits until the block ends. The exit status is 1 with "interrupted (SIGTERM)".
- `calling_on_signals`, around a server (`serve`): SIGINT and SIGTERM call a function (the
  server's graceful stop) instead of raising in whatever thread-unsafe moment the main thread is
  in; running requests are cancelled and the exit status is 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
EXIT_SIGNALS = tuple(s for s in SIGNALS if s != signal.SIGINT)  # Ctrl-C keeps Python's KeyboardInterrupt
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _handlers(signals, handler) -> Iterator[bool]:
    """Within, `handler` handles `signals`; yields whether it was installed (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield True
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


# ---- ending a command like an exception -------------------------------------------------------

class Terminated(SystemExit):
    """Raised by SIGTERM/SIGHUP inside a command (exit status 128 + the signal number)."""


def _terminate(signum, _frame):
    raise Terminated(128 + signum)


@contextmanager
def signals_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated`, so `finally` blocks and
    context managers clean up as they do for Ctrl-C."""
    with _handlers(EXIT_SIGNALS, _terminate):
        yield


# ---- interrupting work that writes, with moments that must not be cut ---------------------------

class Interrupted(KeyboardInterrupt):
    """Work stopped by a signal (SIGINT, SIGTERM or SIGHUP) within `handle_signals`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalState:
    """What `handle_signals`' handler and `signals_deferred` share. Signal handlers are
    process-wide, so this is too: one instance, used only from the main thread."""

    def __init__(self):
        self.active = False  # handle_signals is installed
        self.fired = False  # an Interrupted was raised: later signals are ignored
        self.depth = 0  # inside signals_deferred
        self.pending: Optional[int] = None  # a signal that arrived while deferred

    def interrupt(self, signum: int) -> None:
        self.fired, self.pending = True, None
        raise Interrupted(signum)


_STATE = _SignalState()


def _handler(signum, _frame):
    # A signal may reach Python while another thread holds it at the C level, so deferral is
    # decided here, not by a signal mask (which is per thread and MLX runs its own threads).
    if _STATE.fired:
        return
    if _STATE.depth or sys.exc_info()[1] is not None:
        # Deferred within a block that must not be cut, and while a failure is being handled: its
        # way to `installing`'s cleanup passes through `with` exits (contextlib's __exit__) where an
        # interrupt would cut it. Raised when the next deferral (the cleanup's own) ends.
        _STATE.pending = _STATE.pending or signum
        return
    _STATE.interrupt(signum)


@contextmanager
def signals_deferred(finishing: bool = False) -> Iterator[None]:
    """Within, SIGINT/SIGTERM/SIGHUP wait (when `handle_signals` is active); a signal that
    arrived meanwhile raises `Interrupted` once the block completed, unless the block was
    the `finishing` one (the install: the work is done, and is reported as done)."""
    _STATE.depth += 1
    try:
        yield
    finally:
        if finishing:  # before the deferral ends, so that no moment is left for a signal to raise
            _STATE.fired = True
        _STATE.depth -= 1
    if _STATE.depth == 0 and _STATE.pending is not None and not _STATE.fired:
        _STATE.interrupt(_STATE.pending)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise `Interrupted` (once: the cleanup that starts
    cannot itself be interrupted). Only in the main thread, where Python can install handlers;
    a no-op elsewhere, and when already active."""
    if _STATE.active:
        yield
        return
    installed = False
    try:
        with _handlers(SIGNALS, _handler) as installed:
            if installed:
                _STATE.__init__()
                _STATE.active = True
            yield
    finally:
        if installed:  # once Python's handlers are back: a late signal is not raised meanwhile
            _STATE.__init__()


# ---- stopping a server --------------------------------------------------------------------------

@contextmanager
def calling_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Within, SIGINT and SIGTERM call `stop()` (it must only ask the work to end, from any moment)."""
    with _handlers(STOP_SIGNALS, lambda *_: stop()):
        yield
