"""Training configuration: TOML files with sections [model], [data], [method], [train]
(with its table [train.adversarial]) and [log].

Every key has a default (the schema below); an unknown or misspelt key is an error that
names it, suggests the closest valid key and lists the valid ones.  ``--set
section.key=value`` (``train.adversarial.eps=0.3`` for a key of a sub-table) overrides
are parsed as TOML values (bare words are strings) and typed by the schema.
:func:`to_toml` writes the resolved config that a run directory keeps as ``config.toml``.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from robustclip.clip import SpectralClip
from robustclip.errors import RobustclipError
from robustclip.files import parse_toml_value, read_toml
from robustclip.schema import SEED_MAX, in_range, typed, unknown

_CLIP_DEFAULTS = {n: p.default for n, p in inspect.signature(SpectralClip).parameters.items()}


@dataclass
class ModelConfig:
    """name: a model of robustclip.models.MODELS; args: its keyword arguments (e.g. width)."""

    name: str = "simpleconv"
    args: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """dataset: a name of robustclip.data.DATASETS.  synthetic: learnable blobs of the
    dataset's shape instead of the real images (limit_train / limit_test samples, default
    1024 / 256).  augment: random crop (pad 4) and horizontal flip of training batches."""

    dataset: str = "mnist"
    synthetic: bool = False
    augment: bool = False


@dataclass
class MethodConfig:
    """name: none, fastclip, fastclip-composite, miyato or gouk; the rest are SpectralClip's
    parameters (miyato uses clip and iters_per_step).  init_delay is the tutorial's 500.
    rescale_every_step: true rescales every clipped layer after every optimiser step
    (weight *= min(1, clip / sigma)) besides the clip events; false leaves it to
    SpectralClip's default (only conv+BN composites; gouk always)."""

    name: str = "none"
    clip: float = 1.0
    k: int = 1
    clip_steps: int = 50
    init_delay: int = 500
    iters_per_step: int = 1
    init_iters: int = 100
    two_sided: bool = False
    tol: float = _CLIP_DEFAULTS["tol"]
    max_rounds: int = _CLIP_DEFAULTS["max_rounds"]
    descent_steps: int = _CLIP_DEFAULTS["descent_steps"]
    refine_iters: int = _CLIP_DEFAULTS["refine_iters"]
    rescale_every_step: bool = False


ATTACKS = ("none", "fgsm-rs", "n-fgsm", "pgd")
ADVERSARIAL_LOSSES = ("adversarial", "trades")
BN_MODES = ("train", "eval")
MONITOR_ATTACKS = ("apgd-ce", "pgd")
LOSSES = ("cross-entropy", "lipschitz-margin")
MARGIN_BOUNDS = ("auto", "sound")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cyclic")


@dataclass
class AdversarialConfig:
    """Adversarial training (robustclip.adversarial), off with attack "none".

    attack: "fgsm-rs" (Wong et al. 2020: uniform random start in the eps ball, one signed
    gradient step of step_size, projection), "n-fgsm" (de Jorge et al. 2022: uniform
    random start in the 2 eps ball, one signed step of step_size, projection onto [0, 1]
    only) or "pgd" (Madry et al. 2018: uniform random start, ``steps`` signed steps of
    step_size, each projected).  eps: Linf radius in pixel units (inputs in [0, 1]).
    step_size: at the full eps, in pixel units; 0 means 1.25 eps for fgsm-rs, eps for
    n-fgsm, 2.5 eps / steps for pgd.  warmup_epochs: eps (and step_size)
    ramp linearly from 0 to their values over the first warmup_epochs epochs, step by
    step (0: full from the first step).  loss: "adversarial" (cross-entropy on the
    adversarial examples only) or "trades" (Zhang et al. 2019: CE(clean) + beta *
    KL(p(x) || p(x_adv)), the examples maximising the KL).  bn_mode: BatchNorm while
    crafting: "train" (batch statistics, running ones left alone; Wong et al.'s and
    Madry's code) or "eval" (running statistics; TRADES' code).  monitor_samples: the
    last N test samples (clear of the first ones that evaluations take) on which the
    accuracy under monitor_attack ("apgd-ce", the default: torchattacks' APGD with the
    cross-entropy, AutoAttack's first stage; or "pgd") of monitor_steps steps at eps is
    measured each epoch (``apgd_acc`` or ``pgd_acc``, with FGSM-RS's ``fgsm_acc`` beside
    it; 0: off); a drop of more than overfit_drop below the most robust earlier epoch, or
    FGSM-RS accuracy more than overfit_gap above the monitor attack's, is flagged as
    catastrophic overfitting.  early_stop: the first epoch flagged at the full eps after
    an unflagged one at the full eps ends the run unsaved, last.pt keeping the epoch
    before (Wong et al. 2020's early stopping).  clip_start: whether the random start is
    clipped to [0, 1] (and the ball) before the first gradient; false takes that gradient
    at the raw start, whose pixels may leave [0, 1], as Wong et al.'s MNIST code does
    (their CIFAR code clips it).  On MNIST, where most pixels are 0, clipping puts half
    the background's start at exactly 0.  The monitor's FGSM-RS always starts clipped."""

    attack: str = "none"
    eps: float = 0.0
    step_size: float = 0.0
    steps: int = 10
    warmup_epochs: int = 0
    loss: str = "adversarial"
    beta: float = 6.0
    bn_mode: str = "train"
    monitor_samples: int = 256
    monitor_attack: str = "apgd-ce"
    monitor_steps: int = 10
    overfit_drop: float = 0.2
    overfit_gap: float = 0.3
    early_stop: bool = False
    clip_start: bool = True


