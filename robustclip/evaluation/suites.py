"""Attack suites: TOML files naming attacks, their parameters and eps lists per norm."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from robustclip.errors import RobustclipError
from robustclip.evaluation.attacks import NORMS, AttackSpec, make_spec
from robustclip.files import read_toml


@dataclass(frozen=True)
class Suite:
    """A named list of attack specs (every attack at every eps of its norm)."""

    name: str
    specs: tuple[AttackSpec, ...]


_SUITE_KEYS = ("name", "description", "eps", "attack")


def load_suite(path: str | Path, eps: Sequence[float] | None = None,
               only: Sequence[str] | None = None) -> Suite:
    """Read a TOML suite.  ``eps`` overrides every attack's eps list; ``only`` keeps the
    attacks with these names or labels.  Bad files, keys or values raise RobustclipError.

    Format::

        name = "mnist"                 # optional; default: the file stem
        description = "..."            # optional
        [eps]                          # eps lists per norm, pixel units
        Linf = [0.1, 0.2, 0.3, 0.4]
        L2 = [1.0, 2.0]
        [[attack]]                     # one table per attack
        name = "pgd"                   # a key of ATTACKS
        steps = 50                     # any of that attack's parameters
        label = "pgd-50"               # optional, unique label
        eps = [0.3]                    # optional, overrides [eps] for this attack
    """
    path = Path(path)
    doc = read_toml(path, "suite")
    for key in doc:
        if key not in _SUITE_KEYS:
            raise RobustclipError(f"suite {path}: unknown key {key!r}; valid keys: {', '.join(_SUITE_KEYS)}")
    eps_table = doc.get("eps", {})
    if not isinstance(eps_table, dict) or set(eps_table) - set(NORMS):
        raise RobustclipError(f"suite {path}: [eps] takes the keys {', '.join(NORMS)} (lists of numbers)")
    entries = doc.get("attack", [])
    if not isinstance(entries, list) or not entries:
        raise RobustclipError(f"suite {path} has no [[attack]] tables")
    labels = _labels(entries, path)
    specs: list[AttackSpec] = []
    for entry, label in zip(entries, labels):
        if only is not None and entry.get("name") not in only and label not in only:
            continue
        params = {k: v for k, v in entry.items() if k not in ("name", "label", "eps")}
        probe = make_spec(entry["name"], 0.0, label, **params)
        eps_list = eps if eps is not None else entry.get("eps", eps_table.get(probe.norm))
        if not isinstance(eps_list, (list, tuple)) or not eps_list:
            raise RobustclipError(f"suite {path}: no eps list for attack {label!r} "
                                  f"(add {probe.norm} = [...] under [eps])")
        specs += [make_spec(entry["name"], e, label, **params) for e in eps_list]
    if only is not None:
        missing = [n for n in only if n not in {s.name for s in specs} | {s.label for s in specs}]
        if missing:
            raise RobustclipError(f"attack {missing[0]!r} is not in suite {path}; it has: "
                                  f"{', '.join(dict.fromkeys(labels))}")
    return Suite(str(doc.get("name", path.stem)), tuple(specs))


def _labels(entries: list, path: Path) -> list[str]:
    """Each entry's label: its 'label', else its name, else name(k=v, ...) for duplicates."""
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry:
            raise RobustclipError(f"suite {path}: every [[attack]] needs a name")
    names = [e["name"] for e in entries]
    labels = []
    for entry in entries:
        if "label" in entry:
            labels.append(str(entry["label"]))
            continue
        twins = [e for e in entries if e["name"] == entry["name"] and "label" not in e]
        if len(twins) == 1:
            labels.append(entry["name"])
            continue
        keys = sorted({k for e in twins for k in e if k not in ("name", "eps")
                       and any(e.get(k) != t.get(k) for t in twins)})
        labels.append(f"{entry['name']}({', '.join(f'{k}={entry.get(k)}' for k in keys)})")
    if len(set(labels)) != len(labels):
        raise RobustclipError(f"suite {path}: attacks {names} need distinct labels")
    return labels
