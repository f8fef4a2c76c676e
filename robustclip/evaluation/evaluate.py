"""White-box evaluation: every model under every attack spec, kept per sample.

Every result is kept per sample:

* clean:     correct on x;
* robust:    correct on x AND on x_adv (a misclassified sample is never robust);
* certified: correct with logit margin > sqrt(2) * L * r (``bounds.certified``), r the L2
  radius of the attack's ball (eps * sqrt(d) for Linf).

A suite is combined per sample: robust only if the sample survives every attack of the
same norm and eps.

Under a process group (``torchrun ... robustclip attack``), :func:`evaluate` shards by
whole batches (batch i on rank i mod world size, robustclip.distributed) and all-gathers
the per-batch results and check counters: every rank ends with the table of a single
process, same samples, same per-batch seeds.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from robustclip.certificates import certified, linf_to_l2, predicted_correct
from robustclip.empirical import screened_ratio
from robustclip.distributed import all_gather, check_world, current, my_batches, on_main
from robustclip.errors import RobustclipError, first_line
from robustclip.evaluation.cascade import Cascade
from robustclip.evaluation.checks import (SanityWarning, Tally, cascade_missed, clean_warnings,
                                          discarded_warnings, mode_warning,
                                          rising_with_eps, square_stronger, start_point_warnings,
                                          weaker_than_fgsm)
from robustclip.evaluation.craft import (Spec, adversarial, distance, evaluating, row_params, runs,
                                         stages, within_rules)
from robustclip.evaluation.ensemble import SOUND, Bound, meta_name, model_bound
from robustclip.evaluation.journal import (Journal, check_batch_record, check_bound_record, cpu_copy,
                                           kept_adversarial, model_digest)
from robustclip.spectral import float64_twin, module_device

log = logging.getLogger(__name__)


@dataclass
class AttackResult:
    """One (model, attack or suite, norm, eps) row with per-sample booleans (n,) on the CPU.

    name: the attack's key in ATTACKS, 'cascade', or 'suite' for a per-sample worst case;
    attack: its label.  seconds: wall time of the attack run (an eps-free CW run serves
    every eps; a cascade's members share their cascade's).  broken: the clean-correct
    samples this row's attack broke (in a cascade: those its stage was the first to
    break).  cascade: the label of the cascade a member row belongs to ('' otherwise);
    its robust is the cumulative robustness after that stage.  bound_kind: 'exact',
    'upper', 'estimate' or 'none' (``bounds.lipschitz_report``), 'given', or 'refuted'
    (:func:`refutation`); certificates rest only on 'exact', 'upper' or 'given' bounds.  distance (n,) float64: the norm of the
    perturbation that broke each sample (NaN where this row broke nothing).
    adversarial (n, C, H, W): the examples scored, when the evaluation keeps them.
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
    broken: int = 0
    cascade: str = ""
    bound_kind: str = "none"
    distance: Tensor | None = None
    adversarial: Tensor | None = None


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


