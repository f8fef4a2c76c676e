"""Attack evaluation: typed attack specs and TOML suites, ensembles, transfer, sanity checks.

Attacks come from torchattacks and run with the model in eval mode (spectral wrappers are
pass-throughs there), parameters frozen, on the model's device.  Inputs are images in
[0, 1] of shape (n, C, H, W) and int64 labels (n,); eps is in pixel units (the input
normalisation lives inside the model).  Every result is kept per sample:

* clean:     correct on x;
* robust:    correct on x AND on x_adv (a misclassified sample is never robust);
* certified: correct with logit margin > sqrt(2) * L * r (``bounds.certified``), r the L2
  radius of the attack's ball (eps * sqrt(d) for Linf).

A suite is combined per sample: robust only if the sample survives every attack of the
same norm and eps.  Randomness is seeded per batch and restart from ``seed``, the attack's
label and eps, and the batch index: a run is reproducible for a given batch size.

Under a process group (``torchrun ... robustclip attack``), :func:`evaluate` shards by
whole batches (batch i on rank i mod world size, robustclip.distributed) and all-gathers
the per-batch results and check counters: every rank ends with the table of a single
process, same samples, same per-batch seeds.

CW runs on :class:`PositiveLogits` (torchattacks' CW misreads negative logits) and its eps
filters its examples; PGD restarts are robustclip's own loop (worst case per sample).

Sanity checks run on every batch and come back as :class:`SanityWarning` in plain words
(in the spirit of AutoAttack's checks.py): inputs and x_adv in [0, 1], ||x_adv - x|| <=
eps + 1e-6 per sample in the attack's norm, no NaN, eval mode and deterministic outputs,
robust <= clean, certified <= robust, iterative attacks at least as strong as FGSM,
white-box at least as strong as transfer.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torch import Tensor
from tqdm import tqdm

from robustclip.bounds import (
    certified,
    exact_pair_ratios,
    linf_to_l2,
    lipschitz_report,
    screened_ratio,
)
from robustclip.distributed import Context, all_gather, check_world, current, my_batches, on_main
from robustclip.errors import RobustclipError
from robustclip.spectral import float64_twin, module_device

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

# ============================================================== attack specs and suites

NORMS = ("Linf", "L2")


@dataclass(frozen=True)
class AttackDef:
    """What an attack is: its norm (None: set by its 'norm' parameter), defaults, kind."""

    norm: str | None
    defaults: Mapping[str, Any]
    eps_bound: bool = True  # False: eps only filters the results (CW)
    iterative: bool = True
    own_restarts: bool = False  # restarts run by robustclip's loop (worst case per sample)


ATTACKS: dict[str, AttackDef] = {
    "fgsm": AttackDef("Linf", {}, iterative=False),
    "pgd": AttackDef("Linf", {"steps": 50, "rel_stepsize": 0.1, "random_start": True,
                              "restarts": 1}, own_restarts=True),
    "pgdl2": AttackDef("L2", {"steps": 50, "rel_stepsize": 0.1, "random_start": True,
                              "restarts": 1}, own_restarts=True),
    "cw": AttackDef("L2", {"c": 0.1, "kappa": 0.1, "steps": 1000, "lr": 0.01},
                    eps_bound=False),
    "apgd": AttackDef(None, {"norm": "Linf", "steps": 50, "restarts": 1, "loss": "ce",
                             "rho": 0.75}),
    "square": AttackDef(None, {"norm": "Linf", "queries": 5000, "restarts": 1,
                               "p_init": 0.8, "loss": "margin"}),
}
_CHOICES = {("apgd", "loss"): ("ce", "dlr"), ("square", "loss"): ("ce", "margin")}
CW_EPS_NOTE = "filter: CW is unbounded; an example counts only if its L2 perturbation <= eps"


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

    def build(self, model: nn.Module, seed: int) -> torchattacks.Attack:
        """The torchattacks object for ``model``; ``seed`` feeds attacks with their own RNG."""
        p, eps = self.kwargs, self.eps
        if self.name == "fgsm":
            return torchattacks.FGSM(model, eps=eps)
        if self.name in ("pgd", "pgdl2"):
            cls = torchattacks.PGD if self.name == "pgd" else torchattacks.PGDL2
            return cls(model, eps=eps, alpha=p["rel_stepsize"] * eps, steps=p["steps"],
                       random_start=p["random_start"])
        if self.name == "cw":
            return torchattacks.CW(PositiveLogits(model), c=p["c"], kappa=p["kappa"],
                                   steps=p["steps"], lr=p["lr"])
        if self.name == "apgd":
            return torchattacks.APGD(model, norm=self.norm, eps=eps, steps=p["steps"],
                                     n_restarts=p["restarts"], seed=seed, loss=p["loss"],
                                     rho=p["rho"])
        return torchattacks.Square(model, norm=self.norm, eps=eps, n_queries=p["queries"],
                                   n_restarts=p["restarts"], p_init=p["p_init"],
                                   loss=p["loss"], seed=seed)


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
        choices = NORMS if key == "norm" else _CHOICES[(name, key)]
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
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RobustclipError(f"suite {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise RobustclipError(f"suite {path} is not valid TOML: {err}") from None
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


# ============================================================== ensembles


def meta_name(meta: Mapping[str, Any], key: str) -> str:
    """``meta[key]`` as a name: checkpoints store {"name": ..., "args": ...} there."""
    value = meta.get(key, "")
    return str(value.get("name", "")) if isinstance(value, Mapping) else str(value or "")


def check_one_dataset(models: Sequence[nn.Module]) -> str | None:
    """The dataset shared by ``models`` (from ``robustclip_meta``); mixed datasets raise."""
    datasets = sorted({str(m.robustclip_meta["dataset"]) for m in models
                       if getattr(m, "robustclip_meta", {}).get("dataset")})
    if len(datasets) > 1:
        raise RobustclipError(f"models of different datasets cannot be combined: {', '.join(datasets)}")
    return datasets[0] if datasets else None


class Ensemble(nn.Module):
    """N models as one: output (n, classes) is log(mean softmax) or the mean of logits.

    With ``output='softmax'`` the cross-entropy of the output is -log of the members' mean
    probability of the label (the loss attacks maximise).  Members of different datasets
    raise RobustclipError.  ``robustclip_meta`` records the members and the choice.
    """

    OUTPUTS = ("softmax", "logits")

    def __init__(self, members: Sequence[nn.Module], output: str = "softmax") -> None:
        super().__init__()
        if output not in self.OUTPUTS:
            raise RobustclipError(f"ensemble output must be one of {', '.join(self.OUTPUTS)}, got {output!r}")
        if not members:
            raise RobustclipError("an ensemble needs at least one model")
        dataset = check_one_dataset(members)
        metas = [getattr(m, "robustclip_meta", {}) for m in members]
        self.members = nn.ModuleList(members)
        self.output = output
        self.training = any(m.training for m in members)  # a new Module says True: it would
        # make torchattacks call .train() on the members after each attack
        self.robustclip_meta = {
            "model": "ensemble", "dataset": dataset, "ensemble_output": output,
            "method": "+".join(meta_name(m, "method") or "?" for m in metas),
            "members": [meta_name(m, "model") or "?" for m in metas],
        }

    def forward(self, x: Tensor) -> Tensor:
        outs = torch.stack([m(x) for m in self.members])  # (N, n, classes)
        if self.output == "logits":
            return outs.mean(0)
        return torch.logsumexp(F.log_softmax(outs, dim=-1), dim=0) - math.log(len(self.members))


def model_bound(model: nn.Module, input_shape: Sequence[int], **kwargs: Any) -> float:
    """Lipschitz bound of the logits (``bounds.lipschitz_report``); for an ensemble of
    logits the mean of the members' bounds, for a softmax ensemble NaN (no certificate)."""
    if isinstance(model, Ensemble):
        if model.output != "logits":
            return math.nan
        return sum(model_bound(m, input_shape, **kwargs) for m in model.members) / len(model.members)
    return lipschitz_report(model, input_shape, **kwargs)[0]


