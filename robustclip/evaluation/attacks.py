"""The attack registry: each attack is ONE :class:`AttackDef` entry of :data:`ATTACKS`,
carrying its norm, default parameters, allowed choices, flags and how to build it.

An :class:`AttackSpec` is one attack at one eps with every parameter filled in and
checked (:func:`make_spec`).  Attacks are torchattacks classes; eps is in pixel units
(inputs in [0, 1], the normalisation inside the model).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torchattacks
from torchattacks.attack import Attack
from torch import Tensor

from robustclip.certificates import predicted_correct
from robustclip.errors import RobustclipError
from robustclip.schema import in_range

log = logging.getLogger(__name__)

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


Builder = Callable[[nn.Module, "AttackSpec", int, int], Attack]


@dataclass(frozen=True)
class AttackDef:
    """What an attack is.

    norm: its norm, or None when its 'norm' parameter sets it; defaults: every parameter
    with its default (the type of the default is the parameter's type, torchattacks'
    names); choices: the allowed values of string parameters; build(model, spec, seed,
    n_classes): the torchattacks object (``seed`` feeds attacks that keep their own RNG);
    eps_bound: False when eps only filters the results (CW); iterative: compared against
    FGSM by the checks; own_restarts: restarts run by robustclip's loop (worst case per
    sample); white_box: uses gradients (Square does not); classes: the fewest classes the
    attack's loss needs.
    """

    norm: str | None
    defaults: Mapping[str, Any]
    build: Builder
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    eps_bound: bool = True
    iterative: bool = True
    own_restarts: bool = False
    white_box: bool = True
    classes: int = 2


class SearchCW(torchattacks.CW):
    """Carlini & Wagner's L2 attack with their binary search over c, per sample.

    torchattacks' CW runs one c for the whole batch and maps pixels to tanh space with
    atanh(2x - 1), which is infinite at a pixel of exactly 0 or 1: such a pixel never
    moves (most of MNIST).  Here, as in Carlini & Wagner's own code, the box is shrunk by
    1e-6 before atanh, and each sample keeps its own c: c grows 10x while the attack
    fails, then bisects between the largest failing and smallest succeeding c.  The
    result per sample is the smallest successful perturbation over all searches (x itself
    where none succeeded).  ``search_steps=1`` is the fixed-c attack.  An edge pixel starts
    at w = +-7.25 and Adam moves w by about ``lr`` per step: it takes a few hundred steps
    to move, so keep ``steps`` near C&W's own (1000 and more).
    """

    def __init__(self, model: nn.Module, c: float, kappa: float, steps: int, lr: float,
                 search_steps: int) -> None:
        super().__init__(model, c=1.0, kappa=kappa, steps=steps, lr=lr)
        self.c_init, self.search_steps = c, search_steps
        self.consts: Tensor | None = None

    def inverse_tanh_space(self, x: Tensor) -> Tensor:
        return torch.atanh((x * 2 - 1).clamp(-1, 1) * (1 - 1e-6))

    def f(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return super().f(outputs, labels) * self.consts

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        images, labels = images.clone().detach().to(self.device), labels.clone().detach().to(self.device)
        n = len(images)
        consts = torch.full((n,), self.c_init, device=self.device)
        lower, upper = torch.zeros_like(consts), torch.full_like(consts, math.inf)
        best, best_l2 = images.clone(), torch.full_like(consts, math.inf)
        for _ in range(self.search_steps):
            self.consts = consts
            adv = super().forward(images, labels)
            with torch.no_grad():
                fooled = ~predicted_correct(self.get_logits(adv), labels)
                l2 = (adv - images).flatten(1).norm(dim=1)
            better = fooled & (l2 < best_l2)
            best = torch.where(better.view(-1, *[1] * (images.dim() - 1)), adv, best)
            best_l2 = torch.where(better, l2, best_l2)
            upper = torch.where(fooled, torch.minimum(upper, consts), upper)
            lower = torch.where(fooled, lower, torch.maximum(lower, consts))
            consts = torch.where(upper.isfinite(), (lower + upper) / 2, consts * 10)
        return best


def _fgsm(model: nn.Module, spec: AttackSpec, seed: int, n_classes: int) -> Attack:
    return torchattacks.FGSM(model, eps=spec.eps)


def _pgd(model: nn.Module, spec: AttackSpec, seed: int, n_classes: int) -> Attack:
    p = spec.kwargs
    cls = torchattacks.PGD if spec.norm == "Linf" else torchattacks.PGDL2
    return cls(model, eps=spec.eps, alpha=p["rel_stepsize"] * spec.eps, steps=p["steps"],
               random_start=p["random_start"])


def _cw(model: nn.Module, spec: AttackSpec, seed: int, n_classes: int) -> Attack:
    p = spec.kwargs
    return SearchCW(PositiveLogits(model), c=p["c"], kappa=p["kappa"], steps=p["steps"],
                    lr=p["lr"], search_steps=p["search_steps"])


def _apgd(model: nn.Module, spec: AttackSpec, seed: int, n_classes: int) -> Attack:
    p = spec.kwargs
    return torchattacks.APGD(model, norm=spec.norm, eps=spec.eps, steps=p["steps"],
                             n_restarts=p["n_restarts"], seed=seed, loss=p["loss"], rho=p["rho"])


def _apgdt(model: nn.Module, spec: AttackSpec, seed: int, n_classes: int) -> Attack:
    p = spec.kwargs
    attack = torchattacks.APGDT(model, norm=spec.norm, eps=spec.eps, steps=p["steps"],
                                n_restarts=p["n_restarts"], seed=seed, rho=p["rho"],
                                n_classes=n_classes)
    attack.n_target_classes = min(p["n_target_classes"], n_classes - 1)
    return attack


def _fab(model: nn.Module, spec: AttackSpec, seed: int, n_classes: int) -> Attack:
    p = spec.kwargs
    attack = torchattacks.FAB(model, norm=spec.norm, eps=spec.eps, steps=p["steps"],
                              n_restarts=p["n_restarts"], seed=seed, n_classes=n_classes,
                              multi_targeted=p["multi_targeted"])
    attack.n_target_classes = min(p["n_target_classes"], n_classes - 1)
    return attack


def _square(model: nn.Module, spec: AttackSpec, seed: int, n_classes: int) -> Attack:
    p = spec.kwargs
    return torchattacks.Square(model, norm=spec.norm, eps=spec.eps, n_queries=p["n_queries"],
                               n_restarts=p["n_restarts"], p_init=p["p_init"], loss=p["loss"],
                               seed=seed)


_PGD_DEFAULTS = {"steps": 50, "rel_stepsize": 0.1, "random_start": True, "n_restarts": 1}

ATTACKS: dict[str, AttackDef] = {
    "fgsm": AttackDef("Linf", {}, _fgsm, iterative=False),
    "pgd": AttackDef("Linf", _PGD_DEFAULTS, _pgd, own_restarts=True),
    "pgdl2": AttackDef("L2", _PGD_DEFAULTS, _pgd, own_restarts=True),
    "cw": AttackDef("L2", {"c": 0.01, "kappa": 0.0, "steps": 1000, "lr": 0.01,
                           "search_steps": 5}, _cw, eps_bound=False),
    "apgd": AttackDef(None, {"norm": "Linf", "steps": 100, "n_restarts": 1, "loss": "ce",
                             "rho": 0.75}, _apgd, choices={"loss": ("ce", "dlr")}),
    "apgdt": AttackDef(None, {"norm": "Linf", "steps": 100, "n_restarts": 1, "rho": 0.75,
                              "n_target_classes": 9}, _apgdt, classes=4),
    "fab": AttackDef(None, {"norm": "Linf", "steps": 100, "n_restarts": 1,
                            "multi_targeted": True, "n_target_classes": 9}, _fab),
    "square": AttackDef(None, {"norm": "Linf", "n_queries": 5000, "n_restarts": 1,
                               "p_init": 0.8, "loss": "margin"}, _square,
                        choices={"loss": ("ce", "margin")}, white_box=False),
}
RENAMED = {"restarts": "n_restarts", "queries": "n_queries"}
"""Old parameter names, still accepted (with a deprecation note), and torchattacks' names."""


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

    @property
    def eps_bound(self) -> bool:
        return self.definition.eps_bound

    def build(self, model: nn.Module, seed: int, n_classes: int) -> Attack:
        """The torchattacks object for ``model`` (``n_classes`` outputs); ``seed`` feeds
        attacks with their own RNG."""
        return self.definition.build(model, self, seed, n_classes)


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


