"""Sanity checks: small functions that warn in plain words (after AutoAttack's checks.py).

Every check returns :class:`SanityWarning` objects; nothing here raises.  Per batch, a
:class:`Tally` counts on the device (no host sync) and reads its counters once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from robustclip.evaluation.attacks import ATTACKS, AttackSpec
from robustclip.evaluation.craft import distance, eps_limit


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
        self.merge(*self.batch(x, x_adv, logits_adv, clean, adv_correct))

    def batch(self, x: Tensor, x_adv: Tensor, logits_adv: Tensor, clean: Tensor,
              adv_correct: Tensor, dist: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """One batch's counters and largest distance (0-dim tensors on the device), without
        adding them; ``dist``: the per-sample distances in the spec's norm, if known."""
        dist = distance(x_adv, x, self.spec.norm) if dist is None else dist
        checks = {
            "range": ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1),
            "eps": dist > eps_limit(self.spec.eps),
            "nonfinite": x_adv.isnan().flatten(1).any(1) | (~logits_adv.isfinite()).any(1),
            "revived": ~clean & adv_correct,
        }
        return {key: flags.sum() for key, flags in checks.items()}, dist.max()

    def merge(self, counts: dict[str, Tensor | int], worst: Tensor | float) -> None:
        """Add one batch's counters (:meth:`batch`, or the same read back from a journal)."""
        for key, count in counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        worst = torch.as_tensor(worst)
        self.worst = torch.maximum(torch.as_tensor(self.worst, device=worst.device), worst)

    def warnings(self, model: str, certified_broken: int = 0) -> list[SanityWarning]:
        """The failed checks in plain words (reads the counters: one host sync)."""
        spec = self.spec
        c = {k: int(v) for k, v in self.counts.items()}
        out = []
        if c.get("range"):
            out.append(f"{c['range']} adversarial examples leave the pixel range [0, 1]")
        if c.get("eps"):
            out.append(f"{c['eps']} adversarial examples are farther than eps from their input "
                       f"(largest {spec.norm} distance {float(self.worst):.6g} > {spec.eps:g} + rounding); "
                       "they do not count as successes")
        if c.get("nonfinite"):
            out.append(f"{c['nonfinite']} samples have NaN in the adversarial example or NaN or "
                       "infinite logits; they count as misclassified")
        if c.get("revived"):
            out.append(f"the attack made {c['revived']} misclassified samples correct; "
                       "they still count as not robust (robust <= clean)")
        if certified_broken:
            out.append(f"{certified_broken} samples are certified yet the attack broke them: "
                       "the Lipschitz bound, the certificate or the attack is wrong")
        return [SanityWarning(m, model, spec.label, spec.eps) for m in out]


def mode_warning(model: nn.Module, name: str, where: str) -> SanityWarning | None:
    """Put the model back in eval mode, and say so, if something switched it to training."""
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if not training:
        return None
    model.eval()
    return SanityWarning(f"model was in training mode {where} ({', '.join(training[:3])}"
                         f"{', ...' if len(training) > 3 else ''}); put back in eval mode", name)


def discarded_warnings(model: str, discarded: dict[Any, Any]) -> list[SanityWarning]:
    """Cascade stages whose examples fooled the model outside the rules (beyond eps, out
    of [0, 1], NaN): they were not counted, but the attack is broken."""
    out = []
    for spec, count in discarded.items():
        if int(count):
            out.append(SanityWarning(
                f"{int(count)} adversarial examples fooled the model but left the eps ball or "
                "[0, 1], or held NaN: not counted (the attack is broken)", model, spec.label,
                spec.eps))
    return out


def clean_warnings(model: str, out_of_range: int, nonfinite: int) -> list[SanityWarning]:
    """Checks of a clean pass: ``out_of_range`` inputs outside [0, 1] or NaN,
    ``nonfinite`` samples with a NaN or infinite logit (they count as misclassified)."""
    out = []
    if out_of_range:
        out.append(f"{out_of_range} inputs lie outside [0, 1] or are NaN: attacks assume "
                   "pixels with the normalisation inside the model")
    if nonfinite:
        out.append(f"{nonfinite} samples have NaN or infinite logits on clean inputs; they "
                   "count as misclassified")
    return [SanityWarning(m, model) for m in out]


def start_point_warnings(model: nn.Module, name: str, x: Tensor, y: Tensor,
                         first: Tensor) -> list[SanityWarning]:
    """AutoAttack's checks on one batch at the start point x (n, C, H, W), labels y (n,),
    ``first`` = model(x) from an earlier call (compared with this one's):

    * outputs that change between two identical calls (randomness: a stochastic defence
      needs EOT, and a deterministic table needs a deterministic model);
    * outputs that look like probabilities (every row in [0, 1] summing to 1): attacks
      and certificates need logits;
    * samples whose cross-entropy gradient is exactly zero at x (masked or shattered
      gradients), or NaN or infinite: gradient attacks cannot start there;
    * fewer than 4 classes: the targeted DLR loss of APGD-T needs 4.
    """
    out = []
    with torch.enable_grad():
        x0 = x.detach().clone().requires_grad_(True)
        logits = model(x0)
        grad, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x0,
                                    allow_unused=True)
    logits = logits.detach()
    spread = float((first - logits).abs().nan_to_num(0).max())
    flips = int((first.argmax(1) != logits.argmax(1)).sum())
    if flips or spread > 1e-5 * max(float(logits.abs().nan_to_num(0).max()), 1.0):
        out.append(f"model outputs are not deterministic: two passes of one batch differ by "
                   f"up to {spread:.3g} and change {flips} of {len(x)} predictions "
                   "(randomised defences need an EOT attack)")
    if ((logits >= 0) & (logits <= 1)).all() and torch.allclose(logits.sum(1), torch.ones_like(logits[:, 0]), atol=1e-4):
        out.append("model outputs look like probabilities (in [0, 1], rows sum to 1): "
                   "attacks and certificates need logits; remove the final softmax")
    zero = len(x) if grad is None else int((grad.flatten(1).abs().amax(1) == 0).sum())
    broken = 0 if grad is None else int((~grad.flatten(1).isfinite()).any(1).sum())
    if broken:
        out.append(f"{broken} of {len(x)} samples have a NaN or infinite loss gradient at the "
                   "clean input (non-finite logits?): gradient-based attacks cannot start there")
    if zero:
        out.append(f"{zero} of {len(x)} samples have an exactly zero loss gradient at the "
                   "clean input: gradient-based attacks cannot start there (masked gradients?)")
    if logits.shape[1] < 4:
        out.append(f"the model has {logits.shape[1]} classes: APGD-T's targeted DLR loss "
                   "needs at least 4 (it runs with fewer targets)")
    return [SanityWarning(m, name) for m in out]


