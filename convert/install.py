"""Installing a converted model atomically, and never losing what the user had.

The output is written into `.NAME.tmp-XXXX` beside the target, holding an in-progress
file with the writer's pid until the moment it is renamed into place. The rename
claims the target atomically (`renameat2(RENAME_NOREPLACE)` on Linux, `renamex_np(RENAME_EXCL)`
on macOS, else an exclusive `mkdir` of the target and a rename onto that empty folder),
so a folder that appears at the target while converting is never replaced without
--force, and of two runs racing for one target exactly one wins. Signals are deferred
while the temp folder is created, installed and removed, and `installing` runs the
removal again when an interrupt lands as it starts, so an interrupt cannot leave it behind;
`handle_signals` makes SIGTERM and SIGHUP interrupt a conversion like Ctrl-C does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mlx_openelm.errors import CheckpointError, ConfigError
from mlx_openelm.loading import IN_PROGRESS_FILE, TEMPORARY_INFIX

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A conversion stopped by a signal (SIGINT, SIGTERM or SIGHUP)."""

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
    a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread() or _STATE.active:
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _STATE.__init__()
    _STATE.active = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STATE.__init__()


# ---- the temporary folder -------------------------------------------------------------------

def temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMPORARY_INFIX}"


def make_temp_folder(target: Path) -> Path:
    """A new empty folder beside `target` marked with our pid; call with signals deferred.
    Raises a ConfigError naming the folder when it is not writable."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target)))
    except OSError as e:
        raise ConfigError(f"--mlx-path: cannot write into {target.parent} ({e.strerror})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
        (tmp / IN_PROGRESS_FILE).write_text(f"{os.getpid()}\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"--mlx-path: cannot write into {target.parent} ({e.strerror})") from None
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_folders(target: Path) -> list[Path]:
    """Remove temp folders for `target` whose writer is provably gone (its pid file names a
    process that no longer exists); others are left alone. Returns those removed."""
    removed = []
    for folder in target.parent.glob(temp_prefix(target) + "*"):
        marker = folder / IN_PROGRESS_FILE
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue  # not provably ours or not provably dead
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def discard(tmp: Optional[Path], created_parents: list[Path]) -> None:
    """Remove the temp folder and the parents this run created; signals wait meanwhile.
    Idempotent: call it again when it raises `KeyboardInterrupt` (see `installing`)."""
    with signals_deferred():
        _remove(tmp, created_parents)


def _remove(tmp: Optional[Path], created_parents: list[Path]) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in reversed(created_parents):
        try:
            folder.rmdir()
        except OSError:
            pass


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and missing parents; return those created (outermost first)."""
    missing = []
    current = folder.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as e:
            for done in reversed(created):
                done.rmdir()
            raise ConfigError(f"--mlx-path: cannot create {path} ({e.strerror})") from None
        created.append(path)
    return created


# ---- installing -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _libc_rename_noreplace():
    """renameat2(RENAME_NOREPLACE) (Linux) or renamex_np(RENAME_EXCL) (macOS), or None.
    Looked up once (finding libc runs `ldconfig` on Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, noreplace = -100, 1
        return lambda src, dst: libc.renameat2(at_fdcwd, src, at_fdcwd, dst, noreplace)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        return lambda src, dst: libc.renamex_np(src, dst, 0x4)
    return None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if `dst` does not exist, atomically; FileExistsError otherwise."""
    rename = _libc_rename_noreplace()
    if rename is not None:
        if rename(os.fsencode(src), os.fsencode(dst)) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # unsupported here: fall back
            raise OSError(err, os.strerror(err), str(dst))
    os.mkdir(dst)  # the claim: fails if anything is there
    try:
        os.rename(src, dst)  # onto our own empty folder
    except OSError:
        try:
            os.rmdir(dst)
        except OSError:
            pass  # someone wrote into it meanwhile: theirs now
        raise FileExistsError(errno.EEXIST, "appeared while installing", str(dst)) from None


def check_replaceable(target: Path) -> None:
    """`--force` replaces an output folder, never a file or a device (`--mlx-path /dev/null`
    run as root would otherwise delete the device node)."""
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise ConfigError(f"--mlx-path: {target} exists and is not a folder; --force only replaces a folder")


@contextmanager
def installing(target: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside `target` to write the output into; installed at `target` when the
    block completes, removed (with any parent folders made for it) when it fails or is interrupted,
    whatever moment the signal lands."""
    created_parents, tmp = [], None
    try:
        with signals_deferred():
            created_parents = make_parents(target.parent)
            remove_stale_temp_folders(target)
            tmp = make_temp_folder(target)
        yield tmp
        with signals_deferred(finishing=True):
            install(tmp, target, force)
            tmp, created_parents = None, []
    except BaseException as failure:
        # A signal already on its way lands at the next call, which may be `discard` itself, before
        # its signals wait: a Ctrl-C while MLX compiled a kernel on first use also kills the compiler,
        # so MLX raises before Python runs the handler. `handle_signals`' handler then waits (a
        # failure is being handled); Python's own raises KeyboardInterrupt there: caught in this
        # frame (not in a helper, which it would cut at its start), the cleanup runs again and the
        # interrupt is what is raised.
        while True:
            try:
                discard(tmp, created_parents)
                break
            except KeyboardInterrupt as interrupt:
                failure = interrupt
        raise failure


def install(tmp: Path, target: Path, force: bool) -> None:
    """Rename the finished `tmp` to `target`. Without `force` an existing target is never
    touched; with it the old one is moved aside and deleted only once the new one is in place."""
    try:
        _install(tmp, target, force)
    except OSError as e:
        raise CheckpointError(f"{e.filename or target}: cannot install the output ({e.strerror or e})") from None


def _install(tmp: Path, target: Path, force: bool) -> None:
    os.unlink(tmp / IN_PROGRESS_FILE)
    exists = target.exists() or target.is_symlink()
    if not exists or not force:
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            raise ConfigError(
                f"--mlx-path: {target} appeared while converting (another run?); it was left as it is "
                "and nothing was written (pass --force to replace it)"
            ) from None
        return
    check_replaceable(target)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        rename_noreplace(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