COUNT_LIMITS: dict[str, tuple[int, str]] = {
    "steps": (100_000, "iterations per attack run"),
    "n_restarts": (1_000, "restarts per sample"),
    "n_queries": (10_000_000, "model queries per sample"),
    "search_steps": (100, "binary-search steps over c"),
    "n_target_classes": (1_000, "target classes"),
}
"""Upper limits of the attacks' integer parameters, with what they count."""


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
        high, why = COUNT_LIMITS[key]
        return in_range(where, value, 1, high, why=why)
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
    for old, new in RENAMED.items():
        if old in params and new in definition.defaults:
            log.warning("attack %r: %r is now %r (torchattacks' name); the old name is "
                        "deprecated", name, old, new)
            params[new] = params.pop(old)
    unknown = sorted(set(params) - set(definition.defaults))
    if unknown:
        valid = ", ".join(definition.defaults) or "none"
        raise RobustclipError(f"unknown key {unknown[0]!r} for attack {name!r}; valid keys: {valid}")
    full = {k: _check_param(name, k, params.get(k, d), d) for k, d in definition.defaults.items()}
    norm = definition.norm or full["norm"]
    if name == "cw" and full["search_steps"] == 1:
        label = f"{label or name} (fixed c)" if "fixed c" not in (label or "") else label
    return AttackSpec(name, norm, check_eps(eps, norm), tuple(sorted(full.items())),
                      label or name)