def weaker_than_fgsm(results: Sequence[Any]) -> list[SanityWarning]:
    """Where an iterative attack leaves more samples robust than FGSM at the same eps.

    results: AttackResult rows (model, name, norm, eps, attack, robust per sample)."""
    out: list[SanityWarning] = []
    fgsm: dict[tuple, Any] = {}
    for r in results:
        if r.name == "fgsm":
            fgsm.setdefault((r.model, r.eps), r)
    for r in results:
        ref = fgsm.get((r.model, r.eps))
        if ref is None or r.norm != "Linf" or r.name not in ATTACKS or not ATTACKS[r.name].iterative:
            continue
        acc, ref_acc = float(r.robust.double().mean()), float(ref.robust.double().mean())
        if acc > ref_acc:
            out.append(SanityWarning(
                f"iterative attack is weaker than one FGSM step: robust accuracy {acc:.4f} > "
                f"FGSM's {ref_acc:.4f} (too few steps, too small a step, or masked gradients)",
                r.model, r.attack, r.eps))
    return out


def weaker_than_transfer(table: pd.DataFrame) -> list[SanityWarning]:
    """Where examples crafted elsewhere fool a target more than its own white-box attack.

    table: the long transfer table (attack, eps, source, target, kind, accuracy)."""
    warnings: list[SanityWarning] = []
    if table.empty:
        return warnings
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
    return warnings


def _acc(r: Any) -> float:
    return float(r.robust.double().mean())


def square_stronger(results: Sequence[Any]) -> list[SanityWarning]:
    """Where Square (black-box) breaks more than 0.2 points of percentage that every
    white-box attack missed: a sign of masked gradients (AutoAttack's check_square_sr).

    In a cascade: Square's stage broke > 0.2% of the points; otherwise: Square's robust
    accuracy is > 0.2 points below the lowest white-box one at the same model, norm, eps.
    """
    out = []
    groups: dict[tuple, list[Any]] = {}
    for r in results:
        groups.setdefault((r.model, r.norm, r.eps, r.cascade), []).append(r)
    for (model, norm, eps, cascade), rows in groups.items():
        square = [r for r in rows if r.name == "square"]
        white = [r for r in rows if r.name in ATTACKS and ATTACKS[r.name].white_box]
        for r in square:
            n = len(r.robust)
            if cascade:
                if white and r.broken > 0.002 * n:
                    out.append(SanityWarning(
                        f"Square broke {r.broken} of {n} points that every white-box attack "
                        "before it missed (more than 0.2%): the gradients may be masked",
                        model, r.attack, eps))
            elif white and _acc(r) < min(_acc(w) for w in white) - 0.002:
                out.append(SanityWarning(
                    f"Square leaves {_acc(r):.4f}, more than 0.2 points below the best "
                    f"white-box attack's {min(_acc(w) for w in white):.4f}: the gradients "
                    "may be masked", model, r.attack, eps))
    return out


def rising_with_eps(results: Sequence[Any]) -> list[SanityWarning]:
    """Where an attack's robust accuracy rises with eps (a larger ball holds the smaller
    one, so a sound attack can only do better there)."""
    out = []
    series: dict[tuple, list[Any]] = {}
    for r in results:
        series.setdefault((r.model, r.attack, r.norm), []).append(r)
    for (model, attack, norm), rows in series.items():
        rows = sorted(rows, key=lambda r: r.eps)
        for lo, hi in zip(rows, rows[1:]):
            if hi.eps > lo.eps and _acc(hi) > _acc(lo):
                out.append(SanityWarning(
                    f"robust accuracy rises with eps: {_acc(lo):.4f} at eps {lo.eps:g}, "
                    f"{_acc(hi):.4f} at eps {hi.eps:g} (the attack is too weak or unstable)",
                    model, attack, hi.eps))
    return out


def cascade_missed(results: Sequence[Any]) -> list[SanityWarning]:
    """Where an attack outside a cascade broke points that the cascade left robust (same
    model, norm and eps): the cascade is not the per-sample worst case there, and the
    suite row (the worst case over every attack) is the one to read.  Minimum-norm
    attacks whose eps only filters (CW) count as well."""
    out = []
    for c in (r for r in results if r.name == "cascade"):
        for r in results:
            if (r.model, r.norm, r.eps) != (c.model, c.norm, c.eps) or r.cascade or r is c \
                    or r.name in ("cascade", "suite"):
                continue
            missed = int((c.robust & ~r.robust).sum())
            if missed:
                out.append(SanityWarning(
                    f"{missed} of {len(c.robust)} points survived the {c.attack} cascade but "
                    f"fell to {r.attack}: the cascade is not the worst case here; read the "
                    "suite row (per-sample worst case over every attack)", c.model, c.attack, c.eps))
    return out
