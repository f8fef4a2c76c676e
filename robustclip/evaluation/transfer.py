"""Transfer: an N x N matrix of adversarial examples crafted on one model and scored on
another (diagonal: white-box), plus surrogate-ensemble -> target rows (TRS, Yang et al.
2021)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from robustclip.evaluation.attacks import AttackSpec
from robustclip.evaluation.checks import SanityWarning, Tally, mode_warning, weaker_than_transfer
from robustclip.evaluation.craft import adversarial, evaluating, row_params, runs
from robustclip.evaluation.ensemble import Ensemble, check_one_dataset
from robustclip.certificates import predicted_correct
from robustclip.evaluation.evaluate import CleanPass, batches_of, clean_pass
from robustclip.spectral import module_device


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
    batches = batches_of(images, labels, batch_size)
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
        for group in runs(specs):
            for src, (src_model, targets) in sources.items():
                eps = ",".join(f"{s.eps:g}" for s in group)
                with tqdm(total=len(images), desc=f"transfer from {src} | {group[0].label} "
                          f"{group[0].norm} eps={eps}", unit="img", disable=not progress) as bar:
                    rows += _transfer_rows(src, src_model, targets, models, cleans, group,
                                           batches, seed, warnings, bar)
    table = pd.DataFrame(rows)
    warnings += weaker_than_transfer(table)
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
            mode = mode_warning(model, name, f"after {group[0].label} on {src}")
            if mode:
                warnings.append(mode)
        with torch.no_grad():
            src_ok = predicted_correct(src_model(x), y)
            for s in group:  # a cascade: its final examples
                x_adv = advs[s]
                out = src_model(x_adv)
                tallies[s].add(x, x_adv, out, src_ok, predicted_correct(out, y))
                for t in targets:
                    t_device = module_device(models[t])
                    ok = cleans[t].correct[offset:offset + len(x)]
                    adv_ok = predicted_correct(models[t](x_adv.to(t_device)), y.to(t_device))
                    correct[(s, t)].append(ok & adv_ok)
        offset += len(x)
        bar.update(len(x))
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
                         "seconds": seconds, "seed": seed, "params": row_params(s)})
    return rows