@dataclass
class TrainConfig:
    """optimizer: "sgd" (with momentum) or "adam" (torch's defaults but lr and
    weight_decay).  schedule: "step" (StepLR: lr *= gamma every step_size epochs) or
    "cyclic" (Wong et al. 2020: lr rises linearly from 0 to lr over the first 2/5 of the
    training steps and falls linearly back to 0 at the last, set every step; it spans
    train.epochs, so a resume that changes train.epochs is refused).  limit_train /
    limit_test: use the first N samples (0: all).  device: auto, cpu, cuda or cuda:N.
    loss: "cross-entropy" or "lipschitz-margin" (Tsuzuku et al. 2018: sqrt(2) L eps_cert
    added to every logit but the true one before the cross-entropy, L the network's
    training bound, see robustclip.margin; eps_cert: L2 radius in pixel units;
    margin_bound: "auto" (L constant, the clip targets, when every layer is clipped, else
    the tracked estimates) or "sound" (L the guaranteed bound the certificate uses,
    differentiable); margin_temperature: the margin logits' factor before the
    cross-entropy).
    adversarial: the [train.adversarial] table."""

    epochs: int = 60
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    schedule: str = "step"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    step_size: int = 40
    gamma: float = 0.1
    seed: int = 1
    limit_train: int = 0
    limit_test: int = 0
    device: str = "auto"
    loss: str = "cross-entropy"
    eps_cert: float = 0.0
    margin_bound: str = "auto"
    margin_temperature: float = 1.0
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass
class LogConfig:
    """log_every: training steps between singular-value points in TensorBoard."""

    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    """A whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def method_args(self) -> dict[str, Any]:
        """The [method] section without its name: keywords for robustclip.models.build_model."""
        args = dataclasses.asdict(self.method)
        args.pop("name")
        args["rescale_every_step"] = True if args["rescale_every_step"] else None  # None: the default
        return {**args, "log_every": self.log.log_every}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
#: Keys whose change does not make a different run (a resume may change them).
RESUMABLE_CHANGES = ("train.epochs", "train.device", "log.progress", "train.adversarial.early_stop")


#: Upper limits of numeric keys, with what they count: beyond them a run cannot start or
#: would spend hours on bookkeeping (every number is >= 0 besides).
LIMITS: dict[str, tuple[int, str]] = {
    "method.k": (64, "singular values tracked per layer"),
    "method.clip_steps": (1_000_000, "training steps between clip events"),
    "method.init_delay": (100_000_000, "training steps before the first clip event"),
    "method.iters_per_step": (100, "PowerQR iterations per training step"),
    "method.init_iters": (10_000, "PowerQR iterations at the start"),
    "method.max_rounds": (100, "descent rounds per clip event"),
    "method.descent_steps": (10_000, "descent steps per round"),
    "method.refine_iters": (10_000, "PowerQR iterations per clip event"),
    "train.epochs": (100_000, "epochs"),
    "train.seed": (SEED_MAX, "seeds must fit torch's 64-bit generators"),
    "train.adversarial.steps": (1_000, "attack steps per training batch"),
    "train.adversarial.monitor_steps": (1_000, "attack steps of the monitor"),
    "log.log_every": (100_000_000, "training steps between logged points"),
}


def _typed(key: str, value: Any, kind: type, where: str = "") -> Any:
    """``value`` checked against the schema type ``kind`` (an int is accepted as a float),
    a number >= 0 and within its :data:`LIMITS`."""
    value = typed(key, value, kind, where)
    if kind in (int, float):
        high, why = LIMITS.get(key, (None, ""))
        in_range(key, value, 0, high, where, why)
    return value


def _table(cls: type, values: Any, prefix: str, where: str) -> Any:
    """The dataclass ``cls`` from a TOML table: keys checked, values typed, sub-tables
    (fields whose type is a dataclass) recursively."""
    if not isinstance(values, Mapping):
        raise RobustclipError(f"[{prefix}]{where} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    typed = {}
    for key, value in values.items():
        if key not in hints:
            raise unknown("key", f"{prefix}.{key}", hints, where)
        if dataclasses.is_dataclass(hints[key]):
            typed[key] = _table(hints[key], value, f"{prefix}.{key}", where)
        else:
            typed[key] = _typed(f"{prefix}.{key}", value, hints[key], where)
    return cls(**typed)


def from_dict(raw: Mapping[str, Any], where: str = "") -> Config:
    """Validate a nested dict (as read from TOML) into a :class:`Config`; defaults fill gaps."""
    sections = {section: _table(cls, raw.get(section, {}), section, where)
                for section, cls in SECTIONS.items()}
    for section in raw:
        if section not in SECTIONS:
            raise unknown("section", section, SECTIONS, where)
    config = Config(**sections)
    _check(config, where)
    return config


def _check(config: Config, where: str) -> None:
    from robustclip.data import DATASETS
    from robustclip.models import METHODS, MODELS

    for key, value, valid in [("model.name", config.model.name, MODELS),
                              ("method.name", config.method.name, METHODS),
                              ("data.dataset", config.data.dataset, DATASETS)]:
        if value not in valid:
            raise unknown("value", value, valid, f" for {key}{where}")
    for key in ("epochs", "batch_size", "eval_batch_size", "step_size"):
        if getattr(config.train, key) < 1:
            raise RobustclipError(f"train.{key} must be >= 1{where}")
    _check_losses(config.train, where)


def _check_losses(tc: TrainConfig, where: str) -> None:
    """The loss, the margin's radius and the [train.adversarial] table agree."""
    adv = tc.adversarial
    for key, value, valid in [("train.loss", tc.loss, LOSSES),
                              ("train.margin_bound", tc.margin_bound, MARGIN_BOUNDS),
                              ("train.optimizer", tc.optimizer, OPTIMIZERS),
                              ("train.schedule", tc.schedule, SCHEDULES),
                              ("train.adversarial.attack", adv.attack, ATTACKS),
                              ("train.adversarial.loss", adv.loss, ADVERSARIAL_LOSSES),
                              ("train.adversarial.bn_mode", adv.bn_mode, BN_MODES),
                              ("train.adversarial.monitor_attack", adv.monitor_attack, MONITOR_ATTACKS)]:
        if value not in valid:
            raise unknown("value", value, valid, f" for {key}{where}")
    if tc.loss == "lipschitz-margin" and not tc.eps_cert > 0:
        raise RobustclipError(f"train.loss = 'lipschitz-margin' needs train.eps_cert > 0 "
                              f"(the L2 radius to certify){where}")
    if not tc.margin_temperature > 0:
        raise RobustclipError(f"train.margin_temperature must be > 0, got {tc.margin_temperature!r}{where}")
    if adv.attack == "none":
        return
    if tc.loss != "cross-entropy":
        raise RobustclipError(f"train.adversarial.attack = {adv.attack!r} trains with "
                              f"train.adversarial.loss; it does not combine with train.loss = "
                              f"{tc.loss!r}{where}")
    if not 0 < adv.eps <= 1:
        raise RobustclipError(f"train.adversarial.eps must be in (0, 1] (pixel units), got "
                              f"{adv.eps!r}{where}")
    if adv.steps < 1 or adv.monitor_steps < 1:
        raise RobustclipError(f"train.adversarial.steps and monitor_steps must be >= 1{where}")


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as a nested dict of plain values (TOML- and checkpoint-safe)."""
    return dataclasses.asdict(config)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    return from_dict(read_toml(path, "config"), f" in {path}")


def override(config: Config, assignments: Iterable[str]) -> Config:
    """A copy of ``config`` with ``section.key=value`` assignments applied, in order.

    ``model.args.NAME=value`` sets one model argument, ``train.adversarial.KEY=value`` a
    key of that table.
    """
    raw = to_dict(config)
    pairs = []
    for text in assignments:
        key, eq, value = text.partition("=")
        if not eq or key.count(".") < 1:
            raise RobustclipError(f"--set expects section.key=value, got {text!r}")
        pairs.append((key.strip(), parse_toml_value(value.strip())))
    for key, value in pairs:
        section, *path, name = key.split(".")
        if section not in raw:
            raise unknown("section", section, raw, " in --set")
        table = raw[section]
        for i, part in enumerate(path):
            if not isinstance(table.get(part), dict):
                raise unknown("key", ".".join([section, *path[: i + 1]]), table, " in --set")
            table = table[part]
        table[name] = value
    return from_dict(raw, " (after overrides)")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise RobustclipError(f"cannot write {value!r} to TOML")


def to_toml(config: Config) -> str:
    """The config as TOML text: one table per section (``[model.args]`` for model arguments)."""
    lines: list[str] = []
    for section, values in to_dict(config).items():
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in tables]
        for name, table in tables.items():
            lines.append(f"\n[{section}.{name}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def _keys(config: Config) -> dict[str, Any]:
    """``{"section.key": value}``, sub-tables of the schema flattened (``train.adversarial.eps``);
    model.args stays one value."""
    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            if isinstance(value, dict) and (section, key) != ("model", "args"):
                flat |= {f"{section}.{key}.{k}": v for k, v in value.items()}
            else:
                flat[f"{section}.{key}"] = value
    return flat


def differences(a: Config, b: Config, ignore: Iterable[str] = RESUMABLE_CHANGES) -> list[str]:
    """``section.key (a vs b)`` for each key where two configs differ, ``ignore`` left out."""
    da, db = _keys(a), _keys(b)
    return [f"{k} ({da[k]!r} vs {db[k]!r})" for k in da if k not in ignore and da[k] != db[k]]
