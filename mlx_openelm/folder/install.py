"""Installing a model folder atomically, and never losing what the user had.

The folder is written into `.NAME.tmp-XXXX` beside the target, holding an in-progress
file with the writer's pid until the moment it is renamed into place. The rename
claims the target atomically (`renameat2(RENAME_NOREPLACE)` on Linux, `renamex_np(RENAME_EXCL)`
on macOS, else an exclusive `mkdir` of the target and a rename onto that empty folder),
so a folder that appears at the target while writing is never replaced without
`force`, and of two runs racing for one target exactly one wins. Signals are deferred
(`signals.signals_deferred`) while the temp folder is created, installed and removed, and
`installing` runs the removal again when an interrupt lands as it starts, so an interrupt
cannot leave it behind; `signals.handle_signals` makes SIGTERM and SIGHUP interrupt the work
like Ctrl-C does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import CheckpointError, ConfigError
from ..signals import signals_deferred
from .names import IN_PROGRESS_FILE, TEMPORARY_INFIX


# ---- the temporary folder -------------------------------------------------------------------

def temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMPORARY_INFIX}"


def make_temp_folder(target: Path, param: str = "target") -> Path:
    """A new empty folder beside `target` marked with our pid; call with signals deferred.
    Raises a ConfigError naming `param` and the folder when it is not writable."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target)))
    except OSError as e:
        raise ConfigError(f"{param}: cannot write into {target.parent} ({e.strerror})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
        (tmp / IN_PROGRESS_FILE).write_text(f"{os.getpid()}\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{param}: cannot write into {target.parent} ({e.strerror})") from None
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


def make_parents(folder: Path, param: str = "target") -> list[Path]:
    """Create `folder` and missing parents; return those created (outermost first). A ConfigError
    names `param` and the folder that cannot be made."""
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
            raise ConfigError(f"{param}: cannot create {path} ({e.strerror})") from None
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


def check_replaceable(target: Path, param: str = "target") -> None:
    """`force` replaces an output folder, never a file or a device (`mlx_path="/dev/null"` run as
    root would otherwise delete the device node); the ConfigError names `param`."""
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise ConfigError(f"{param}: {target} exists and is not a folder; `force=True` only replaces a folder")


@contextmanager
def installing(target: Path, force: bool, param: str = "target") -> Iterator[Path]:
    """A temporary folder beside `target` to write the output into; installed at `target` when the
    block completes, removed (with any parent folders made for it) when it fails or is interrupted,
    whatever moment the signal lands. Errors name `param` (the caller's name for `target`)."""
    created_parents, tmp = [], None
    try:
        with signals_deferred():
            created_parents = make_parents(target.parent, param)
            remove_stale_temp_folders(target)
            tmp = make_temp_folder(target, param)
        yield tmp
        with signals_deferred(finishing=True):
            install(tmp, target, force, param)
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


def install(tmp: Path, target: Path, force: bool, param: str = "target") -> None:
    """Rename the finished `tmp` to `target`. Without `force` an existing target is never
    touched; with it the old one is moved aside and deleted only once the new one is in place."""
    try:
        _install(tmp, target, force, param)
    except OSError as e:
        raise CheckpointError(f"{e.filename or target}: cannot install the output ({e.strerror or e})") from None


def _install(tmp: Path, target: Path, force: bool, param: str) -> None:
    os.unlink(tmp / IN_PROGRESS_FILE)
    exists = target.exists() or target.is_symlink()
    if not exists or not force:
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            raise ConfigError(
                f"{param}: {target} appeared while writing (another run?); it was left as it is "
                "and nothing was written (pass `force=True` to replace it)"
            ) from None
        return
    check_replaceable(target, param)
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
