"""Files: the one atomic writer, the one TOML reader, the one device parser.

Every file robustclip writes goes through :func:`atomic_write`: a temporary file beside
the destination, flushed and fsynced, then renamed into place (and the directory
fsynced), so a reader sees the old file or the new one, never half of one; the temporary
file is removed on any error, and an OSError of the write (ENOSPC, EFBIG, EROFS, EACCES,
...) is raised naming the destination (:func:`describe` makes it one line).
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from robustclip.errors import RobustclipError

if TYPE_CHECKING:
    import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TEMP_PREFIX = ".rc-tmp."
"""Temporary files of :func:`atomic_write` start with this (``.rc-tmp.<name>.<random>``)."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError that ``err`` is or that caused it (a library may wrap one: ``torch.save``
    into a file object raises RuntimeError from the file's OSError), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` with a temporary path beside ``path``, fsync it, rename it to
    ``path``; returns ``path``.  ``write`` may open ``tmp`` itself or hand it to a library
    (``DataFrame.to_csv``, ``Figure.savefig``, ``torch.save`` into a file object).

    Any failure removes the temporary file and leaves ``path`` as it was; a failure caused
    by an OSError is raised as that OSError (same errno) with ``filename`` = ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give what open() would
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = _os_error(err) if isinstance(err, Exception) else None
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err
    return path


def describe(err: OSError) -> str:
    """One line for an OSError: ``PATH: cause (ENAME)``, e.g. ``run/last.pt: No space left
    on device (ENOSPC)``."""
    name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    cause = err.strerror or str(err) or type(err).__name__
    cause = " ".join(str(cause).split()) + (f" ({name})" if name else "")
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


def temporaries(folder: str | Path) -> list[Path]:
    """The temporary files of :func:`atomic_write` in ``folder`` (left by a killed write)."""
    folder = Path(folder)
    return sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that a killed write left in ``folder``; returns them.
    Call it only while holding the folder's lock (robustclip.locks): another writer's
    temporary file is in use."""
    removed = [p for p in temporaries(folder) if p.is_file() or p.is_symlink()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The TOML document at ``path``; a missing or invalid file raises RobustclipError
    naming it as ``what`` (e.g. "config", "suite")."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RobustclipError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise RobustclipError(f"cannot read {what} {path}: {' '.join(str(err).split())}") from None


def parse_toml_value(text: str) -> Any:
    """A TOML value (1e-3, true, "x", [1, 2]); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_device(name: str | None = None) -> torch.device:
    """``auto``/None: CUDA when available, else CPU; otherwise the named device, checked."""
    import torch  # here, not above: the CLI parses options with this module before torch loads

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RobustclipError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RobustclipError(f"device {name!r} requested but CUDA is not available")
    return device


def parse_fraction(text: str | float) -> float:
    """A number given as text, or as a fraction like '8/255'; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    value = str(text).strip()
    try:
        if "/" in value:
            num, den = value.split("/")
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{text!r} is not a number or a fraction like 8/255") from None
