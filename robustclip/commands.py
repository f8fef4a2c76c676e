"""What the commands do: ``robustclip attack``, ``transfer`` and ``lipschitz`` as Python
functions over the API (load runs, build specs, evaluate, print, write).  ``cli.py`` is
a click shell over these; ``report.py`` only renders and writes.
"""
from __future__ import annotations

import collections.abc
import inspect
import json
import shutil
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import click
import pandas as pd
import torch.nn as nn
from torch import Tensor

from robustclip.checkpoint import load_factory, load_runs
from robustclip.data import data_source, test_set
from robustclip.distributed import current, on_main
from robustclip.errors import RobustclipError
from robustclip.evaluation import (Cascade, Ensemble, Evaluation, SanityWarning, check_one_dataset,
                                   evaluate, lipschitz_summary, load_suite, specs_for,
                                   transfer)
from robustclip.evaluation.attacks import CW_EPS_NOTE
from robustclip.evaluation.craft import Spec
from robustclip.evaluation.evaluate import batches_of
from robustclip.evaluation.journal import Journal, model_digest as digest_of
from robustclip.files import write_text
from robustclip.report import (JOURNAL, adversarial_names, format_table, journal_dir,
                               results_table, samples_table, write_adversarial, write_lipschitz,
                               write_results, write_samples, write_transfer, writes_results)
from robustclip.spectral import module_device


def _echo(text: str = "") -> None:
    """Print on stdout; under torchrun on rank 0 only."""
    if current().main:
        click.echo(text)


def attack_specs(eps: Sequence[float], attacks: Sequence[str], suite: str | None,
                 norm: str | None = None, default: str = "standard",
                 overrides: Mapping[str, Any] | None = None) -> tuple[list, str | None]:
    """The specs of a command: a suite's, else each --attack (default ``default``) at each
    --eps in ``norm``; ``overrides`` (--steps, --n-restarts) go to every attack having them.
    An eps given twice (0.1 and 1/10 are one) raises RobustclipError."""
    _check_distinct_eps(eps)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if suite:
        if overrides:
            raise RobustclipError(f"--{next(iter(overrides)).replace('_', '-')} does not apply to "
                                  "a --suite: set the parameter in the suite file")
        loaded = load_suite(suite, list(eps) or None, list(attacks) or None, norm)
        if not loaded.specs:
            among = f" among {', '.join(attacks)}" if attacks else ""
            raise RobustclipError(f"suite {suite} has no {norm} attacks{among}")
        return list(loaded.specs), loaded.name
    if not eps:
        raise RobustclipError("give --eps (one or more) or a --suite")
    return specs_for(list(attacks) or [default], list(eps), norm, **overrides), None


def _check_distinct_eps(eps: Sequence[float]) -> None:
    """Refuse an eps given twice: each would be attacked twice, one row beside the other."""
    twice = next((e for i, e in enumerate(eps) if e in eps[:i]), None)
    if twice is not None:
        raise RobustclipError(f"--eps {twice:g} is given twice; give each budget once")


def _echo_warnings(warnings: Sequence[SanityWarning]) -> None:
    if warnings:
        _echo(f"\nwarnings ({len(warnings)}):")
        for w in warnings:
            _echo(f"  - {w}")


SETTINGS = "attack.json"
"""The file of a journal folder that keeps the ``attack`` command's settings, so that
``--resume OUT`` continues with the same ones."""


_NOT_KEPT = ("out", "overwrite", "resume", "device")
"""The parameters of :func:`attack_command` that the settings leave out (``--resume``
gives them)."""

_PATHS = ("weights", "suite", "data_dir")
"""The settings besides ``runs`` that are paths, kept absolute."""


