"""The one validation layer of what robustclip reads: the keys, types, ranges and choices
of a training config (robustclip.config), an attack suite (robustclip.evaluation.suites)
and the command-line options that feed them (seeds).

Every check raises a one-line :class:`~robustclip.errors.RobustclipError` that names the
key, says what was given and what is accepted.  No torch here: the CLI checks options
with this module before torch loads.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Mapping

from robustclip.errors import RobustclipError

SEED_MAX = 2**63 - 1
"""The largest seed: seeds must fit torch's 64-bit generators (a run also seeds one with
seed + 1), so 0 <= seed <= 2**63 - 1."""


def unknown(what: str, key: str, valid: Iterable[str], where: str = "") -> RobustclipError:
    """The error for an unknown ``what`` (key, section, value) ``key``: the closest valid
    one as a hint, then every valid one."""
    valid = list(valid)
    close = difflib.get_close_matches(str(key).rsplit(".", 1)[-1], valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return RobustclipError(f"unknown {what} {key!r}{where}; {hint}valid: {', '.join(valid)}")


def known_keys(table: Mapping[str, Any], valid: Iterable[str], what: str, where: str = "") -> None:
    """Raise :func:`unknown` for the first key of ``table`` that is not in ``valid``."""
    valid = list(valid)
    for key in table:
        if key not in valid:
            raise unknown(what, key, valid, where)


def typed(key: str, value: Any, kind: type, where: str = "") -> Any:
    """``value`` checked to be of ``kind`` (bool, int, float, str, list, dict): an int is
    accepted as a float (and returned as one), a bool is never a number, a number must be
    finite."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise RobustclipError(f"{key} must be {_names.get(kind, kind.__name__)}, got {value!r}{where}")
    if kind in (int, float) and not math.isfinite(value):
        raise RobustclipError(f"{key} must be finite, got {value!r}{where}")
    return value


_names = {bool: "bool (true or false)", float: "float (a number)", list: "a list", dict: "a table"}


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def in_range(key: str, value: int | float, low: float | None = None, high: float | None = None,
             where: str = "", why: str = "") -> int | float:
    """``value`` checked to be within [low, high] (None: unbounded); ``why``: the reason
    for the limit, added to the message."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"in {_num(low)}..{_num(high)}" if low is not None and high is not None
                  else f">= {_num(low)}" if low is not None else f"<= {_num(high)}")
        reason = f" ({why})" if why else ""
        raise RobustclipError(f"{key} must be {bounds}{reason}, got {value!r}{where}")
    return value


def text(key: str, value: Any, where: str = "") -> str:
    """A string without control characters (a NUL byte, a newline, ...): a name or label
    that goes into file names, tables and one-line messages."""
    value = typed(key, value, str, where)
    bad = [c for c in value if ord(c) < 32 or ord(c) == 127]
    if bad or not value.strip():
        what = f"control character {bad[0]!r}" if bad else "nothing but blanks"
        raise RobustclipError(f"{key} must be a printable name, got {value!r} ({what}){where}")
    return value


def numbers(key: str, value: Any, where: str = "") -> list[float]:
    """A non-empty list of finite numbers, as floats."""
    if not isinstance(value, list) or not value:
        raise RobustclipError(f"{key} must be a non-empty list of numbers, got {value!r}{where}")
    return [typed(f"{key}[{i}]", v, float, where) for i, v in enumerate(value)]


def seed(value: Any, key: str = "seed", where: str = "") -> int:
    """A seed: an integer in 0..:data:`SEED_MAX`."""
    return in_range(key, typed(key, value, int, where), 0, SEED_MAX, where,
                    "seeds must fit torch's 64-bit generators")