# ============================================================== running one attack


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters (no weight .grad from CW's backward); restored after."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)


def batch_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from ``seed`` and ``parts`` (stable across processes and platforms)."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def run_key(spec: AttackSpec) -> str:
    """What seeds a spec's runs: its label, and its eps unless eps only filters (CW)."""
    return f"{spec.label}@{spec.eps!r}" if spec.definition.eps_bound else spec.label


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for one attack call without disturbing the caller's RNG state."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def craft(model: nn.Module, spec: AttackSpec, x: Tensor, y: Tensor, seed: int) -> Tensor:
    """Adversarial examples (n, C, H, W) for one batch on ``model`` (already in eval mode).

    PGD restarts are robustclip's own loop: restart r (seeded ``batch_seed(seed, r)``)
    attacks only the samples that every earlier restart failed on, and the first fooling
    example per sample is kept (the worst case).  CW's output is unfiltered here.
    At eps = 0 a bounded attack returns x itself (torchattacks' PGDL2 divides 0 by 0 there).
    """
    if spec.eps == 0 and spec.definition.eps_bound:
        return x.clone()
    restarts = spec.kwargs["restarts"] if spec.definition.own_restarts else 1
    todo = torch.arange(len(x), device=x.device)
    x_adv = x
    for r in range(restarts):
        s = batch_seed(seed, r)
        with _seeded(s, x.device):
            adv = spec.build(model, s)(x[todo], y[todo]).detach()
        x_adv = adv if r == 0 else x_adv.index_copy(0, todo, adv)
        if r + 1 < restarts:
            with torch.no_grad():
                todo = todo[model(adv).argmax(1) == y[todo]]
            if todo.numel() == 0:  # one host sync per restart, never per step
                break
    return x_adv


def distance(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """Per-sample ||x_adv - x|| in ``norm`` ('Linf' or 'L2'), shape (n,)."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)


def adversarial(model: nn.Module, specs: Sequence[AttackSpec], x: Tensor, y: Tensor,
                seed: int, batch: int) -> dict[AttackSpec, Tensor]:
    """x_adv per spec for one batch.  ``specs`` is one bounded spec, or every eps of one
    eps-free attack (CW): run once, then x_adv = the CW example where its L2 perturbation
    is <= eps, else x."""
    x_adv = craft(model, specs[0], x, y, batch_seed(seed, run_key(specs[0]), batch))
    if specs[0].definition.eps_bound:
        return {specs[0]: x_adv}
    dist = distance(x_adv, x, "L2").view(-1, *([1] * (x.dim() - 1)))
    return {s: torch.where(dist <= s.eps, x_adv, x) for s in specs}


def runs(specs: Sequence[AttackSpec]) -> list[list[AttackSpec]]:
    """Group specs into attack runs: one per bounded spec, one per eps-free attack label."""
    grouped: dict[tuple, list[AttackSpec]] = {}
    for s in specs:
        key = (s.label, s.name, s.params) + ((s.eps,) if s.definition.eps_bound else ())
        grouped.setdefault(key, []).append(s)
    return list(grouped.values())


def _row_params(spec: AttackSpec) -> dict[str, Any]:
    return spec.kwargs | ({} if spec.definition.eps_bound else {"eps": CW_EPS_NOTE})


# ============================================================== sanity checks


@dataclass(frozen=True)
class SanityWarning:
    """A failed sanity check, in plain words, with where it happened (None: everywhere)."""

    message: str
    model: str | None = None
    attack: str | None = None
    eps: float | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (self.model, self.attack, None if self.eps is None
                                     else f"eps={self.eps:g}") if p)
        return f"[{where}] {self.message}" if where else self.message


class Tally:
    """Per-sample check counters of one (model, spec), kept on the device (no host sync
    per batch); :meth:`warnings` reads them once."""

    def __init__(self, spec: AttackSpec) -> None:
        self.spec = spec
        self.counts: dict[str, Tensor | int] = {}
        self.worst: Tensor | float = 0.0

    def add(self, x: Tensor, x_adv: Tensor, logits_adv: Tensor, clean: Tensor,
            adv_correct: Tensor) -> None:
        """One batch: x, x_adv (n, C, H, W), logits of x_adv, clean and adv correctness (n,)."""
        dist = distance(x_adv, x, self.spec.norm)
        checks = {
            "range": ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1),
            "eps": dist > self.spec.eps + 1e-6,
            "nan": x_adv.isnan().flatten(1).any(1) | logits_adv.isnan().any(1),
            "revived": ~clean & adv_correct,
        }
        for key, flags in checks.items():
            self.counts[key] = self.counts.get(key, 0) + flags.sum()
        self.worst = torch.maximum(torch.as_tensor(self.worst, device=dist.device), dist.max())

    def warnings(self, model: str, certified_broken: int = 0) -> list[SanityWarning]:
        """The failed checks in plain words (reads the counters: one host sync)."""
        spec = self.spec
        c = {k: int(v) for k, v in self.counts.items()}
        out = []
        if c.get("range"):
            out.append(f"{c['range']} adversarial examples leave the pixel range [0, 1]")
        if c.get("eps"):
            out.append(f"{c['eps']} adversarial examples are farther than eps from their input "
                       f"(largest {spec.norm} distance {float(self.worst):.6g} > {spec.eps:g} + 1e-6)")
        if c.get("nan"):
            out.append(f"{c['nan']} samples have NaN in the adversarial example or its logits")
        if c.get("revived"):
            out.append(f"the attack made {c['revived']} misclassified samples correct; "
                       "they still count as not robust (robust <= clean)")
        if certified_broken:
            out.append(f"{certified_broken} samples are certified yet the attack broke them: "
                       "the Lipschitz bound, the certificate or the attack is wrong")
        return [SanityWarning(m, model, spec.label, spec.eps) for m in out]


def _mode_warning(model: nn.Module, name: str, where: str) -> SanityWarning | None:
    """Put the model back in eval mode, and say so, if something switched it to training."""
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if not training:
        return None
    model.eval()
    return SanityWarning(f"model was in training mode {where} ({', '.join(training[:3])}"
                         f"{', ...' if len(training) > 3 else ''}); put back in eval mode", name)


# ============================================================== evaluation


@dataclass
class AttackResult:
    """One (model, attack or suite, norm, eps) row with per-sample booleans (n,) on the CPU.

    name: the attack's key in ATTACKS, or 'suite' for a per-sample worst case; attack: its
    label.  seconds: wall time of the attack run (an eps-free CW run serves every eps).
    """

    model: str
    method: str
    name: str
    attack: str
    norm: str
    eps: float
    params: dict
    seed: int
    clean: Tensor
    robust: Tensor
    certified: Tensor | None
    seconds: float
    lipschitz_bound: float
    lipschitz_empirical: float
    ensemble_output: str = ""


@dataclass
class Evaluation:
    """All rows of one evaluation and its sanity warnings."""

    results: list[AttackResult]
    warnings: list[SanityWarning] = field(default_factory=list)


@dataclass
class CleanPass:
    """A model's clean pass: logits (n, classes), correctness (n,) on the model's device,
    and the largest empirical Lipschitz ratio over neighbouring test pairs (scalar)."""

    logits: Tensor
    correct: Tensor
    ratio: Tensor


def _batches(images: Tensor, labels: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    if batch_size < 1:
        raise RobustclipError(f"batch size must be >= 1, got {batch_size}")
    if len(images) == 0 or len(images) != len(labels):
        raise RobustclipError(f"need as many labels as images, and at least one; got "
                              f"{len(images)} images, {len(labels)} labels")
    return list(zip(images.split(batch_size), labels.split(batch_size)))


def clean_pass(model: nn.Module, name: str, batches: Sequence[tuple[Tensor, Tensor]],
               warnings: list[SanityWarning], twin: nn.Module | None = None) -> CleanPass:
    """Clean logits, input range and NaN checks, test pairs; determinism spot check (the
    first batch of each rank computed twice).

    twin: the model's :func:`~robustclip.spectral.float64_twin`, on which the ratios over
    neighbouring test pairs are measured; None skips them (ratio 0).

    Under a process group each rank runs its batches and every rank gets the merged pass.
    """
    device, ctx = module_device(model), current()
    logits: dict[int, Tensor] = {}
    spread = torch.zeros((), device=device)
    ratio = torch.zeros((), device=device, dtype=torch.float64)
    bad_range = nan = 0
    with torch.no_grad():
        for b in my_batches(len(batches), ctx):
            x = batches[b][0].to(device)
            bad_range = bad_range + ((x < 0) | (x > 1)).flatten(1).any(1).sum()
            out = model(x)
            if not logits:  # a stochastic model shows on any batch: spot-check the first
                spread = (out - model(x)).abs().max()
            nan = nan + out.isnan().any(1).sum()
            if twin is not None:
                ratio = torch.maximum(ratio, screened_ratio(twin, x, x.roll(1, 0), out, out.roll(1, 0)))
            logits[b] = out
    if ctx.distributed:
        parts = all_gather(({b: t.cpu() for b, t in logits.items()}, int(bad_range), int(nan),
                            float(spread), float(ratio)), ctx)
        logits = {b: t.to(device) for p in parts for b, t in p[0].items()}
        bad_range, nan = (sum(p[i] for p in parts) for i in (1, 2))
        spread = torch.tensor(max(p[3] for p in parts), device=device)
        ratio = torch.tensor(max(p[4] for p in parts), device=device, dtype=torch.float64)
    logits = torch.cat([logits[b] for b in range(len(batches))])
    labels = torch.cat([y for _, y in batches]).to(device)
    if int(bad_range):
        warnings.append(SanityWarning(f"{int(bad_range)} inputs lie outside [0, 1]: attacks "
                                      "assume pixels with the normalisation inside the model", name))
    if int(nan):
        warnings.append(SanityWarning(f"{int(nan)} samples have NaN logits on clean inputs", name))
    if float(spread) > 1e-5 * max(float(logits.abs().max()), 1.0):
        warnings.append(SanityWarning(f"model outputs are not deterministic: two clean passes of "
                                      f"one batch differ by up to {float(spread):.3g}", name))
    return CleanPass(logits, logits.argmax(1) == labels, ratio)


def l2_radius(norm: str, eps: float, shape: Sequence[int]) -> float:
    """L2 radius of an eps-ball of ``norm`` for inputs of ``shape`` (no batch dim)."""
    return eps if norm == "L2" else linf_to_l2(eps, math.prod(shape))


def evaluate(models: Mapping[str, nn.Module], images: Tensor, labels: Tensor,
             specs: Sequence[AttackSpec], *, suite: str | None = None, batch_size: int = 256,
             seed: int = 0, bounds: bool | Mapping[str, float] = True,
             progress: bool = False) -> Evaluation:
    """White-box evaluation of every model under every spec, per sample.

    models: label -> model (on its device; ``robustclip_meta`` gives method, ensemble).
    images: (n, C, H, W) in [0, 1]; labels: (n,) int64.
    suite: label of the per-sample worst case over the attacks of each (norm, eps); with
        None and several attacks at one (norm, eps) the label is 'all-attacks'.
    bounds: True computes each model's Lipschitz bound (:func:`model_bound`); a mapping
        gives them (label -> bound); False skips bounds and certificates.
    """
    batches, ctx = _batches(images, labels, batch_size), current()
    check_world(ctx, len(images), "evaluation samples")
    if ctx.world_size > len(batches):
        log.warning("%d ranks for %d batches: ranks %d and up stay idle; use a smaller batch size",
                    ctx.world_size, len(batches), len(batches))
    evaluation = Evaluation([])
    for name, model in models.items():
        with evaluating(model):
            _evaluate_model(name, model, batches, specs, seed, bounds, progress, evaluation)
    if ctx.distributed:  # mode warnings are per rank; the others are the same on every rank
        evaluation.warnings = [w for part in all_gather(evaluation.warnings, ctx) for w in part]
    _combine(evaluation, suite)
    _check_fgsm(evaluation)
    evaluation.warnings = list(dict.fromkeys(evaluation.warnings))
    return evaluation


def _bound_of(name: str, model: nn.Module, shape: Sequence[int],
              bounds: bool | Mapping[str, float], warnings: list[SanityWarning]) -> float:
    if isinstance(bounds, Mapping):
        return float(bounds.get(name, math.nan))
    if not bounds:
        return math.nan
    try:
        return model_bound(model, shape)
    except RobustclipError as err:
        warnings.append(SanityWarning(f"no Lipschitz bound, so no certificate: {err}", name))
        return math.nan


def _evaluate_model(name: str, model: nn.Module, batches: list[tuple[Tensor, Tensor]],
                    specs: Sequence[AttackSpec], seed: int, bounds: bool | Mapping[str, float],
                    progress: bool, evaluation: Evaluation) -> None:
    device, ctx = module_device(model), current()
    meta = getattr(model, "robustclip_meta", {})
    shape = tuple(batches[0][0].shape[1:])
    warnings = evaluation.warnings
    bound = on_main(ctx, lambda: _bound_of(name, model, shape, bounds, warnings))
    twin = float64_twin(model)  # pair ratios in float64: float32 rounding is not Lipschitz
    clean = clean_pass(model, name, batches, warnings, twin)
    labels = torch.cat([y for _, y in batches]).to(device)
    starts = [0, *itertools.accumulate(len(y) for _, y in batches)]
    ratio = clean.ratio
    rows: list[tuple[AttackSpec, Tensor, Tensor | None, float]] = []
    groups, mine = runs(specs), my_batches(len(batches), ctx)
    bar = tqdm(total=len(groups) * len(mine), desc=name, disable=not (progress and ctx.main), leave=False)
    for group in groups:
        start = time.perf_counter()
        tallies = {s: Tally(s) for s in group}
        correct: dict[AttackSpec, dict[int, Tensor]] = {s: {} for s in group}
        for b in mine:
            x, y = (t.to(device) for t in batches[b])
            ok, out_clean = (t[starts[b]:starts[b + 1]] for t in (clean.correct, clean.logits))
            advs = adversarial(model, group, x, y, seed, b)
            mode = _mode_warning(model, name, f"after {group[0].label}")
            if mode:
                warnings.append(mode)
            with torch.no_grad():
                for s, x_adv in advs.items():
                    out = model(x_adv)
                    adv_ok = out.argmax(1) == y
                    tallies[s].add(x, x_adv, out, ok, adv_ok)
                    ratio = torch.maximum(ratio, screened_ratio(twin, x_adv, x, out, out_clean))
                    correct[s][b] = adv_ok
            bar.update()
        if ctx.distributed:
            ratio = _share_run(ctx, device, group, correct, tallies, ratio)
        robust = {s: (clean.correct & torch.cat([c[b] for b in range(len(batches))])).cpu()
                  for s, c in correct.items()}
        seconds = time.perf_counter() - start  # .cpu() above waited for the device
        for s in group:
            cert = _certified(clean, labels, bound, s, shape)
            broken = 0 if cert is None else int((cert & ~robust[s]).sum())
            warnings.extend(tallies[s].warnings(name, broken))
            rows.append((s, robust[s], cert, seconds))
    bar.close()
    empirical = float(ratio)
    for s, robust_s, cert, seconds in rows:
        result = AttackResult(name, meta_name(meta, "method"), s.name, s.label, s.norm, s.eps,
                              _row_params(s), seed, clean.correct.cpu(), robust_s, cert,
                              seconds, bound, empirical, str(meta.get("ensemble_output", "")))
        evaluation.results.append(result)
        log.info("%s %s %s eps=%g: clean %.4f robust %.4f", name, s.label, s.norm, s.eps,
                 float(result.clean.double().mean()), float(result.robust.double().mean()))


def _share_run(ctx: Context, device: torch.device, group: list[AttackSpec],
               correct: dict[AttackSpec, dict[int, Tensor]], tallies: dict[AttackSpec, Tally],
               ratio: Tensor) -> Tensor:
    """Merge one attack run over the ranks, in place: per-batch correctness, check counters
    (summed) and largest distance; returns the largest pair ratio of all ranks."""
    mine = ([{b: t.cpu() for b, t in correct[s].items()} for s in group],
            [({k: int(v) for k, v in tallies[s].counts.items()}, float(tallies[s].worst)) for s in group],
            float(ratio))
    parts = all_gather(mine, ctx)
    for i, s in enumerate(group):
        correct[s] = {b: t.to(device) for p in parts for b, t in p[0][i].items()}
        keys = dict.fromkeys(k for p in parts for k in p[1][i][0])
        tallies[s].counts = {k: sum(p[1][i][0].get(k, 0) for p in parts) for k in keys}
        tallies[s].worst = max(p[1][i][1] for p in parts)
    return torch.tensor(max(p[2] for p in parts), device=device, dtype=torch.float64)


def _certified(clean: CleanPass, labels: Tensor, bound: float, spec: AttackSpec,
               shape: Sequence[int]) -> Tensor | None:
    if math.isnan(bound):
        return None
    return certified(clean.logits, labels, bound, l2_radius(spec.norm, spec.eps, shape)).cpu()


def _combine(evaluation: Evaluation, suite: str | None) -> None:
    """Add a per-sample worst-case row per (model, norm, eps) holding several attacks."""
    groups: dict[tuple, list[AttackResult]] = {}
    for r in evaluation.results:
        groups.setdefault((r.model, r.norm, r.eps), []).append(r)
    for (model, norm, eps), members in groups.items():
        if len(members) < 2:
            continue
        first = members[0]
        evaluation.results.append(AttackResult(
            model, first.method, "suite", suite or "all-attacks", norm, eps,
            {"attacks": [m.attack for m in members]}, first.seed, first.clean,
            torch.stack([m.robust for m in members]).all(0), first.certified,
            sum(m.seconds for m in members), first.lipschitz_bound, first.lipschitz_empirical,
            first.ensemble_output))


def _check_fgsm(evaluation: Evaluation) -> None:
    """Warn where an iterative attack leaves more samples robust than FGSM at the same eps."""
    fgsm: dict[tuple, AttackResult] = {}
    for r in evaluation.results:
        if r.name == "fgsm":
            fgsm.setdefault((r.model, r.eps), r)
    for r in evaluation.results:
        ref = fgsm.get((r.model, r.eps))
        if ref is None or r.norm != "Linf" or r.name not in ATTACKS or not ATTACKS[r.name].iterative:
            continue
        acc, ref_acc = float(r.robust.double().mean()), float(ref.robust.double().mean())
        if acc > ref_acc:
            evaluation.warnings.append(SanityWarning(
                f"iterative attack is weaker than one FGSM step: robust accuracy {acc:.4f} > "
                f"FGSM's {ref_acc:.4f} (too few steps, too small a step, or masked gradients)",
                r.model, r.attack, r.eps))


# ============================================================== transfer


@dataclass
class Transfer:
    """Transfer results in long form: one row per (attack, eps, source, target).

    ``table`` columns: attack, norm, eps, source, target, kind ('white-box', 'transfer', or
    'surrogate': crafted on the ensemble of all models but the target), n, accuracy
    (correct on x AND on x_adv, as in robust accuracy), clean_acc (of the target), seconds
    (crafting on the source plus evaluating the targets), seed, params.
    """

    table: pd.DataFrame
    warnings: list[SanityWarning]

    def matrix(self, attack: str, eps: float) -> pd.DataFrame:
        """Entry [i][j]: accuracy of model j on examples crafted on model i (diagonal: white-box)."""
        t = self.table
        t = t[(t.attack == attack) & (t.eps == eps) & (t.kind != "surrogate")]
        return t.pivot(index="source", columns="target", values="accuracy")


SURROGATE_PREFIX = "all-but-"


def transfer(models: Mapping[str, nn.Module], images: Tensor, labels: Tensor,
             specs: Sequence[AttackSpec], *, batch_size: int = 256, seed: int = 0,
             ensemble_output: str = "softmax", surrogates: bool = True,
             progress: bool = False) -> Transfer:
    """N x N transfer matrix per spec, plus surrogate-ensemble -> target rows (N >= 2).

    Source i crafts with the same seeds as :func:`evaluate`, so the diagonal equals the
    white-box robust accuracy.  The surrogate of target j is the :class:`Ensemble`
    (``ensemble_output``) of all other models; ``surrogates=False`` skips those rows
    (they cost about N - 1 times the matrix).  Models of different datasets raise.
    """
    names = list(models)
    check_one_dataset(list(models.values()))
    batches = _batches(images, labels, batch_size)
    warnings: list[SanityWarning] = []
    sources: dict[str, tuple[nn.Module, list[str]]] = {n: (models[n], names) for n in names}
    if surrogates and len(names) >= 2:
        for t in names:
            others = [models[n] for n in names if n != t]
            sources[SURROGATE_PREFIX + t] = (Ensemble(others, ensemble_output), [t])
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        for m in [*models.values(), *(src for src, _ in sources.values())]:
            stack.enter_context(evaluating(m))
        cleans = {n: clean_pass(models[n], n, batches, warnings) for n in names}
        groups = runs(specs)
        bar = tqdm(total=len(groups) * len(sources) * len(batches), desc="transfer",
                   disable=not progress, leave=False)
        for group in groups:
            for src, (src_model, targets) in sources.items():
                rows += _transfer_rows(src, src_model, targets, models, cleans, group,
                                       batches, seed, warnings, bar)
        bar.close()
    table = pd.DataFrame(rows)
    _check_white_box(table, warnings)
    return Transfer(table, list(dict.fromkeys(warnings)))


def _transfer_rows(src: str, src_model: nn.Module, targets: list[str],
                   models: Mapping[str, nn.Module], cleans: Mapping[str, CleanPass],
                   group: list[AttackSpec], batches: list[tuple[Tensor, Tensor]], seed: int,
                   warnings: list[SanityWarning], bar: tqdm) -> list[dict]:
    device = module_device(src_model)
    correct: dict[tuple, list[Tensor]] = {(s, t): [] for s in group for t in targets}
    tallies = {s: Tally(s) for s in group}
    start = time.perf_counter()
    offset = 0
    for b, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        advs = adversarial(src_model, group, x, y, seed, b)
        for name in [src, *targets]:
            model = src_model if name == src else models[name]
            mode = _mode_warning(model, name, f"after {group[0].label} on {src}")
            if mode:
                warnings.append(mode)
        with torch.no_grad():
            src_ok = src_model(x).argmax(1) == y
            for s, x_adv in advs.items():
                out = src_model(x_adv)
                tallies[s].add(x, x_adv, out, src_ok, out.argmax(1) == y)
                for t in targets:
                    t_device = module_device(models[t])
                    ok = cleans[t].correct[offset:offset + len(x)]
                    adv_ok = models[t](x_adv.to(t_device)).argmax(1) == y.to(t_device)
                    correct[(s, t)].append(ok & adv_ok)
        offset += len(x)
        bar.update()
    accuracy = {k: float(torch.cat(v).double().mean()) for k, v in correct.items()}
    seconds = time.perf_counter() - start
    rows = []
    for s in group:
        warnings.extend(tallies[s].warnings(src))
        for t in targets:
            kind = "white-box" if t == src else "transfer" if src in models else "surrogate"
            rows.append({"attack": s.label, "norm": s.norm, "eps": s.eps, "source": src,
                         "target": t, "kind": kind, "n": len(cleans[t].correct),
                         "accuracy": accuracy[(s, t)],
                         "clean_acc": float(cleans[t].correct.double().mean()),
                         "seconds": seconds, "seed": seed, "params": _row_params(s)})
    return rows


def _check_white_box(table: pd.DataFrame, warnings: list[SanityWarning]) -> None:
    """Warn where examples crafted elsewhere fool a target more than its own white-box attack."""
    if table.empty:
        return
    for (attack, eps, target), rows in table.groupby(["attack", "eps", "target"]):
        white = rows[rows.kind == "white-box"].accuracy
        if white.empty:
            continue
        for _, r in rows[rows.kind != "white-box"].iterrows():
            if r.accuracy < white.iloc[0]:
                warnings.append(SanityWarning(
                    f"examples crafted on {r.source} leave accuracy {r.accuracy:.4f}, below "
                    f"the white-box {white.iloc[0]:.4f}: the white-box attack is weaker than a "
                    "transferred one (masked gradients, or too weak an attack)",
                    target, attack, eps))


# ============================================================== command-line helpers


def _torch_device(device: str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise RobustclipError(f"bad device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RobustclipError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_runs(runs: Sequence[str], device: str | None = None) -> dict[str, nn.Module]:
    """label -> model (eval mode) for each run dir or checkpoint, via ``robustclip.load``.

    Labels are the run names (file stems), or the paths where names collide.  A missing
    or unreadable checkpoint raises RobustclipError naming it.
    """
    import robustclip

    dev = _torch_device(device)
    names = [Path(r).stem if Path(r).is_file() else Path(r).name for r in runs]
    labels = names if len(set(names)) == len(names) else [str(r) for r in runs]
    if len(set(labels)) != len(labels):
        raise RobustclipError("the same run is given twice")
    models = {}
    for label, run in zip(labels, runs):
        if not Path(run).exists():
            raise RobustclipError(f"run {run} does not exist")
        try:
            models[label] = robustclip.load(run, device=dev).eval()
        except RobustclipError:
            raise
        except Exception as err:  # a checkpoint's unpickling can fail in many ways
            raise RobustclipError(f"cannot load {run}: {' '.join(str(err).split())}") from None
        if not getattr(models[label], "robustclip_meta", {}).get("dataset"):
            raise RobustclipError(f"checkpoint {run} does not record its dataset")
    return models


def test_set(dataset: str, limit: int | None = None,
             data_dir: str | None = None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` test images (n, C, H, W) in [0, 1] and labels (n,) of ``dataset``.

    A ``limit`` below 1 or above the size of the test split raises RobustclipError.
    """
    from robustclip.data import load

    ds = load(dataset, "test", data_dir)
    images, labels = ds.tensors
    if limit is not None and not 1 <= limit <= len(images):
        raise RobustclipError(f"--limit {limit} is outside 1..{len(images)}, the size of the "
                              f"{dataset} test split")
    return images[:limit], labels[:limit]


def lipschitz_summary(models: Mapping[str, nn.Module], images: Tensor, labels: Tensor, *,
                      batch_size: int = 256, seed: int = 0, l2_eps: float = 1.0,
                      **bound_kwargs: Any) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Per model: Lipschitz bound against the empirical ratio over neighbouring test pairs
    and (x, x_adv) pairs of a 10-step PGD-L2 at ``l2_eps``.

    Returns (summary with model, bound, empirical, bound_over_empirical, seconds;
    label -> per-layer DataFrame from ``lipschitz_report``).
    """
    spec = make_spec("pgdl2", l2_eps, steps=10)
    batches = _batches(images, labels, batch_size)
    rows, layers = [], {}
    for name, model in models.items():
        start = time.perf_counter()
        bound, layers[name] = lipschitz_report(model, tuple(images.shape[1:]), **bound_kwargs)
        with evaluating(model):
            twin = float64_twin(model)
            ratio = clean_pass(model, name, batches, [], twin).ratio
            device = module_device(model)
            for b, (x, y) in enumerate(batches):
                x, y = x.to(device), y.to(device)
                x_adv = adversarial(model, [spec], x, y, seed, b)[spec]
                ratio = torch.maximum(ratio, exact_pair_ratios(twin, x_adv, x).max())  # all pairs
        rows.append({"model": name, "bound": bound, "empirical": float(ratio),
                     "bound_over_empirical": bound / float(ratio) if float(ratio) > 0 else math.nan,
                     "seconds": time.perf_counter() - start})
    return pd.DataFrame(rows), layers
