"""Crafting adversarial examples: eval mode, seeding, restarts and eps-free attacks.

Randomness is seeded per batch and restart from ``seed``, the attack's label and eps,
and the batch index (:func:`batch_seed`): a run is reproducible for a given batch size,
and each attack call forks torch's RNG so the caller's stream is untouched.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from robustclip.certificates import predicted_correct
from robustclip.evaluation.attacks import CW_EPS_NOTE, AttackSpec
from robustclip.evaluation.cascade import Cascade
from robustclip.spectral import eval_mode


Spec = Union[AttackSpec, Cascade]
"""What an evaluation runs: one attack at one eps, or a cascade of them."""


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters (no weight .grad from CW's backward); restored after."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)


def batch_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from ``seed`` and ``parts`` (stable across processes and platforms)."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def run_key(spec: AttackSpec) -> str:
    """What seeds a spec's runs: its label, and its eps unless eps only filters (CW)."""
    return f"{spec.label}@{spec.eps!r}" if spec.eps_bound else spec.label


def craft_seed(seed: int, spec: AttackSpec, batch: int) -> int:
    """The seed of ``spec``'s run on batch ``batch`` of an evaluation seeded ``seed``."""
    return batch_seed(seed, run_key(spec), batch)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
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
    if spec.eps == 0 and spec.eps_bound:
        return x.clone()
    restarts = spec.kwargs["n_restarts"] if spec.definition.own_restarts else 1
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    todo = torch.arange(len(x), device=x.device)
    x_adv = x
    for r in range(restarts):
        s = batch_seed(seed, r)
        with seeded(s, x.device):
            adv = spec.build(model, s, n_classes)(x[todo], y[todo]).detach()
        x_adv = adv if r == 0 else x_adv.index_copy(0, todo, adv)
        if r + 1 < restarts:
            with torch.no_grad():
                todo = todo[predicted_correct(model(adv), y[todo])]
            if todo.numel() == 0:  # one host sync per restart, never per step
                break
    return x_adv


def distance(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """Per-sample ||x_adv - x|| in ``norm`` ('Linf' or 'L2'), shape (n,)."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)


def adversarial(model: nn.Module, specs: Sequence[Spec], x: Tensor, y: Tensor, seed: int,
                batch: int, clean: Tensor | None = None,
                discarded: dict[Spec, Tensor] | None = None) -> dict[Spec, Tensor]:
    """x_adv per result key (:func:`stages`) for one batch of one attack run (:func:`runs`).

    ``specs`` is one bounded spec; or every eps of one eps-free attack (CW): run once,
    then x_adv = the CW example where its L2 perturbation is <= eps, else x; or one
    :class:`Cascade`: its attacks in turn on the points still robust (``clean``: the
    clean correctness (n,), bool; default: the model's predictions on x), x_adv after
    each stage under the member's key and the final one under the cascade's.
    ``discarded`` (member -> count, on the device) adds up the examples a cascade stage
    made that fooled the model but left the eps ball or [0, 1], or held NaN: they do not
    count, and :func:`~robustclip.evaluation.checks.discarded_warnings` reports them.
    """
    first = specs[0]
    if isinstance(first, Cascade):
        return _cascade(model, first, x, y, seed, batch, clean, discarded)
    x_adv = craft(model, first, x, y, craft_seed(seed, first, batch))
    if first.eps_bound:
        return {first: x_adv}
    dist = distance(x_adv, x, "L2").view(-1, *([1] * (x.dim() - 1)))
    return {s: torch.where(dist <= s.eps, x_adv, x) for s in specs}


def _cascade(model: nn.Module, cascade: Cascade, x: Tensor, y: Tensor, seed: int, batch: int,
             clean: Tensor | None, discarded: dict[Spec, Tensor] | None) -> dict[Spec, Tensor]:
    """Each member on the points still robust; an example counts only if it fools the model
    within the eps ball and [0, 1] (one host sync per stage, to pick the points)."""
    with torch.no_grad():
        robust = predicted_correct(model(x), y) if clean is None else clean.clone()
    x_adv, out = x.clone(), {}
    for member in cascade.members:
        todo = robust.nonzero().squeeze(1)
        if todo.numel():
            adv = craft(model, member, x[todo], y[todo], craft_seed(seed, member, batch))
            with torch.no_grad():
                logits = model(adv)
            valid = within_rules(adv, x[todo], member.norm, member.eps)
            wrong = ~predicted_correct(logits, y[todo])
            fooled = valid & wrong
            if discarded is not None:
                discarded[member] = discarded.get(member, 0) + (wrong & ~valid).sum()
            x_adv[todo[fooled]] = adv[fooled]
            robust[todo[fooled]] = False
        out[member] = x_adv.clone()
    out[cascade] = out[cascade.members[-1]]  # the same tensor: callers may score it once
    return out


def eps_limit(eps: float) -> float:
    """The largest distance that counts as within ``eps``: float32 pixels round by up to
    3e-8 each, about 1e-6 in L2 over an MNIST image."""
    return eps * (1 + 1e-6) + 1e-6


def within_rules(x_adv: Tensor, x: Tensor, norm: str, eps: float,
                 dist: Tensor | None = None) -> Tensor:
    """Per sample (n,), bool: x_adv lies in [0, 1] without NaN and within
    :func:`eps_limit` of x in ``norm``; only such an example may count as a success.
    ``dist``: :func:`distance` of x_adv from x in ``norm``, if already known."""
    dist = distance(x_adv, x, norm) if dist is None else dist
    return ((dist <= eps_limit(eps))
            & ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1))


def stages(group: Sequence[Spec]) -> list[Spec]:
    """The result keys of one attack run: its specs, or a cascade's members then itself."""
    return [*group[0].members, group[0]] if isinstance(group[0], Cascade) else list(group)


def runs(specs: Sequence[Spec]) -> list[list[Spec]]:
    """Group specs into attack runs: one per bounded spec or cascade, one per eps-free
    attack label."""
    grouped: dict[tuple, list[Spec]] = {}
    for s in specs:
        key = (s.label, s.name, s.params) + ((s.eps,) if s.eps_bound else ())
        grouped.setdefault(key, []).append(s)
    return list(grouped.values())


def row_params(spec: Spec) -> dict[str, Any]:
    """The parameters a table row shows (lists, not tuples, so they read back from JSON)."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.kwargs.items()}
    return params | ({} if spec.eps_bound else {"eps": CW_EPS_NOTE})
