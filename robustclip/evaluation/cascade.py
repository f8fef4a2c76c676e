"""Cascades: attacks run in turn, each only on the points that every earlier one failed on
(AutoAttack's scheme, Croce & Hein 2020), with a per-sample record of which stage broke
each point.

The standard version is AutoAttack's: APGD-CE (100 steps), APGD-T (targeted DLR, 9
target classes, 100 steps), FAB-T (9 targets, 100 steps) and Square (5000 queries), each
with one restart.  ``quick`` keeps APGD-CE and APGD-T, for a first look.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from robustclip.errors import RobustclipError
from robustclip.evaluation.attacks import ATTACKS, AttackSpec, make_spec

VERSIONS: dict[str, tuple[tuple[str, str, dict[str, Any]], ...]] = {
    "standard": (("apgd", "apgd-ce", {"loss": "ce"}), ("apgdt", "apgd-t", {}),
                 ("fab", "fab-t", {"multi_targeted": True}), ("square", "square", {})),
    "quick": (("apgd", "apgd-ce", {"loss": "ce"}), ("apgdt", "apgd-t", {})),
}
"""Named cascades: (attack, short label, parameters beyond the registry's defaults)."""


@dataclass(frozen=True)
class Cascade:
    """Attacks at one norm and eps, each run on the points still robust.

    label: the cascade's name in tables ('standard', 'quick' or a suite's name);
    members: its attacks in order, each labelled '<label>:<attack>'.
    """

    label: str
    norm: str
    eps: float
    members: tuple[AttackSpec, ...]
    name: ClassVar[str] = "cascade"
    eps_bound: ClassVar[bool] = True

    @property
    def params(self) -> tuple[tuple[str, Any], ...]:
        return (("attacks", tuple(m.label for m in self.members)), ("version", self.label))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


def cascade_of(members: list[AttackSpec], label: str) -> Cascade:
    """A cascade of specs already made (one norm, one eps, all bounded by eps)."""
    if not members:
        raise RobustclipError(f"cascade {label!r} has no attacks")
    norms, eps = {m.norm for m in members}, {m.eps for m in members}
    if len(norms) > 1 or len(eps) > 1:
        raise RobustclipError(f"cascade {label!r} mixes norms or eps: {sorted(norms)} {sorted(eps)}")
    unbounded = [m.label for m in members if not m.eps_bound]
    if unbounded:
        raise RobustclipError(f"cascade {label!r}: {unbounded[0]} is not bounded by eps "
                              "(only eps-bounded attacks can form a cascade)")
    return Cascade(label, members[0].norm, members[0].eps, tuple(members))


def make_cascade(version: str, eps: float, norm: str = "Linf", label: str | None = None,
                 **overrides: Any) -> Cascade:
    """The named cascade (:data:`VERSIONS`) at ``eps`` in ``norm``, labelled ``label``
    (default: the version).

    overrides: parameters given to every member that has them (e.g. steps=20 for a
    cheaper run; the table then shows them in each member's params).
    """
    if version not in VERSIONS:
        raise RobustclipError(f"unknown cascade {version!r}; valid: {', '.join(VERSIONS)}")
    known = {k for name, _, _ in VERSIONS[version] for k in ATTACKS[name].defaults}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise RobustclipError(f"cascade {version!r} takes no parameter {unknown[0]!r}; "
                              f"valid: {', '.join(sorted(known - {'norm'}))}")
    members = []
    for name, short, params in VERSIONS[version]:
        extra = {k: v for k, v in overrides.items() if k in ATTACKS[name].defaults}
        members.append(make_spec(name, eps, f"{label or version}:{short}", norm=norm,
                                 **(params | extra)))
    return cascade_of(members, label or version)
