"""A journal of finished batches, so that an interrupted evaluation resumes where it stopped.

Each finished (model, attack run, batch) is one file in the journal folder, named by a
digest of everything its result depends on: the model's class and state, the attack
run's specs, the evaluation seed, the batch index and the batch's pixels and labels.  A
rerun that finds the file loads it instead of attacking the batch again; the attacks are
seeded per batch (``craft.batch_seed``), so the resumed table equals an uninterrupted one.
A changed model, attack or data changes the digest, and nothing stale is ever reused.

A file holds its key and a digest of key and content beside the record itself; a replay
checks that the key is the one looked up (a record copied over another's name is
refused), that the digest matches (an edited record is refused) and, with the caller's
check (:func:`check_batch_record`, :func:`check_bound_record`), that the record holds
what the evaluation reads.  Any mismatch is a RobustclipError naming the file.

Files are written atomically (``files.atomic_write``) and read with
``torch.load(weights_only=True)``: a record holds CPU tensors, numbers, strings, lists
and dicts only.
"""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

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


def content_digest(key: str, record: Any) -> str:
    """A digest of ``key`` and of everything in ``record``: the type and value of each
    number and string, the dtype, shape and bytes of each tensor, in order."""
    digest = hashlib.sha256(key.encode())
    _feed(digest, record)
    return digest.hexdigest()


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, Tensor):
        digest.update(b"T")
        _update(digest, value)
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for k, v in value.items():
            _feed(digest, k)
            _feed(digest, v)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for v in value:
            _feed(digest, v)
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__}{len(text)}:{text}".encode())


class BadRecord(ValueError):
    """What is wrong with a journal record (:meth:`Journal.get` names the file)."""


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise BadRecord(problem)


def _number(value: Any) -> bool:
    """A plain int or float (not a bool), or a 0-dim real tensor."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_keys(record: Any, keys: Sequence[str]) -> None:
    _require(isinstance(record, dict), f"holds a {type(record).__name__}, not a dict")
    missing = [k for k in keys if k not in record]
    _require(not missing, f"lacks {', '.join(missing)}")
    unknown = [str(k) for k in record if k not in keys]
    _require(not unknown, f"has unknown keys {', '.join(unknown)}")


def _per_stage(record: dict, name: str, stages: int) -> list:
    values = record[name]
    _require(isinstance(values, list) and len(values) == stages,
             f"{name} is not a list of {stages} (one per result of the attack run)")
    return values


def _tensors(values: list, name: str, shape: tuple[int, ...], floating: bool) -> None:
    """Each of ``values`` a tensor of ``shape``: floating, else bool."""
    for i, t in enumerate(values):
        _require(isinstance(t, Tensor), f"{name}[{i}] is a {type(t).__name__}, not a tensor")
        _require(tuple(t.shape) == shape, f"{name}[{i}] has shape {tuple(t.shape)}, not {shape} "
                                          "(the batch's)")
        _require(t.is_floating_point() if floating else t.dtype == torch.bool,
                 f"{name}[{i}] is {t.dtype}, not {'a floating type' if floating else 'torch.bool'}")


def _warning(value: Any) -> bool:
    """A saved SanityWarning: [message, model, attack, eps]."""
    return (isinstance(value, list) and len(value) == 4 and isinstance(value[0], str)
            and all(v is None or isinstance(v, str) for v in value[1:3])
            and (value[3] is None or _number(value[3])))


BATCH_KEYS = ("correct", "distance", "counts", "worst", "adversarial", "ratio", "discarded",
              "warnings", "seconds")
"""The keys of a batch's record (``evaluate._attack_batch`` and its time)."""


