"""Training configuration: TOML files with sections [model], [data], [method], [train], [log].

Every key has a default (the schema below); an unknown or misspelt key is an error that
names it, suggests the closest valid key and lists the valid ones.  ``--set
section.key=value`` overrides are parsed as TOML values (bare words are strings) and
typed by the schema.  :func:`to_toml` writes the resolved config that a run directory
keeps as ``config.toml``.
"""
from __future__ import annotations

import dataclasses
import difflib
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
    parameters (miyato uses clip and iters_per_step).  init_delay is the tutorial's 500."""

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


@dataclass
class TrainConfig:
    """SGD with momentum and StepLR (lr *= gamma every step_size epochs).  limit_train /
    limit_test: use the first N samples (0: all).  device: auto, cpu, cuda or cuda:N."""

    epochs: int = 60
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    step_size: int = 40
    gamma: float = 0.1
    seed: int = 1
    limit_train: int = 0
    limit_test: int = 0
    device: str = "auto"


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
        return {**args, "log_every": self.log.log_every}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
#: Keys whose change does not make a different run (a resume may change them).
RESUMABLE_CHANGES = ("train.epochs", "train.device", "log.progress")


def _unknown(what: str, key: str, valid: Iterable[str], where: str) -> RobustclipError:
    valid = list(valid)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return RobustclipError(f"unknown {what} {key!r}{where}; {hint}valid: {', '.join(valid)}")


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` checked against the schema type ``kind`` (an int is accepted as a float)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RobustclipError(f"{key} must be {kind.__name__}, got {value!r}")
    if kind in (int, float) and not math.isfinite(value):
        raise RobustclipError(f"{key} must be finite, got {value!r}")
    if kind in (int, float) and value < 0:
        raise RobustclipError(f"{key} must be >= 0, got {value!r}")
    return value


def from_dict(raw: Mapping[str, Any], where: str = "") -> Config:
    """Validate a nested dict (as read from TOML) into a :class:`Config`; defaults fill gaps."""
    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section, {})
        if not isinstance(values, Mapping):
            raise RobustclipError(f"[{section}]{where} must be a table, got {values!r}")
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                raise _unknown("key", f"{section}.{key}", hints, where)
        sections[section] = cls(**{key: _typed(f"{section}.{key}", value, hints[key])
                                   for key, value in values.items()})
    for section in raw:
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS, where)
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
            raise _unknown("value", value, valid, f" for {key}{where}")
    for key in ("epochs", "batch_size", "eval_batch_size", "step_size"):
        if getattr(config.train, key) < 1:
            raise RobustclipError(f"train.{key} must be >= 1{where}")


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as a nested dict of plain values (TOML- and checkpoint-safe)."""
    return dataclasses.asdict(config)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    return from_dict(read_toml(path, "config"), f" in {path}")


def override(config: Config, assignments: Iterable[str]) -> Config:
    """A copy of ``config`` with ``section.key=value`` assignments applied, in order.

    ``model.args.NAME=value`` sets one model argument.
    """
    raw = to_dict(config)
    pairs = []
    for text in assignments:
        key, eq, value = text.partition("=")
        if not eq or key.count(".") < 1:
            raise RobustclipError(f"--set expects section.key=value, got {text!r}")
        pairs.append((key.strip(), parse_toml_value(value.strip())))
    for key, value in pairs:
        section, _, name = key.partition(".")
        if section not in raw:
            raise _unknown("section", section, raw, " in --set")
        if section == "model" and name.startswith("args."):
            raw["model"]["args"][name[5:]] = value
        else:
            raw[section][name] = value
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


def differences(a: Config, b: Config, ignore: Iterable[str] = RESUMABLE_CHANGES) -> list[str]:
    """``section.key (a vs b)`` for each key where two configs differ, ``ignore`` left out."""
    da, db = to_dict(a), to_dict(b)
    return [f"{s}.{k} ({da[s][k]!r} vs {db[s][k]!r})" for s in da for k in da[s]
            if f"{s}.{k}" not in ignore and da[s][k] != db[s][k]]