def saved_settings(out: str | Path) -> dict[str, Any]:
    """The settings an interrupted ``robustclip attack --out OUT`` was started with, checked
    by :func:`settings_problem`; a missing, unreadable or malformed file raises
    RobustclipError saying what is wrong and what to do."""
    path = Path(out) / JOURNAL / SETTINGS
    if not path.is_file():
        raise RobustclipError(f"--resume {out}: no interrupted evaluation there (no {JOURNAL}/{SETTINGS})")
    try:
        settings = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        settings, problem = None, "is not JSON"
    else:
        problem = settings_problem(settings)
    if problem:
        raise RobustclipError(f"--resume {out}: {path} {problem}, so it is not the settings robustclip "
                              f"wrote; restore it, or start the evaluation again with --out {out} "
                              "--overwrite")
    return settings


def settings_problem(settings: Any) -> str | None:
    """What is wrong with ``settings`` (a loaded :data:`SETTINGS` file), or None.

    They must be a JSON object holding exactly the parameters of :func:`attack_command`
    that are kept (all but :data:`_NOT_KEPT`), each fitting its type hint
    (:func:`_fits`), the runs and the :data:`_PATHS` absolute (a relative path would
    resolve in the working directory of the resume), and ``model_digest`` an object."""
    if not isinstance(settings, dict):
        return f"holds a JSON {type(settings).__name__}, not an object"
    hints = _kept_hints()
    missing = [k for k in hints if k not in settings]
    if missing:
        return f"lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
    unknown = [str(k) for k in settings if k not in hints]
    if unknown:
        return f"has unknown keys {', '.join(unknown)}"
    for key, hint in hints.items():
        if not _fits(settings[key], hint):
            return f"holds {key} {json.dumps(settings[key])[:40]}, not {_annotation(key)}"
    relative = [p for p in [*settings["runs"], *(settings[k] for k in _PATHS)]
                if p is not None and not Path(p).is_absolute()]
    if relative:
        return f"holds the relative path {relative[0]!r}"
    if settings["model_digest"] is None:
        return "holds no model_digest"
    return None


def _kept_hints() -> dict[str, Any]:
    """Parameter name -> type hint of the parameters of :func:`attack_command` that the
    settings keep."""
    hints = typing.get_type_hints(attack_command)
    return {name: hints[name] for name in _parameters() if name not in _NOT_KEPT}


def _parameters() -> Mapping[str, inspect.Parameter]:
    return inspect.signature(attack_command).parameters


def _annotation(name: str) -> str:
    """The type of :func:`attack_command`'s parameter ``name`` as written in its signature."""
    return str(_parameters()[name].annotation)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint: a list for a Sequence, an object for a
    Mapping, a number for a float, an integer (not a bool) for an int."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is collections.abc.Sequence:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is collections.abc.Mapping:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1])
                                               for k, v in value.items())
    if hint in (int, float):
        return isinstance(value, (int, hint)) and not isinstance(value, bool)
    return isinstance(value, hint)  # str, bool, NoneType


