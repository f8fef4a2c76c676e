"""Environment records: what software on which machine made a run or a results folder.

:func:`environment` returns a JSON-ready dict; :func:`write_environment` writes it
atomically as ``environment.json`` (or another name) into a folder.  Keys:

- ``robustclip``, ``torch``, ``torchvision``, ``torchattacks``, ``python``: versions,
  with the build tag where the module has one (``2.14.1+cu130``); None for a package that
  is not installed;
- ``platform``: ``platform.platform()``; ``cpu``: the CPU model (``/proc/cpuinfo``, else
  ``platform.processor()``); ``cpu_cores``: ``os.cpu_count()``; ``torch_threads``;
- ``device`` and ``device_name`` (only when a device is given): e.g. ``cuda:0`` and
  ``torch.cuda.get_device_name``, or ``cpu`` and the CPU model; ``cuda`` (CUDA runtime
  version) on a CUDA device; ``world_size``: processes of a torchrun job;
- ``git`` (only where robustclip runs from a git working tree that tracks it):
  ``{"commit": HEAD's hash, "dirty": whether tracked files differ from HEAD}``;
- ``command``: ``sys.argv``, shell-quoted; ``time_utc``: ISO 8601, seconds.

Nothing here raises for a missing tool: without ``git`` (or outside a repository) the
``git`` key is left out.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from robustclip.files import write_text

#: Seconds a ``git`` call may take before the record goes without it.
GIT_TIMEOUT_S = 10.0
PACKAGES = ("torch", "torchvision", "torchattacks")


def _version(package: str) -> str | None:
    """The imported module's ``__version__`` (torch's holds the build, e.g. ``+cu130``), else
    the installed distribution's version, else None."""
    module = sys.modules.get(package)
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(folder: Path, *args: str) -> str | None:
    """stdout of ``git -C folder args`` (stripped), or None if git is missing or fails."""
    try:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(source: str | Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git working tree whose tracked file ``source`` is
    (default use: robustclip's own ``__init__.py``); None if ``source`` is not tracked by a
    git repository (an installed package, say, even inside someone's repository) or git is
    missing.  ``dirty``: some tracked file differs from HEAD (untracked files do not count)."""
    source = Path(source).resolve()
    if _git(source.parent, "ls-files", "--error-unmatch", source.name) is None:
        return None
    commit = _git(source.parent, "rev-parse", "HEAD")
    status = _git(source.parent, "status", "--porcelain", "--untracked-files=no")
    if not commit or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


def environment(device: torch.device | str | None = None, world_size: int = 1) -> dict[str, Any]:
    """The record described in the module doc; ``device``: where the work ran (the
    model's or the command's device), left out of the record when None."""
    import robustclip

    record: dict[str, Any] = {"robustclip": robustclip.__version__}
    record |= {name: _version(name) for name in PACKAGES}
    record |= {"python": platform.python_version(), "platform": platform.platform(),
               "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads()}
    if device is not None:
        device = torch.device(device)
        record["device"] = str(device)
        if device.type == "cuda":
            record["device_name"] = torch.cuda.get_device_name(device)
            record["cuda"] = torch.version.cuda
        else:
            record["device_name"] = record["cpu"] if device.type == "cpu" else device.type
    record["world_size"] = world_size
    git = git_state(robustclip.__file__)
    if git is not None:
        record["git"] = git
    record["command"] = shlex.join(sys.argv)
    record["time_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


def write_environment(folder: str | Path, device: torch.device | str | None = None,
                      world_size: int = 1, name: str = "environment.json") -> Path:
    """Write :func:`environment` as JSON to ``folder/name`` atomically; returns the path."""
    text = json.dumps(environment(device, world_size), indent=1) + "\n"
    return write_text(Path(folder) / name, text)