def check_batch_record(record: Any, n: int, stages: int, shape: Sequence[int]) -> None:
    """Check that a batch's record holds what the evaluation reads: the :data:`BATCH_KEYS`
    only; per result of the attack run (``stages``) correct (n,) bool, distance (n,)
    floating, counts (a dict of numbers), worst and discarded (numbers); adversarial none
    or one (n, *shape) floating tensor per result; ratio and seconds numbers; warnings
    [message, model, attack, eps] lists.  Raises :class:`BadRecord` saying what is wrong."""
    _check_keys(record, BATCH_KEYS)
    _tensors(_per_stage(record, "correct", stages), "correct", (n,), floating=False)
    _tensors(_per_stage(record, "distance", stages), "distance", (n,), floating=True)
    for name in ("worst", "discarded"):
        _require(all(map(_number, _per_stage(record, name, stages))), f"{name} holds a non-number")
    _require(all(isinstance(c, dict) and all(isinstance(k, str) and _number(v) for k, v in c.items())
                 for c in _per_stage(record, "counts", stages)),
             "counts is not a dict of numbers per result")
    if kept_adversarial(record):
        _tensors(_per_stage(record, "adversarial", stages), "adversarial", (n, *shape), floating=True)
    _require(_number(record["ratio"]) and _number(record["seconds"]), "ratio or seconds is not a number")
    _require(isinstance(record["warnings"], list) and all(map(_warning, record["warnings"])),
             "warnings is not a list of [message, model, attack, eps]")


def kept_adversarial(record: dict) -> bool:
    """Whether a batch's record keeps its adversarial examples (anything but an empty list)."""
    return not (isinstance(record["adversarial"], list) and not record["adversarial"])


BOUND_KINDS = ("exact", "upper", "estimate")
"""The kinds of a computed Lipschitz bound (``ensemble.model_bound``)."""


def check_bound_record(record: Any) -> None:
    """Check that a Lipschitz bound's record is {'value': number, 'kind': one of
    :data:`BOUND_KINDS`}; raises :class:`BadRecord` saying what is wrong."""
    _check_keys(record, ("value", "kind"))
    _require(_number(record["value"]), "value is not a number")
    _require(isinstance(record["kind"], str) and record["kind"] in BOUND_KINDS,
             f"kind is not one of {', '.join(BOUND_KINDS)}")


_FILE_KEYS = ("key", "digest", "record")
"""What a journal file holds: the key it was written under, :func:`content_digest` of key
and record, and the record."""


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

    def get(self, key: str, check: Callable[[Any], None] | None = None) -> dict[str, Any] | None:
        """The record saved under ``key``, or None.

        The file must hold ``key`` itself (not a record of another batch copied over this
        name) and a digest matching its content (not an edited record), and ``check``
        (e.g. :func:`check_batch_record`) must pass on the record (raising
        :class:`BadRecord`); else, and for an unreadable file (a file cut short by a crash
        cannot exist: writes are atomic), RobustclipError names the file and says to
        delete it (or the journal) to recompute that batch."""
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
            raise self._refused(path, f"is unreadable ({str(err).splitlines()[0][:80]})") from None
        try:
            _check_keys(saved, _FILE_KEYS)
            _require(isinstance(saved["key"], str) and isinstance(saved["digest"], str),
                     "holds a key or digest that is not a string")
        except BadRecord as err:
            raise self._refused(path, f"is not a journal record robustclip wrote (it {err})") from None
        if saved["key"] != key:
            raise self._refused(path, f"is the record of another batch or run (its key is "
                                      f"{str(saved['key'])[:40]!r}, not {key!r}: copied over this name?)")
        if saved["digest"] != content_digest(key, saved["record"]):
            raise self._refused(path, "was changed after it was written (its content does not "
                                      "match its digest)")
        try:
            if check is not None:
                check(saved["record"])
        except BadRecord as err:
            raise self._refused(path, f"is malformed: {err}") from None
        return saved["record"]

    def _refused(self, path: Path, problem: str) -> RobustclipError:
        return RobustclipError(f"journal record {path} {problem}; delete it (or the journal "
                               f"{self.folder}) to recompute that batch")

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Save ``record`` under ``key`` atomically (its tensors copied to the CPU), with
        ``key`` and their :func:`content_digest`."""
        record = cpu_copy(record)
        plain = {"key": key, "digest": content_digest(key, record), "record": record}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(plain, f)
        atomic_write(self.folder / f"{key}.pt", write)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.pt"))
