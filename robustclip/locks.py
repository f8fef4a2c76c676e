"""One writer per directory: a lock file beside a run or results directory.

``robustclip train`` takes the lock of its run directory and ``attack`` / ``transfer``
that of their ``--out`` directory, for the whole command.  The lock of ``DIR`` is the
file ``.DIR.lock`` beside it (beside, not inside: a results directory is replaced whole
by ``--overwrite``, and ``--overwrite`` of a run removes the run's files), created with
``O_CREAT | O_EXCL`` and holding ``pid host`` of its holder.  A second writer is refused
with one line naming the holder; a lock whose holder is dead (a pid that no longer runs
on this host: the holder was killed) is taken over with a warning.  Under torchrun only
rank 0 takes the lock (the callers run :func:`locked` through ``distributed.on_main``).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from robustclip.errors import RobustclipError

log = logging.getLogger(__name__)


class LockedError(RobustclipError):
    """The directory is locked by another live process."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` in its parent."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


def _holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in the lock file ``path``; None when unreadable or malformed."""
    try:
        pid, host = path.read_text().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _create(path: Path, stamp: str) -> bool:
    """Create ``path`` holding ``stamp``; False if it exists.  A failed write removes it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, stamp.encode())
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.close(fd)
    return True


def acquire(folder: str | Path, what: str = "directory") -> Path:
    """Take the lock of ``folder`` (its parent must exist); returns the lock file.

    Raises :class:`LockedError` naming the holder when a live process (or one on another
    host, which cannot be checked) holds it.  ``what`` names the folder in messages.
    """
    path = lock_path(folder)
    me = (os.getpid(), socket.gethostname())
    for _ in range(3):
        if _create(path, f"{me[0]} {me[1]}\n"):
            return path
        holder = _holder(path)
        if holder is None:
            if not path.exists():
                continue  # released meanwhile
            raise LockedError(f"{what} {folder} is locked by {path}, which names no holder; "
                              f"remove it if no robustclip command writes {folder}")
        pid, host = holder
        if host != me[1] or _alive(pid) and pid != me[0]:
            raise LockedError(f"{what} {folder} is in use by robustclip pid {pid} on {host} "
                              f"(lock {path}); wait for it, or remove the lock if that process is gone")
        if pid == me[0]:
            raise LockedError(f"{what} {folder} is already locked by this process (lock {path})")
        log.warning("taking over the stale lock %s of pid %d on %s (no longer running)", path, pid, host)
        if _holder(path) == holder:  # still the dead holder's (narrows a race with another taker)
            path.unlink(missing_ok=True)
    raise LockedError(f"cannot take the lock {path} of {what} {folder}: it keeps changing hands")


def release(path: Path) -> None:
    """Remove the lock file ``path`` if this process holds it."""
    if _holder(path) == (os.getpid(), socket.gethostname()):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            log.warning("cannot remove the lock %s: %s", path, err.strerror)


@contextmanager
def locked(folder: str | Path, what: str = "directory") -> Iterator[Path]:
    """Hold the lock of ``folder`` for the block (see :func:`acquire`); yields the lock file."""
    path = acquire(folder, what)
    try:
        yield path
    finally:
        release(path)
