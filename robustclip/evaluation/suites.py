"""Attack suites: TOML files naming attacks, their parameters and eps lists per norm, and
the same from the command line (:func:`specs_for`)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from robustclip.errors import RobustclipError
from robustclip.evaluation.attacks import ATTACKS, NORMS, AttackSpec, make_spec
from robustclip.evaluation.cascade import VERSIONS, Cascade, cascade_of, make_cascade
from robustclip.evaluation.craft import Spec
from robustclip.files import read_toml
from robustclip.schema import known_keys, numbers, text, typed, unknown


@dataclass(frozen=True)
class Suite:
    """A named list of attack specs and cascades (every attack at every eps of its norm)."""

    name: str
    specs: tuple[Spec, ...]


_SUITE_KEYS = ("name", "description", "eps", "attack", "cascade")
_SUITE_TYPES = {"name": str, "description": str, "eps": dict, "attack": list, "cascade": bool}


def specs_for(names: Sequence[str], eps: Sequence[float], norm: str | None = None,
              **overrides: Any) -> list[Spec]:
    """Every named attack or cascade version (``standard``, ``quick``) at every eps.

    norm: the norm of attacks and cascades whose norm is free (default Linf); an attack of
    another fixed norm raises.  overrides: parameters (e.g. steps) given to every attack
    that has them; one that no named attack has raises.
    """
    used: set[str] = set()
    specs: list[Spec] = []
    for name in names:
        if name in VERSIONS:
            keys = {k for a, _, _ in VERSIONS[name] for k in ATTACKS[a].defaults}
            extra = {k: v for k, v in overrides.items() if k in keys}
            specs += [make_cascade(name, e, norm or "Linf", **extra) for e in eps]
        elif name in ATTACKS:
            definition = ATTACKS[name]
            if norm and definition.norm not in (None, norm):
                raise RobustclipError(f"attack {name!r} is {definition.norm}-only; "
                                      f"for {norm} use {_other_norm(name)}")
            extra = {k: v for k, v in overrides.items() if k in definition.defaults}
            if definition.norm is None and norm:
                extra["norm"] = norm
            specs += [make_spec(name, e, **extra) for e in eps]
        else:
            raise RobustclipError(f"unknown attack {name!r}; valid attacks: "
                                  f"{', '.join([*VERSIONS, *ATTACKS])}")
        used |= set(extra)
    unused = sorted(set(overrides) - used)
    if unused:
        raise RobustclipError(f"no attack among {', '.join(names)} takes {unused[0]!r}")
    return specs


def _other_norm(name: str) -> str:
    free = [a for a, d in ATTACKS.items() if d.norm is None]
    twin = {"pgd": "pgdl2", "pgdl2": "pgd"}.get(name)
    return " or ".join(([twin] if twin else []) + free)


def load_suite(path: str | Path, eps: Sequence[float] | None = None,
               only: Sequence[str] | None = None, norm: str | None = None) -> Suite:
    """Read a TOML suite.  ``eps`` overrides every attack's eps list; ``only`` keeps the
    attacks with these names or labels; ``norm`` keeps the attacks of that norm.  Bad
    files, keys or values raise RobustclipError.

    Format::

        name = "mnist"                 # optional; default: the file stem
        description = "..."            # optional
        cascade = false                # optional; true: at each (norm, eps) the attacks
                                       # run in turn on the points still robust
        [eps]                          # eps lists per norm, pixel units
        Linf = [0.1, 0.2, 0.3, 0.4]
        L2 = [1.0, 2.0]
        [[attack]]                     # one table per attack
        name = "pgd"                   # a key of ATTACKS, or a cascade version
                                       # ("standard", "quick": one per norm of [eps])
        steps = 50                     # any of that attack's parameters
        label = "pgd-50"               # optional, unique label
        eps = [0.3]                    # optional, overrides [eps] for this attack
    """
    path = Path(path)
    doc = _checked(read_toml(path, "suite"), path)
    eps_table, entries = doc.get("eps", {}), doc["attack"]
    labels = _labels(entries, path)
    suite_name = doc.get("name", path.stem)
    specs: list[Spec] = []
    for entry, label in zip(entries, labels):
        if only is not None and entry.get("name") not in only and label not in only:
            continue
        params = {k: v for k, v in entry.items() if k not in ("name", "label", "eps")}
        if entry["name"] in VERSIONS:
            norms = [params.pop("norm")] if "norm" in params else [n for n in NORMS if n in eps_table]
            for n in norms if norm is None else [n for n in norms if n == norm]:
                eps_list = _eps_list(eps, entry, eps_table, n, label, path)
                specs += [make_cascade(entry["name"], e, n, label, **params) for e in eps_list]
            continue
        probe = make_spec(entry["name"], 0.0, label, **params)
        if norm is not None and probe.norm != norm:
            continue
        eps_list = _eps_list(eps, entry, eps_table, probe.norm, label, path)
        specs += [make_spec(entry["name"], e, label, **params) for e in eps_list]
    if doc.get("cascade", False):
        specs = _as_cascades(specs, suite_name)
    if only is not None:
        known = {e["name"] for e in entries} | set(labels)  # before the norm filter
        missing = [n for n in only if n not in known]
        if missing:
            raise RobustclipError(f"attack {missing[0]!r} is not in suite {path}; it has: "
                                  f"{', '.join(dict.fromkeys(labels))}")
    return Suite(suite_name, tuple(specs))


def _checked(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """A suite document with its keys, their types and every [[attack]] table's name,
    label, eps and norm checked (robustclip.schema); the attacks' own parameters are
    checked by make_spec and make_cascade.  Raises RobustclipError naming the key and what it takes."""
    where = f" in suite {path}"
    known_keys(doc, _SUITE_KEYS, "key", where)
    for key, value in doc.items():
        typed(key, value, _SUITE_TYPES[key], where)
    if "name" in doc:
        text("name", doc["name"], where)
    for norm, values in doc.get("eps", {}).items():
        if norm not in NORMS:
            raise unknown("norm", norm, NORMS, f" under [eps]{where}")
        numbers(f"eps.{norm}", values, where)
    if not doc.get("attack"):
        raise RobustclipError(f"suite {path} has no [[attack]] tables")
    for i, entry in enumerate(doc["attack"]):
        _check_entry(entry, f" in [[attack]] {i + 1} of suite {path}")
    return doc


def _check_entry(entry: Any, where: str) -> None:
    """One [[attack]] table: a name of an attack or cascade, an optional printable label,
    eps list and norm."""
    typed("[[attack]]", entry, dict, where)
    if "name" not in entry:
        raise RobustclipError(f"every [[attack]] needs a name{where}")
    name = text("name", entry["name"], where)
    if name not in VERSIONS and name not in ATTACKS:
        raise unknown("attack", name, [*VERSIONS, *ATTACKS], where)
    if "label" in entry:
        text("label", entry["label"], where)
    if "eps" in entry:
        numbers("eps", entry["eps"], where)
    if "norm" in entry and entry["norm"] not in NORMS:
        raise unknown("norm", entry["norm"], NORMS, where)


def _eps_list(eps: Sequence[float] | None, entry: dict, eps_table: dict, norm: str, label: str,
              path: Path) -> Sequence[float]:
    eps_list = eps if eps is not None else entry.get("eps", eps_table.get(norm))
    if not isinstance(eps_list, (list, tuple)) or not eps_list:
        raise RobustclipError(f"suite {path}: no eps list for attack {label!r} "
                              f"(add {norm} = [...] under [eps])")
    return eps_list


def _as_cascades(specs: list[Spec], name: str) -> list[Spec]:
    """One cascade per (norm, eps) of ``specs``, in their order, labelled ``name``."""
    groups: dict[tuple[str, float], list[AttackSpec]] = {}
    for s in specs:
        if isinstance(s, Cascade):
            raise RobustclipError(f"suite {name}: a cascade suite cannot hold the cascade {s.label!r}")
        groups.setdefault((s.norm, s.eps), []).append(replace(s, label=f"{name}:{s.label}"))
    return [cascade_of(members, name) for members in groups.values()]


def _labels(entries: list, path: Path) -> list[str]:
    """Each entry's label: its 'label', else its name, else name(k=v, ...) for duplicates."""
    names = [e["name"] for e in entries]
    labels = []
    for entry in entries:
        if "label" in entry:
            labels.append(entry["label"])
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