def batches_of(images: Tensor, labels: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """(images, labels) in batches of ``batch_size``, checked: images a floating tensor
    (n, ...), labels (n,) of integer class indices >= 0 (returned as int64).  The upper
    bound of the labels (the model's classes) is checked by :func:`clean_pass`."""
    if batch_size < 1:
        raise RobustclipError(f"batch size must be >= 1, got {batch_size}")
    if not (isinstance(images, Tensor) and isinstance(labels, Tensor)):
        raise RobustclipError(f"images and labels must be tensors, got {type(images).__name__} "
                              f"and {type(labels).__name__}")
    if not images.is_floating_point() or images.dim() < 2:
        raise RobustclipError(f"images must be a floating tensor (n, C, H, W) in [0, 1], got "
                              f"{images.dtype} of shape {tuple(images.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise RobustclipError(f"labels must be integer class indices (int64), got {labels.dtype}")
    if labels.dim() != 1:
        raise RobustclipError(f"labels must have shape (n,), got {tuple(labels.shape)}")
    if len(images) == 0 or len(images) != len(labels):
        raise RobustclipError(f"need as many labels as images, and at least one; got "
                              f"{len(images)} images, {len(labels)} labels")
    if int(labels.min()) < 0:
        raise RobustclipError(f"labels must be class indices >= 0, got {int(labels.min())}")
    return list(zip(images.split(batch_size), labels.long().split(batch_size)))


def _first_forward(model: nn.Module, name: str, x: Tensor,
                   batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """model(x) for a first batch x; a failure of the model on this input, or labels
    outside its classes, raise RobustclipError."""
    try:
        out = model(x)
    except torch.OutOfMemoryError:
        raise
    except (IndexError, RuntimeError, ValueError) as err:
        first = first_line(err)
        raise RobustclipError(f"model {name} fails on input shape {tuple(x.shape[1:])}: {first}") from None
    top = max(int(y.max()) for _, y in batches)
    if out.dim() != 2 or top >= out.shape[1]:
        raise RobustclipError(f"labels must be in [0, {out.shape[-1]}) (the classes of model {name}, "
                              f"output shape {tuple(out.shape[1:])}), got {top}")
    return out


def clean_pass(model: nn.Module, name: str, batches: Sequence[tuple[Tensor, Tensor]],
               warnings: list[SanityWarning], twin: nn.Module | None = None) -> CleanPass:
    """Clean logits, input range and NaN checks, test pairs; start-point checks
    (:func:`~robustclip.evaluation.checks.start_point_warnings`) on the first batch of
    each rank.

    twin: the model's :func:`~robustclip.spectral.float64_twin`, on which the ratios over
    neighbouring test pairs are measured; None skips them (ratio 0).

    Under a process group each rank runs its batches and every rank gets the merged pass.
    """
    device, ctx = module_device(model), current()
    logits: dict[int, Tensor] = {}
    ratio = torch.zeros((), device=device, dtype=torch.float64)
    bad_range = nonfinite = 0
    with torch.no_grad():
        for b in my_batches(len(batches), ctx):
            x = batches[b][0].to(device)
            bad_range = bad_range + (~((x >= 0) & (x <= 1))).flatten(1).any(1).sum()
            if not logits:  # the first batch: the model's own error on a bad input is one
                # line, then the start-point checks
                out = _first_forward(model, name, x, batches)
                warnings += start_point_warnings(model, name, x, batches[b][1].to(device), out)
            else:
                out = model(x)
            nonfinite = nonfinite + (~out.isfinite()).any(1).sum()
            if twin is not None:
                ratio = torch.maximum(ratio, screened_ratio(twin, x, x.roll(1, 0), out, out.roll(1, 0)))
            logits[b] = out
    if ctx.distributed:
        parts = all_gather(({b: t.cpu() for b, t in logits.items()}, int(bad_range), int(nonfinite),
                            float(ratio)), ctx)
        logits = {b: t.to(device) for p in parts for b, t in p[0].items()}
        bad_range, nonfinite = (sum(p[i] for p in parts) for i in (1, 2))
        ratio = torch.tensor(max(p[3] for p in parts), device=device, dtype=torch.float64)
    logits = torch.cat([logits[b] for b in range(len(batches))])
    labels = torch.cat([y for _, y in batches]).to(device)
    warnings += clean_warnings(name, int(bad_range), int(nonfinite))
    return CleanPass(logits, predicted_correct(logits, labels), ratio)


def l2_radius(norm: str, eps: float, shape: Sequence[int]) -> float:
    """L2 radius of an eps-ball of ``norm`` for inputs of ``shape`` (no batch dim)."""
    return eps if norm == "L2" else linf_to_l2(eps, math.prod(shape))


def evaluate(models: Mapping[str, nn.Module], images: Tensor, labels: Tensor,
             specs: Sequence[Spec], *, suite: str | None = None, batch_size: int = 256,
             seed: int = 0, bounds: bool | Mapping[str, float] = True,
             progress: bool = False, journal: Journal | str | Path | None = None,
             keep_adversarial: bool = False) -> Evaluation:
    """White-box evaluation of every model under every spec, per sample.

    models: label -> model (on its device; ``robustclip_meta`` gives method, ensemble).
    images: (n, C, H, W) in [0, 1]; labels: (n,) int64.
    suite: label of the per-sample worst case over the attacks of each (norm, eps); with
        None and several attacks at one (norm, eps) the label is 'all-attacks'.
    specs: attacks (:func:`~robustclip.evaluation.attacks.make_spec`) and cascades
        (:func:`~robustclip.evaluation.cascade.make_cascade`).
    bounds: True computes each model's Lipschitz bound (:func:`model_bound`); a mapping
        gives them (label -> bound, taken as guaranteed upper bounds); False skips bounds
        and certificates.
    progress: a bar per (model, attack run), counting images.
    journal: a :class:`~robustclip.evaluation.journal.Journal` (or its folder) that keeps
        every finished batch; an evaluation rerun with the same journal loads them instead
        of attacking again, and gives the same table.
    keep_adversarial: keep each row's adversarial examples (``AttackResult.adversarial``).
    """
    batches, ctx = batches_of(images, labels, batch_size), current()
    if journal is not None and not isinstance(journal, Journal):
        journal = Journal(journal)
    check_world(ctx, len(images), "evaluation samples")
    if ctx.world_size > len(batches):
        log.warning("%d ranks for %d batches: ranks %d and up stay idle; use a smaller batch size",
                    ctx.world_size, len(batches), len(batches))
    evaluation = Evaluation([])
    for name, model in models.items():
        with evaluating(model):
            _evaluate_model(name, model, batches, specs, seed, bounds, progress, evaluation,
                            journal, keep_adversarial)
    if ctx.distributed:  # mode warnings are per rank; the others are the same on every rank
        evaluation.warnings = [w for part in all_gather(evaluation.warnings, ctx) for w in part]
    _combine(evaluation, suite)
    for check in (weaker_than_fgsm, square_stronger, rising_with_eps, cascade_missed):
        evaluation.warnings += check(evaluation.results)
    evaluation.warnings = list(dict.fromkeys(evaluation.warnings))
    return evaluation


def _bound_of(name: str, model: nn.Module, shape: Sequence[int],
              bounds: bool | Mapping[str, float], warnings: list[SanityWarning],
              progress: bool = False) -> Bound:
    if isinstance(bounds, Mapping):
        value = float(bounds.get(name, math.nan))
        return Bound(value, "none" if math.isnan(value) else "given")
    if not bounds:
        return Bound(math.nan, "none")
    try:
        return model_bound(model, shape, progress=f"{name} | Lipschitz bound" if progress else "")
    except RobustclipError as err:
        warnings.append(SanityWarning(f"no Lipschitz bound, so no certificate: {err}", name))
        return Bound(math.nan, "none")


def _journaled_bound(name: str, model: nn.Module, shape: Sequence[int],
                     bounds: bool | Mapping[str, float], warnings: list[SanityWarning],
                     journal: Journal | None, digest: str, progress: bool) -> Bound:
    """:func:`_bound_of`, kept in the journal when the bound is computed (minutes for a
    large network)."""
    if journal is None or bounds is not True:
        return _bound_of(name, model, shape, bounds, warnings, progress)
    key = journal.key(digest, "lipschitz bound", tuple(shape))
    saved = journal.get(key, check_bound_record)
    if saved is not None:
        return Bound(saved["value"], saved["kind"])
    bound = _bound_of(name, model, shape, bounds, warnings, progress)
    if bound.kind != "none":
        journal.put(key, {"value": bound.value, "kind": bound.kind})
    return bound


def _evaluate_model(name: str, model: nn.Module, batches: list[tuple[Tensor, Tensor]],
                    specs: Sequence[Spec], seed: int, bounds: bool | Mapping[str, float],
                    progress: bool, evaluation: Evaluation, journal: Journal | None,
                    keep_adversarial: bool) -> None:
    device, ctx = module_device(model), current()
    meta = getattr(model, "robustclip_meta", {})
    shape = tuple(batches[0][0].shape[1:])
    warnings = evaluation.warnings
    digest = model_digest(model) if journal is not None else ""
    bound = on_main(ctx, lambda: _journaled_bound(name, model, shape, bounds, warnings, journal, digest,
                                                   progress))
    twin = float64_twin(model)  # pair ratios in float64: float32 rounding is not Lipschitz
    clean = clean_pass(model, name, batches, warnings, twin)
    labels = torch.cat([y for _, y in batches]).to(device)
    starts = [0, *itertools.accumulate(len(y) for _, y in batches)]
    ratio = clean.ratio
    rows: list[tuple[Spec, Tensor, Tensor | None, float, int, Tensor, Tensor | None]] = []
    mine = my_batches(len(batches), ctx)
    for group in runs(specs):
        start, loaded = time.perf_counter(), 0.0
        keys = stages(group)
        records: dict[int, dict] = {}
        log.debug("%s: %s on %d batches (%s)", name, _bar_label(group), len(mine),
                  ", ".join(f"{k}={v}" for k, v in row_params(group[0]).items()))
        with tqdm(total=sum(len(batches[b][1]) for b in mine), desc=f"{name} | {_bar_label(group)}",
                  unit="img", disable=not (progress and ctx.main), leave=True) as bar:
            for b in mine:
                x, y = batches[b]
                key = journal.key(digest, group, seed, b, tensors=(x, y)) if journal is not None else ""
                record = _replayed(journal, key, len(y), len(keys), x.shape[1:], keep_adversarial)
                if record is not None:
                    loaded += record["seconds"]
                else:
                    began = time.perf_counter()
                    ok, out_clean = (t[starts[b]:starts[b + 1]] for t in (clean.correct, clean.logits))
                    record = _attack_batch(model, name, group, keys, x.to(device), y.to(device),
                                           ok, out_clean, seed, b, twin, keep_adversarial)
                    if journal is not None:  # the copy to the CPU waits for the device
                        record = cpu_copy(record)
                        record["seconds"] = time.perf_counter() - began
                        journal.put(key, record)
                records[b] = record
                bar.update(len(y))
        if ctx.distributed:  # every rank gets every batch's record
            records = {b: r for part in all_gather(cpu_copy(records), ctx) for b, r in part.items()}
        ordered = [records[b] for b in range(len(batches))]
        warnings.extend(SanityWarning(*w) for r in ordered for w in r["warnings"])
        warnings.extend(discarded_warnings(name, {s: sum(r["discarded"][i] for r in ordered)
                                                  for i, s in enumerate(keys)}))
        ratio = torch.maximum(ratio, torch.stack([torch.as_tensor(r["ratio"], device=device,
                                                                  dtype=torch.float64)
                                                  for r in ordered]).max())
        corrects = [torch.cat([r["correct"][i].cpu() for r in ordered]) for i in range(len(keys))]
        seconds = time.perf_counter() - start + loaded  # .cpu() above waited for the device
        clean_ok = before = clean.correct.cpu()
        for i, s in enumerate(keys):
            robust = clean_ok & corrects[i]
            tally = Tally(s)
            for r in ordered:
                tally.merge(r["counts"][i], r["worst"][i])
            broken = (clean_ok if isinstance(s, Cascade) else before) & ~robust
            dist = torch.cat([r["distance"][i].cpu() for r in ordered]).double()
            dist = torch.where(clean_ok & ~robust, dist, torch.full_like(dist, math.nan))
            adv = (torch.cat([r["adversarial"][i].cpu() for r in ordered])
                   if keep_adversarial else None)
            cert = _certified(clean, labels, bound, s, shape)
            broken_cert = 0 if cert is None else int((cert & ~robust).sum())
            warnings.extend(tally.warnings(name, broken_cert))
            rows.append((s, robust, cert, seconds, int(broken.sum()), dist, adv))
            if isinstance(group[0], Cascade) and s is not group[0]:
                before = robust
    empirical = float(ratio)
    refuted = refutation(bound, empirical, [(robust, cert) for _, robust, cert, *_ in rows])
    if refuted:
        warnings.append(SanityWarning(refuted, name))
        bound = Bound(bound.value, "refuted")
        rows = [(s, robust, None, *rest) for s, robust, _, *rest in rows]
    for s, robust_s, cert, seconds, broken, dist, adv in rows:
        cascade = next((g.label for g in specs if isinstance(g, Cascade) and s in g.members), "")
        result = AttackResult(name, meta_name(meta, "method"), s.name, s.label, s.norm, s.eps,
                              row_params(s), seed, clean.correct.cpu(), robust_s, cert,
                              seconds, bound.value, empirical, str(meta.get("ensemble_output", "")),
                              broken, cascade, bound.kind, dist, adv)
        evaluation.results.append(result)
        log.info("%s %s %s eps=%g: clean %.4f robust %.4f", name, s.label, s.norm, s.eps,
                 float(result.clean.double().mean()), float(result.robust.double().mean()))


REFUTE_SLACK = 1e-4
"""A pair ratio above the bound by more than this (relative) refutes it: float32 rounding
of a computed bound stays far below."""


def refutation(bound: Bound, empirical: float,
               rows: Sequence[tuple[Tensor, Tensor | None]]) -> str | None:
    """Why the evaluation itself refutes a sound ``bound`` (None if it does not).

    empirical: the largest pair ratio measured (a lower bound of the Lipschitz constant);
    rows: (robust, certified or None) per sample, per result.  A sound bound is refuted
    when a measured ratio exceeds it by more than :data:`REFUTE_SLACK`, or when a point
    it certifies is broken by an attack: either proves the bound (or the model's own
    arithmetic) wrong, and its certificates are then withdrawn.
    """
    if bound.kind not in SOUND or math.isnan(bound.value):
        return None
    if empirical > bound.value * (1 + REFUTE_SLACK):
        return (f"the Lipschitz bound {bound.value:.6g} ({bound.kind}) is below a measured "
                f"pair ratio {empirical:.6g}: it is wrong, and no certificate rests on it "
                "(certified withdrawn, bound_kind 'refuted')")
    broken = max((int((cert & ~robust).sum()) for robust, cert in rows if cert is not None),
                 default=0)
    if broken:
        return (f"{broken} points certified by the Lipschitz bound {bound.value:.6g} "
                f"({bound.kind}) are broken by an attack: the bound is wrong, and no "
                "certificate rests on it (certified withdrawn, bound_kind 'refuted')")
    return None


def _replayed(journal: Journal | None, key: str, n: int, stages: int, shape: Sequence[int],
              keep_adversarial: bool) -> dict[str, Any] | None:
    """The journaled record of a batch of n samples, checked (``Journal.get``,
    :func:`~robustclip.evaluation.journal.check_batch_record`); None where there is none,
    or where the adversarial examples are to be kept and it has none (the batch is
    attacked again)."""
    record = None if journal is None else journal.get(
        key, lambda r: check_batch_record(r, n, stages, shape))
    if record is not None and keep_adversarial and not kept_adversarial(record):
        return None
    return record


def _bar_label(group: Sequence[Spec]) -> str:
    """'<attack> <norm> eps=<eps>' of one attack run (every eps of an eps-free attack)."""
    eps = ",".join(f"{s.eps:g}" for s in group)
    return f"{group[0].label} {group[0].norm} eps={eps}"


def _attack_batch(model: nn.Module, name: str, group: Sequence[Spec], keys: Sequence[Spec],
                  x: Tensor, y: Tensor, ok: Tensor, out_clean: Tensor, seed: int, batch: int,
                  twin: nn.Module | None, keep_adversarial: bool) -> dict[str, Any]:
    """Attack one batch x (n, C, H, W), y (n,) with one attack run; the record of it.

    Per result key (``keys``, in order): correct (n,) bool: correct on x_adv, or x_adv
    outside the rules; distance (n,): ||x_adv - x|| in the key's norm; the check counters
    and largest distance (:class:`Tally`); the cascade examples discarded; and, with
    ``keep_adversarial``, x_adv.  Also the largest pair ratio (scalar) and the batch's
    sanity warnings.  Tensors stay on the device (no host sync).
    """
    discarded: dict[Spec, Tensor] = {}
    advs = adversarial(model, group, x, y, seed, batch, ok, discarded)
    mode = mode_warning(model, name, f"after {group[0].label}")
    ratio = torch.zeros((), device=x.device, dtype=torch.float64)
    record: dict[str, Any] = {k: [] for k in ("correct", "distance", "counts", "worst", "adversarial")}
    scored: dict[int, tuple[Tensor, Tensor]] = {}  # a cascade's last stage is its result
    with torch.no_grad():
        for s in keys:
            x_adv = advs[s]
            if id(x_adv) not in scored:
                out = model(x_adv)
                if twin is not None:
                    ratio = torch.maximum(ratio, screened_ratio(twin, x_adv, x, out, out_clean))
                scored[id(x_adv)] = out, predicted_correct(out, y)
            out, adv_ok = scored[id(x_adv)]
            dist = distance(x_adv, x, s.norm)
            counts, worst = Tally(s).batch(x, x_adv, out, ok, adv_ok, dist)
            # an example outside the rules (warned by the tally) breaks nothing
            record["correct"].append(adv_ok | ~within_rules(x_adv, x, s.norm, s.eps, dist))
            record["distance"].append(dist.float())
            record["counts"].append(counts)
            record["worst"].append(worst)
            if keep_adversarial:
                record["adversarial"].append(x_adv)
    record.update(ratio=ratio, discarded=[discarded.get(s, 0) for s in keys],
                  warnings=[] if mode is None else [astuple(mode)])
    return record


def _certified(clean: CleanPass, labels: Tensor, bound: Bound, spec: Spec,
               shape: Sequence[int]) -> Tensor | None:
    """Certified per sample, or None where no sound bound exists (an estimate certifies
    nothing: see ``bounds.lipschitz_report``)."""
    if math.isnan(bound.value) or bound.kind not in SOUND:
        return None
    return certified(clean.logits, labels, bound.value,
                     l2_radius(spec.norm, spec.eps, shape)).cpu()


def _combine(evaluation: Evaluation, suite: str | None) -> None:
    """Add a per-sample worst-case row per (model, norm, eps) holding several attacks."""
    groups: dict[tuple, list[AttackResult]] = {}
    for r in evaluation.results:
        if not r.cascade:  # a cascade's own row already holds its members' worst case
            groups.setdefault((r.model, r.norm, r.eps), []).append(r)
    for (model, norm, eps), members in groups.items():
        if len(members) < 2:
            continue
        first = members[0]
        robust = torch.stack([m.robust for m in members]).all(0)
        broke = torch.stack([first.clean & ~m.robust for m in members])  # (members, n)
        dists = torch.stack([m.distance if m.distance is not None
                             else torch.full(robust.shape, math.nan, dtype=torch.float64)
                             for m in members])
        dist = dists.gather(0, broke.byte().argmax(0, keepdim=True)).squeeze(0)  # first to break
        dist = torch.where(broke.any(0), dist, torch.full_like(dist, math.nan))
        evaluation.results.append(AttackResult(
            model, first.method, "suite", suite or "all-attacks", norm, eps,
            {"attacks": [m.attack for m in members]}, first.seed, first.clean, robust,
            first.certified, sum(m.seconds for m in members), first.lipschitz_bound,
            first.lipschitz_empirical, first.ensemble_output,
            int((first.clean & ~robust).sum()), "", first.bound_kind, dist))