def _absolute(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the runs and the :data:`_PATHS` given as absolute, resolved paths,
    so that ``--resume`` from another working directory loads the same files."""
    def resolve(path: str) -> str:
        return str(Path(path).expanduser().resolve())
    return settings | {"runs": [resolve(r) for r in settings["runs"]]} | {
        k: resolve(settings[k]) for k in _PATHS if settings[k] is not None}


@writes_results  # lock --out; write a fresh directory, swapped in whole at the end
def attack_command(runs: Sequence[str], eps: Sequence[float], attacks: Sequence[str],
                   suite: str | None, limit: int | None, batch_size: int, seed: int,
                   device: str | None, ensemble: bool, ensemble_output: str,
                   out: str | None, overwrite: bool, data_dir: str | None,
                   norm: str | None = None, quick: bool = False, steps: int | None = None,
                   n_restarts: int | None = None, model: str | None = None,
                   weights: str | None = None, dataset: str | None = None,
                   resume: bool = False, save_adversarial: bool = False,
                   model_digest: Mapping[str, str] | None = None) -> pd.DataFrame:
    """``robustclip attack``: white-box attacks on each run (and their ensemble), per dataset.

    Without attacks or a suite: the standard cascade (AutoAttack's; ``quick``: APGD-CE and
    APGD-T only) in ``norm`` (default Linf) at each eps.  ``model`` 'pkg.module:factory'
    (with ``weights``, on ``dataset``) adds your own model to the runs.  With ``out``
    every finished batch is journaled there, with the settings (:data:`SETTINGS`: the
    paths absolute, ``model_digest`` the models' digests); ``resume`` continues an
    interrupted evaluation (:func:`saved_settings` gives the settings it was started with).
    ``model_digest``: label -> :func:`~robustclip.evaluation.journal.model_digest` of the
    models (the runs, then ``model``) as the evaluation started; a model that differs
    raises RobustclipError naming its run (:func:`_as_started`).  Nothing is journaled
    before the options, specs, runs and data are checked.
    """
    settings = _absolute({k: v for k, v in locals().items() if k not in _NOT_KEPT})
    specs, suite_name = attack_specs(eps, attacks, suite, norm, "quick" if quick else "standard",
                                     {"steps": steps, "n_restarts": n_restarts})
    if (model is None) != (dataset is None):
        raise RobustclipError("--model pkg.module:factory needs --dataset (and --dataset a --model)")
    if weights and not model:
        raise RobustclipError("--weights goes with --model")
    if not runs and not model:
        raise RobustclipError("give RUNs (run dirs or checkpoints) or --model pkg.module:factory")
    models, sources = load_runs(runs, device), list(runs)
    if model:
        label, own = load_factory(model, weights, dataset, device)
        if label in models:
            raise RobustclipError(f"--model {model}: a run is already named {label}")
        models[label] = own
        sources.append(f"--model {model}")
    if model_digest is None:
        settings["model_digest"] = {label: digest_of(m) for label, m in models.items()}
    else:
        models = _as_started(models, sources, model_digest)
    if ensemble:
        check_one_dataset(list(models.values()))
        models[f"ensemble({','.join(models)};{ensemble_output})"] = Ensemble(
            list(models.values()), ensemble_output)
    by_dataset: dict[str, dict] = {}
    for label, m in models.items():
        by_dataset.setdefault(data_source(m.robustclip_meta), {})[label] = m
    data = {ds: test_set(ds, limit, data_dir) for ds in by_dataset}  # bad --limit fails early
    return evaluate_and_write(by_dataset, data, specs, suite_name, batch_size=batch_size,
                              seed=seed, ensemble_output=ensemble_output if ensemble else None,
                              out=out, resume=resume,
                              save_adversarial=save_adversarial, settings=settings)


def _as_started(models: Mapping[str, nn.Module], sources: Sequence[str],
                started: Mapping[str, str]) -> dict[str, nn.Module]:
    """The models of a resumed evaluation (loaded from ``sources``: the runs, then
    --model) under the labels it started with: ``started`` maps those labels, in the same
    order, to the model digests the models had then.  A model whose digest differs (its
    run was retrained, overwritten or replaced) raises RobustclipError naming its run."""
    if len(started) != len(models):
        raise RobustclipError(f"the interrupted evaluation started with {len(started)} models, "
                              f"not {len(models)}; start it again with --overwrite")
    for (label, digest), source, m in zip(started.items(), sources, models.values()):
        if digest_of(m) != digest:
            raise RobustclipError(f"run {source} ({label}) is not the model the interrupted evaluation "
                                  "started with (its class or weights changed); restore it, or "
                                  "start the evaluation again with --overwrite")
    return dict(zip(started, models.values()))


def evaluate_and_write(by_dataset: Mapping[str, Mapping[str, nn.Module]],
                       data: Mapping[str, tuple[Tensor, Tensor]], specs: Sequence[Spec],
                       suite_name: str | None, *, batch_size: int, seed: int,
                       ensemble_output: str | None, out: str | None, resume: bool = False,
                       save_adversarial: bool = False,
                       settings: Mapping[str, Any] | None = None,
                       bounds: bool | Mapping[str, float] = True, echo: bool = True) -> pd.DataFrame:
    """Evaluate each dataset's models on its (images, labels); print the table (``echo``)
    and, with ``out`` (a :func:`~robustclip.report.results_dir`), write it with samples.csv
    (and adversarial/), journaling every finished batch meanwhile (``settings``: what
    ``--resume`` needs to continue).  The batch size and the data are checked as
    :func:`~robustclip.evaluation.evaluate` checks them before anything is journaled.
    ``bounds``: as :func:`~robustclip.evaluation.evaluate`'s."""
    for images, labels in data.values():
        batches_of(images, labels, batch_size)  # raises RobustclipError
    out_dir = Path(out) if out and current().main else None  # rank 0 alone writes
    journal = None
    if out:
        if not resume:
            on_main(current(), lambda: _start_journal(journal_dir(out), settings))
        journal = Journal(journal_dir(out))
    say = _echo if echo else (lambda text="": None)
    names = adversarial_names([label for group in by_dataset.values() for label in group]) \
        if save_adversarial else {}  # one file each, whichever dataset a model is of
    total, samples = Evaluation([]), []
    for ds, group in by_dataset.items():
        images, labels = data[ds]
        part = evaluate(group, images, labels, specs, suite=suite_name, batch_size=batch_size,
                        seed=seed, bounds=bounds, progress=echo, journal=journal,
                        keep_adversarial=save_adversarial)
        total.results += part.results
        total.warnings += part.warnings
        if out_dir:
            samples.append(samples_table(part.results, labels))
            if save_adversarial:
                for path in write_adversarial(out_dir, part.results, labels, names):
                    say(f"wrote {path}")
    table = results_table(total.results)
    table.attrs["warnings"] = [str(w) for w in total.warnings]
    say(format_table(table))
    if echo:
        _echo_warnings(total.warnings)
    if out_dir:
        ran_on = module_device(next(iter(next(iter(by_dataset.values())).values())))
        for path in write_results(out_dir, table, total.warnings, _notes(specs, ensemble_output),
                                  ran_on):  # the device, for environment.json
            say(f"wrote {path}")
        for path in write_samples(out_dir, pd.concat(samples, ignore_index=True)):
            say(f"wrote {path}")
    return table


def _start_journal(folder: Path, settings: Mapping[str, Any] | None) -> None:
    """Start the journal of a new evaluation in ``folder``: remove that of an earlier one
    (which ``--overwrite`` replaces) and write ``settings`` (:data:`SETTINGS`) there."""
    shutil.rmtree(folder, ignore_errors=True)
    if settings is not None:
        folder.mkdir(parents=True)
        write_text(folder / SETTINGS, json.dumps(settings, indent=1) + "\n")


def _notes(specs: Sequence[Spec], ensemble_output: str | None) -> list[str]:
    """The notes under a results table: what its columns and rows mean."""
    notes = ["accuracies are fractions; robust = correct on x and on x_adv; a suite row is "
             "the per-sample worst case over its attacks; broken: the clean-correct samples "
             "the row's attack broke"]
    cascades = list(dict.fromkeys(s.label for s in specs if isinstance(s, Cascade)))
    if cascades:
        notes.append(f"cascades ({', '.join(cascades)}): each attack runs only on the points "
                     "still robust; a '<cascade>:<attack>' row gives the robust accuracy after "
                     "that stage and the points that stage broke; the '<cascade>' row is the "
                     "per-sample worst case")
    notes.append("certified: margin > sqrt(2) * bound * radius, only where bound_kind is "
                 "exact or upper (a guaranteed bound); an estimate certifies nothing")
    if any(s.name == "cw" for s in specs):
        notes.append(f"CW eps: {CW_EPS_NOTE}")
    if ensemble_output:
        notes.append(f"ensemble output: {ensemble_output} ('softmax': log of the mean member "
                     "softmax, used for the loss; 'logits': mean of member logits)")
    notes.append("samples.csv: one row per (table row, test sample): clean, robust, certified, "
                 "the attack that broke it first and the norm of that perturbation")
    return notes


@writes_results
def transfer_command(runs: Sequence[str], eps: Sequence[float], attacks: Sequence[str],
                     suite: str | None, limit: int | None, batch_size: int, seed: int,
                     device: str | None, ensemble_output: str, out: str | None,
                     overwrite: bool, data_dir: str | None, surrogates: bool = True,
                     norm: str | None = None, steps: int | None = None,
                     n_restarts: int | None = None) -> pd.DataFrame:
    """``robustclip transfer``: N x N transfer matrices and surrogate-ensemble rows (PGD
    by default, the standard for transfer)."""
    specs, _ = attack_specs(eps, attacks, suite, norm, "pgd" if norm != "L2" else "pgdl2",
                            {"steps": steps, "n_restarts": n_restarts})
    out_dir = Path(out) if out else None  # prepared by @writes_results
    models = load_runs(runs, device)
    dataset = check_one_dataset(list(models.values()))
    result = transfer(models, *test_set(dataset, limit, data_dir), specs,
                      batch_size=batch_size, seed=seed, ensemble_output=ensemble_output,
                      surrogates=surrogates, progress=True)
    table = result.table
    for (attack, e), part in table.groupby(["attack", "eps"], sort=False):
        _echo(f"\n{attack} eps={e:g}: accuracy of target (columns) on examples crafted on "
              "source (rows); diagonal = white-box")
        _echo(result.matrix(attack, e).to_string(float_format=lambda v: f"{v:.4f}"))
        surrogate = part[part.kind == "surrogate"]
        if len(surrogate):
            _echo(f"crafted on the {ensemble_output} ensemble of all other models:")
            _echo(surrogate[["target", "accuracy", "clean_acc"]].to_string(
                index=False, float_format=lambda v: f"{v:.4f}"))
    _echo_warnings(result.warnings)
    if out_dir:
        ran_on = module_device(next(iter(models.values())))  # for environment.json
        for path in write_transfer(out_dir, table, result.warnings, ran_on):
            _echo(f"wrote {path}")
    return table


@writes_results
def lipschitz_command(runs: Sequence[str], limit: int | None, batch_size: int, seed: int,
                      device: str | None, tol: float, data_dir: str | None,
                      out: str | None = None, overwrite: bool = False) -> pd.DataFrame:
    """``robustclip lipschitz``: per-layer sigmas, the network bound, the empirical ratio;
    with ``out``: lipschitz.csv (the summary), layers.csv (every model's operators) and
    environment.json."""
    models = load_runs(runs, device)
    rows, layers = [], []
    for label, model in models.items():
        source = data_source(model.robustclip_meta)  # a synthetic run: its own test split
        images, labels = (t[: limit or 256] for t in test_set(source, limit, data_dir))
        summary, per_layer = lipschitz_summary({label: model}, images, labels, batch_size=batch_size,
                                               seed=seed, tol=tol, progress=f"{label} | Lipschitz bound")
        _echo(f"\n{label}:")
        _echo(format_table(per_layer[label]))
        rows.append(summary)
        layers.append(per_layer[label].assign(model=label))
    summary = pd.concat(rows, ignore_index=True)
    _echo("\nsigma: PowerQR's estimate (a lower bound); sigma_upper: exact or a guaranteed "
          "upper bound; bound: product/sum of sigma_upper (bound_kind upper: a guaranteed "
          "upper bound; estimate: some layer had only PowerQR's value, no certificate); "
          "empirical: largest ||f(x)-f(x')|| / ||x-x'|| over test pairs and PGD-L2 pairs "
          "(a lower bound)")
    _echo(format_table(summary))
    if out and current().main:
        table = pd.concat(layers, ignore_index=True)
        table = table[["model", *[c for c in table.columns if c != "model"]]]
        for path in write_lipschitz(Path(out), summary, table,
                                    module_device(next(iter(models.values())))):
            _echo(f"wrote {path}")
    return summary
