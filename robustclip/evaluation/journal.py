"""A journal of finished batches, so that an interrupted evaluation resumes where it stopped.

Each finished (model, attack run, batch) is one file in the journal folder, named by a
digest of everything its result depends on: the model's class and state, the attack
run's specs, the evaluation seed, the batch index and the batch's pixels and labels.  A
rerun that finds the file loads it instead of attacking the batch again; the attacks are
seeded per batch (``craft.batch_seed``), so the resumed table equals an uninterrupted one.
A changed model, attack or data changes the digest, and nothing stale is ever reused.

Files are written atomically (``files.atomic_write``) and read with
``torch.load(weights_only=True)``: a record holds CPU tensors, numbers, strings, lists
and dicts only.
"""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from robustclip.errors import RobustclipError
from robustclip.files import atomic_write


def _update(digest: "hashlib._Hash", tensor: Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module) -> str:
    """A digest of the model's class and state dict (parameters and buffers)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, Tensor):
            _update(digest, value)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def cpu_copy(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (what ``weights_only`` loads back)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [cpu_copy(v) for v in value]
    return value


class Journal:
    """The finished batches of an evaluation, one file each under ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def key(self, *parts: Any, tensors: Sequence[Tensor] = ()) -> str:
        """The name of a record: a digest of ``parts`` (their ``repr``: a spec's names every
        parameter) and of ``tensors`` (dtype, shape and bytes).  A batch's record is keyed
        by a :func:`model_digest`, the attack run, the seed, the batch index and the
        batch's (x, y)."""
        digest = hashlib.sha256(repr(parts).encode())
        for t in tensors:
            _update(digest, t)
        return digest.hexdigest()[:32]

    def get(self, key: str) -> dict[str, Any] | None:
        """The record saved under ``key``, or None.  An unreadable record (a file cut short
        by a crash cannot exist: writes are atomic) raises RobustclipError."""
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
            raise RobustclipError(f"journal record {path} is unreadable ({str(err).splitlines()[0][:80]}); "
                                  "delete it to recompute that batch") from None

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Save ``record`` under ``key`` atomically (its tensors copied to the CPU)."""
        plain = cpu_copy(record)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(plain, f)
        atomic_write(self.folder / f"{key}.pt", write)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.pt"))
