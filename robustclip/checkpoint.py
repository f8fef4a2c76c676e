"""Checkpoints: plain data that ``torch.load(weights_only=True)`` reads, saved atomically.

A checkpoint is a dict::

    format          "robustclip-checkpoint";  format_version  1;  version  package version
    model           {"name": str, "args": dict}          see robustclip.models.build_model
    method          {"name": str, "args": dict}
    dataset         str
    epoch           last completed epoch (0-based);  global_step  training steps done
    metrics         list of per-epoch metric dicts (the rows of metrics.csv)
    config          the resolved config (nested dict)
    state_dict      the model's state dict (wrapper buffers included)
    optimizer, scheduler, rng   training state for an exact resume (optional)

:func:`load` rebuilds the model from this metadata; nothing in the file is executed.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from robustclip.errors import RobustclipError, first_line
from robustclip.files import atomic_write, resolve_device

FORMAT = "robustclip-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("model", "method", "dataset", "state_dict")
#: The training state that :func:`load` leaves out of ``model.robustclip_meta``.
TRAINING_STATE = ("state_dict", "optimizer", "scheduler", "rng")


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically (:func:`robustclip.files.atomic_write`)."""
    from robustclip import __version__

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": __version__,
               **checkpoint}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a Python file: a failed write raises its OSError (ENOSPC...)
            torch.save(payload, f)
    atomic_write(path, write)


def checkpoint_file(path_or_run_dir: str | Path) -> Path:
    """The checkpoint file itself, or a run directory's ``last.pt``."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise RobustclipError(f"no checkpoint at {path}")
    return path


RUN_MARKERS = (("last.pt",), ("best.pt",), ("config.toml", "metrics.csv"))
"""What ``robustclip train`` writes into a run directory, any one group of which marks a
folder as a training run (config.toml and metrics.csv come first, before any epoch)."""


def is_run_dir(folder: str | Path) -> bool:
    """Whether ``folder`` is a training run directory: it holds all the files of one group
    of :data:`RUN_MARKERS` (a missing or unreadable folder is not one)."""
    def present(name: str) -> bool:
        try:
            return (Path(folder) / name).is_file()
        except OSError:  # a folder that may not be searched
            return False
    return any(all(present(name) for name in group) for group in RUN_MARKERS)


def read_checkpoint(path_or_run_dir: str | Path) -> dict[str, Any]:
    """Load a robustclip checkpoint safely (weights only, CPU tensors) and check its format."""
    path = checkpoint_file(path_or_run_dir)
    ckpt = _load_plain(path, str(path), "robustclip checkpoints hold plain data only", "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RobustclipError(f"{path} is not a robustclip checkpoint (a foreign file or a bare "
                              f"state dict); train with `robustclip train`")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise RobustclipError(f"{path}: checkpoint format {ckpt.get('format_version')!r} is not "
                              f"supported (this robustclip reads {FORMAT_VERSION})")
    missing = [key for key in _REQUIRED if key not in ckpt]
    if missing:
        raise RobustclipError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def _load_plain(path: Path, what: str, hint: str, kind: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a pickle that carries code or a
    file that is not a torch ``kind`` is one line naming ``what`` (``hint``: how to make a
    good one)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        globals_ = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if globals_:
            raise RobustclipError(f"refusing to load {what}: it is a pickle that carries code "
                                  f"({globals_[0]}); {hint}") from None
        raise RobustclipError(f"{what} is corrupt or not a torch {kind}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise RobustclipError(f"{what} is corrupt or not a torch {kind}: {first_line(err)[:120]}") from None


def load_state(model: nn.Module, ckpt: dict[str, Any]) -> None:
    """Load ``ckpt``'s state dict into ``model`` strictly; a mismatch is a one-line error."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise RobustclipError(f"checkpoint state does not fit model {ckpt['model']['name']!r}: "
                              f"{' '.join(str(err).split())[:200]}") from None


