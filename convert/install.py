"""Installing a converted model atomically, and never losing what the user had.

The output is written into `.NAME.tmp-XXXX` beside the target, holding an in-progress
file with the writer's pid until the moment it is renamed into place. The rename
claims the target atomically (`renameat2(RENAME_NOREPLACE)` on Linux, `renamex_np(RENAME_EXCL)`
on macOS, else an exclusive `mkdir` of the target and a rename onto that empty folder),
so a folder that appears at the target while converting is never replaced without
--force, and of two runs racing for one target exactly one wins. Signals are blocked
while the temp folder is created and removed, so an interrupt cannot leave it behind;
`handle_signals` makes SIGTERM and SIGHUP interrupt a conversion like Ctrl-C does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
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

from mlx_openelm.errors import ConfigError
from mlx_openelm.loading import IN_PROGRESS_FILE, TEMPORARY_INFIX

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A conversion stopped by a signal (SIGINT, SIGTERM or SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP (on POSIX) for the duration: the block cannot be interrupted."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise `Interrupted`, and block further signals so
    that the cleanup the first one starts cannot itself be interrupted. Only in the main
    thread (elsewhere Python cannot install handlers) and on POSIX; a no-op otherwise."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return

    interrupted = []

    def interrupt(signum, _frame):
        # Signals that reached Python before the block still call this: only the first counts.
        if interrupted:
            return
        interrupted.append(signum)
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        raise Interrupted(signum)

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    previous = {s: signal.signal(s, interrupt) for s in SIGNALS}
    try:
        yield
    finally:
        # Signals that arrived during the cleanup are dropped (ignored while unblocking):
        # the conversion is over either way.
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- the temporary folder -------------------------------------------------------------------

def temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMPORARY_INFIX}"


def make_temp_folder(target: Path) -> Path:
    """A new empty folder beside `target` marked with our pid; call with signals blocked.
    Raises a ConfigError naming the folder when it is not writable."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target)))
    except OSError as e:
        raise ConfigError(f"--mlx-path: cannot write into {target.parent} ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    (tmp / IN_PROGRESS_FILE).write_text(f"{os.getpid()}\n")
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
    """Remove the temp folder and the parents this run created; signals wait meanwhile."""
    with signals_blocked():
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

def _libc_rename_noreplace():
    """renameat2(RENAME_NOREPLACE) (Linux) or renamex_np(RENAME_EXCL) (macOS), or None."""
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


def install(tmp: Path, target: Path, force: bool) -> None:
    """Rename the finished `tmp` to `target`. Without `force` an existing target is never
    touched; with it the old one is moved aside and deleted only once the new one is in place."""
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
