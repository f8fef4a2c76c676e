"""The attack registry: each attack is ONE :class:`AttackDef` entry of :data:`ATTACKS`,
carrying its norm, default parameters, allowed choices, flags and how to build it.

An :class:`AttackSpec` is one attack at one eps with every parameter filled in and
checked (:func:`make_spec`).  Attacks are torchattacks classes; eps is in pixel units
(inputs in [0, 1], the normalisation inside the model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn
import torchattacks
from torchattacks.attack import Attack
from torch import Tensor

from robustclip.errors import RobustclipError

NORMS = ("Linf", "L2")
CW_EPS_NOTE = "filter: CW is unbounded; an example counts only if its L2 perturbation <= eps"


class PositiveLogits(nn.Module):
    """model(x) - min(model(x)) + 1 per sample: same margins, softmax and argmax, all >= 1.

    torchattacks 3.5's CW reads the label logit as max(one_hot * z) and the runner-up as
    max((1 - one_hot) * z): both are 0 instead of the true value when logits are negative
    (always so for the log-probabilities of a softmax ensemble), and CW then does nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # torchattacks restores .train() after an attack

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        return z - z.min(dim=1, keepdim=True).values + 1


Builder = Callable[[nn.Module, "AttackSpec", int], Attack]


@dataclass(frozen=True)
class AttackDef:
    """What an attack is.

    norm: its norm, or None when its 'norm' parameter sets it; defaults: every parameter
    with its default (the type of the default is the parameter's type); choices: the
    allowed values of string parameters; build(model, spec, seed): the torchattacks
    object (``seed`` feeds attacks that keep their own RNG); eps_bound: False when eps
    only filters the results (CW); iterative: compared against FGSM by the checks;
    own_restarts: restarts run by robustclip's loop (worst case per sample).
    """

    norm: str | None
    defaults: Mapping[str, Any]
    build: Builder
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    eps_bound: bool = True
    iterative: bool = True
    own_restarts: bool = False


def _fgsm(model: nn.Module, spec: AttackSpec, seed: int) -> Attack:
    return torchattacks.FGSM(model, eps=spec.eps)


def _pgd(model: nn.Module, spec: AttackSpec, seed: int) -> Attack:
    p = spec.kwargs
    cls = torchattacks.PGD if spec.norm == "Linf" else torchattacks.PGDL2
    return cls(model, eps=spec.eps, alpha=p["rel_stepsize"] * spec.eps, steps=p["steps"],
               random_start=p["random_start"])


def _cw(model: nn.Module, spec: AttackSpec, seed: int) -> Attack:
    p = spec.kwargs
    return torchattacks.CW(PositiveLogits(model), c=p["c"], kappa=p["kappa"], steps=p["steps"],
                           lr=p["lr"])


def _apgd(model: nn.Module, spec: AttackSpec, seed: int) -> Attack:
    p = spec.kwargs
    return torchattacks.APGD(model, norm=spec.norm, eps=spec.eps, steps=p["steps"],
                             n_restarts=p["restarts"], seed=seed, loss=p["loss"], rho=p["rho"])


def _square(model: nn.Module, spec: AttackSpec, seed: int) -> Attack:
    p = spec.kwargs
    return torchattacks.Square(model, norm=spec.norm, eps=spec.eps, n_queries=p["queries"],
                               n_restarts=p["restarts"], p_init=p["p_init"], loss=p["loss"],
                               seed=seed)


_PGD_DEFAULTS = {"steps": 50, "rel_stepsize": 0.1, "random_start": True, "restarts": 1}

ATTACKS: dict[str, AttackDef] = {
    "fgsm": AttackDef("Linf", {}, _fgsm, iterative=False),
    "pgd": AttackDef("Linf", _PGD_DEFAULTS, _pgd, own_restarts=True),
    "pgdl2": AttackDef("L2", _PGD_DEFAULTS, _pgd, own_restarts=True),
    "cw": AttackDef("L2", {"c": 0.1, "kappa": 0.1, "steps": 1000, "lr": 0.01}, _cw,
                    eps_bound=False),
    "apgd": AttackDef(None, {"norm": "Linf", "steps": 50, "restarts": 1, "loss": "ce",
                             "rho": 0.75}, _apgd, choices={"loss": ("ce", "dlr")}),
    "square": AttackDef(None, {"norm": "Linf", "queries": 5000, "restarts": 1, "p_init": 0.8,
                               "loss": "margin"}, _square, choices={"loss": ("ce", "margin")}),
}


@dataclass(frozen=True)
class AttackSpec:
    """One attack at one eps.  ``params``: sorted (key, value) pairs, defaults included."""

    name: str
    norm: str
    eps: float
    params: tuple[tuple[str, Any], ...]
    label: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def definition(self) -> AttackDef:
        return ATTACKS[self.name]

    def build(self, model: nn.Module, seed: int) -> Attack:
        """The torchattacks object for ``model``; ``seed`` feeds attacks with their own RNG."""
        return self.definition.build(model, self, seed)


def check_eps(eps: Any, norm: str) -> float:
    """A valid eps for ``norm`` as float: finite, >= 0, and <= 1 for Linf (pixels in [0, 1])."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise RobustclipError(f"eps must be a finite number, got {eps!r}")
    if eps < 0:
        raise RobustclipError(f"eps must be >= 0, got {eps:g}")
    if norm == "Linf" and eps > 1:
        raise RobustclipError(f"Linf eps {eps:g} > 1 is meaningless for inputs in [0, 1] "
                              "(eps is in pixel units)")
    return float(eps)


def _check_param(name: str, key: str, value: Any, default: Any) -> Any:
    where = f"attack {name!r}, {key!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RobustclipError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, str):
        choices = NORMS if key == "norm" else ATTACKS[name].choices[key]
        if value not in choices:
            raise RobustclipError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RobustclipError(f"{where} must be an integer >= 1, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RobustclipError(f"{where} must be a number, got {value!r}")
    if value < 0 or (value == 0 and key != "kappa"):
        raise RobustclipError(f"{where} must be {'>= 0' if key == 'kappa' else '> 0'}, got {value!r}")
    return float(value)


def make_spec(name: str, eps: float, label: str | None = None, **params: Any) -> AttackSpec:
    """Validate and complete one attack at one eps.  Unknown names/keys raise, naming valid ones."""
    if name not in ATTACKS:
        raise RobustclipError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    definition = ATTACKS[name]
    unknown = sorted(set(params) - set(definition.defaults))
    if unknown:
        valid = ", ".join(definition.defaults) or "none"
        raise RobustclipError(f"unknown key {unknown[0]!r} for attack {name!r}; valid keys: {valid}")
    full = {k: _check_param(name, k, params.get(k, d), d) for k, d in definition.defaults.items()}
    norm = definition.norm or full["norm"]
    return AttackSpec(name, norm, check_eps(eps, norm), tuple(sorted(full.items())),
                      label or name)


def specs_for(names: Sequence[str], eps: Sequence[float]) -> list[AttackSpec]:
    """Every named attack (default parameters) at every eps."""
    return [make_spec(n, e) for n in names for e in eps]