def predates_tracking(ckpt: dict[str, Any]) -> bool:
    """Whether ``ckpt`` is a ``none`` or ``miyato`` run saved before those methods had
    tracking-only wrappers (its state dict holds no wrapper buffers): it loads into the
    plain model."""
    from robustclip.models import TRACKING_ONLY

    return (ckpt["method"]["name"] in TRACKING_ONLY
            and not any(key.endswith(".sigmas") for key in ckpt["state_dict"]))


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model that ``ckpt`` describes and load its state dict."""
    from robustclip.models import build_model

    model = build_model(ckpt["model"]["name"], ckpt["dataset"], ckpt["method"]["name"],
                        ckpt["method"]["args"], track=not predates_tracking(ckpt),
                        **ckpt["model"]["args"])
    load_state(model, ckpt)
    return model


def load(path_or_run_dir: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """A trained model in eval mode from a checkpoint file or a run directory (``last.pt``).

    device: where to put it (default CPU).  The checkpoint's metadata (model, method,
    dataset, epoch, metrics, config, version) is attached as ``model.robustclip_meta``.
    """
    ckpt = read_checkpoint(path_or_run_dir)
    model = model_from_checkpoint(ckpt)
    model.robustclip_meta = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    return model.to(device or "cpu").eval()


def load_runs(runs: Sequence[str], device: str | None = None) -> dict[str, nn.Module]:
    """label -> model (eval mode) for each run dir or checkpoint, via ``robustclip.load``.

    Labels are the run names (file stems), or the paths where names collide.  A missing
    or unreadable checkpoint raises RobustclipError naming it, and so does a run given
    twice (:func:`check_distinct`).
    """
    dev = None if device is None else resolve_device(device)
    check_distinct(runs)
    names = [Path(r).stem if Path(r).is_file() else Path(r).name for r in runs]
    labels = names if len(set(names)) == len(names) else [str(r) for r in runs]
    models = {}
    for label, run in zip(labels, runs):
        try:
            models[label] = load(run, device=dev).eval()
        except RobustclipError:
            raise
        except Exception as err:  # a checkpoint's unpickling can fail in many ways
            raise RobustclipError(f"cannot load {run}: {' '.join(str(err).split())}") from None
        if not getattr(models[label], "robustclip_meta", {}).get("dataset"):
            raise RobustclipError(f"checkpoint {run} does not record its dataset")
    return models


def check_distinct(runs: Sequence[str]) -> None:
    """Refuse a checkpoint given twice, whatever the spelling (``runs/a``, ``./runs/a``,
    ``runs/a/last.pt``, a link to it): the checkpoint files the runs name are compared as
    files (device and inode).  A missing run or a run directory without ``last.pt``
    raises RobustclipError naming it; a checkpoint given twice, naming both spellings."""
    seen: dict[tuple[int, int], str] = {}
    for run in runs:
        if not Path(run).exists():
            raise RobustclipError(f"run {run} does not exist")
        stat = checkpoint_file(run).stat()
        key = (stat.st_dev, stat.st_ino)
        if key in seen:
            raise RobustclipError(f"the same run is given twice: {seen[key]} and {run} are one "
                                  f"checkpoint; give each run once")
        seen[key] = run


def load_factory(spec: str, weights: str | Path | None, dataset: str,
                 device: str | torch.device | None = None) -> tuple[str, nn.Module]:
    """(label, model in eval mode) from your own code: ``spec`` 'pkg.module:factory' names
    a callable returning an nn.Module whose input is images in [0, 1] (the normalisation
    inside the model); the current directory is searched first, as by ``python -m``.

    weights: a state dict file (or a dict holding one under 'state_dict', a robustclip
    checkpoint included), loaded with ``torch.load(weights_only=True)`` and strictly.
    dataset: the dataset it classifies (recorded as ``robustclip_meta['dataset']``).
    """
    import importlib
    import sys

    from robustclip.data import dataset_info

    dataset_info(dataset)  # an unknown name fails before any import
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RobustclipError(f"--model {spec!r}: give it as pkg.module:factory")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except ImportError as err:
        raise RobustclipError(f"--model {spec}: cannot import {module_name}: {err}") from None
    except AttributeError:
        raise RobustclipError(f"--model {spec}: {module_name} has no {attr}") from None
    if not callable(factory):
        raise RobustclipError(f"--model {spec}: {attr} is not callable")
    try:
        model = factory()
    except Exception as err:  # the user's code: any failure is one line
        raise RobustclipError(f"--model {spec}: {attr}() failed: {first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise RobustclipError(f"--model {spec}: {attr}() returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        _load_weights(model, Path(weights))
    model.robustclip_meta = {"dataset": dataset, "model": spec, "method": ""}
    return attr.rpartition(".")[2], model.to(device or "cpu").eval()


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict file (or a dict with 'state_dict') into ``model``, strictly."""
    if not path.is_file():
        raise RobustclipError(f"--weights {path} does not exist")
    state = _load_plain(path, f"--weights {path}", "save it with torch.save(model.state_dict(), path)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RobustclipError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RobustclipError(f"--weights {path} do not fit the model: "
                              f"{' '.join(str(err).split())[:200]}") from None
