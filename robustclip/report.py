"""Results tables: terminal text, CSV / JSON / Markdown files and PNG plots.

One row per (model or ensemble, attack or suite, norm, eps); accuracies are fractions in
[0, 1].  Files are written atomically (temporary file in the out dir, then rename); a
command's results directory is written whole or not at all (:func:`results_dir`).  Every
results directory holds ``environment.json`` (robustclip.environment): the versions,
machine, device, git commit and command line that made it.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib import ticker  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from robustclip.environment import write_environment  # noqa: E402
from robustclip.errors import RobustclipError  # noqa: E402
from robustclip.evaluation.checks import SanityWarning  # noqa: E402
from robustclip.evaluation.evaluate import AttackResult  # noqa: E402
from robustclip.files import TEMP_PREFIX, atomic_write, describe, umask, write_text  # noqa: E402
from robustclip.locks import locked  # noqa: E402

COLUMNS = ["model", "method", "attack", "norm", "eps", "n", "clean_acc", "robust_acc",
           "broken", "certified_acc", "lipschitz_bound", "bound_kind", "lipschitz_empirical",
           "seconds", "seed", "ensemble_output", "params"]


def results_table(results: Sequence[AttackResult]) -> pd.DataFrame:
    """The rows of an evaluation as a DataFrame with :data:`COLUMNS` (params: a dict)."""
    rows = []
    for r in results:
        rows.append({
            "model": r.model, "method": r.method, "attack": r.attack, "norm": r.norm,
            "eps": r.eps, "n": len(r.clean), "clean_acc": float(r.clean.double().mean()),
            "robust_acc": float(r.robust.double().mean()), "broken": r.broken,
            "certified_acc": math.nan if r.certified is None else float(r.certified.double().mean()),
            "lipschitz_bound": r.lipschitz_bound, "bound_kind": r.bound_kind,
            "lipschitz_empirical": r.lipschitz_empirical,
            "seconds": r.seconds, "seed": r.seed, "ensemble_output": r.ensemble_output,
            "params": r.params,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def row_warnings(row: pd.Series | dict, warnings: Sequence[SanityWarning]) -> list[str]:
    """Messages of the warnings that concern ``row`` (same model, attack, eps, or any)."""
    attacks = {row.get("attack")} | set(row.get("params", {}).get("attacks", []) or [])
    out = []
    for w in warnings:
        if w.model not in (None, row.get("model"), row.get("target"), row.get("source")):
            continue
        if w.attack is not None and w.attack not in attacks:
            continue
        if w.eps is not None and w.eps != row.get("eps"):
            continue
        out.append(str(w))
    return out


def format_table(table: pd.DataFrame, drop: Sequence[str] = ("params", "seed")) -> str:
    """Terminal text (4 significant digits), without the params and seed columns."""
    shown = table.drop(columns=[c for c in drop if c in table.columns])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}") if len(shown) else "(no rows)"


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create ``out``; refuse an existing non-empty directory unless ``overwrite``; check
    that a file can be written there (before the long work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RobustclipError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RobustclipError(f"--out {out} is not empty; pass --overwrite to replace its results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = write_text(out / f"{TEMP_PREFIX}probe", "")
        probe.unlink()
    except OSError as err:
        raise RobustclipError(f"cannot write --out {out}: {describe(err)}") from None
    return out


_WORK = f"{TEMP_PREFIX}dir."
"""Sibling directories of a results directory being written start with this."""


JOURNAL = ".journal"
"""The folder of a results directory that journals an evaluation while it runs
(:class:`~robustclip.evaluation.journal.Journal`); gone once the results are in place."""


RESULT_FILES = ("results.csv", "results.json", "results.md", "environment.json", "samples.csv",
                "robust_vs_eps_*.png", "robust_vs_lipschitz.png", "transfer_*.png",
                "lipschitz.csv", "layers.csv", f"{TEMP_PREFIX}*")
"""The files robustclip writes into a results directory (fnmatch patterns, its temporary
files included): all that ``--overwrite`` replaces."""

RESULT_FOLDERS = {"adversarial": ("*.pt", f"{TEMP_PREFIX}*"),
                  JOURNAL: ("*.pt", "*.json", f"{TEMP_PREFIX}*")}
"""The folders of a results directory, each with the files robustclip writes there."""


def _ours(entry: Path, patterns: Sequence[str]) -> bool:
    """Whether ``entry`` is a plain file (not a link) with a name of ``patterns``."""
    return (entry.is_file() and not entry.is_symlink()
            and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns))


def foreign_files(folder: Path) -> list[Path]:
    """The entries of ``folder`` that robustclip does not write into a results directory
    (:data:`RESULT_FILES`, :data:`RESULT_FOLDERS`; a link is foreign), in name order."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name in RESULT_FOLDERS and entry.is_dir() and not entry.is_symlink():
            foreign += [p for p in sorted(entry.iterdir()) if not _ours(p, RESULT_FOLDERS[entry.name])]
        elif not _ours(entry, RESULT_FILES):
            foreign.append(entry)
    return foreign


def _check_replaceable(out: Path, why: str) -> None:
    """Refuse to replace ``out`` if it holds anything robustclip did not write there
    (:func:`foreign_files`); ``why``: what the user may do, for the message."""
    foreign = foreign_files(out)
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise RobustclipError(f"--out {out} holds files robustclip did not write ({names}{more}); "
                              f"only a results directory of robustclip is replaced: {why}")


def _overlap(out: Path, folder: Path) -> str | None:
    """How ``out`` and ``folder`` (both resolved) overlap: 'is', 'lies inside', 'contains'."""
    if out == folder:
        return "is"
    if folder in out.parents:
        return "lies inside"
    return "contains" if out in folder.parents else None


def _check_place(out: Path, data_dir: str | Path | None) -> None:
    """Refuse an ``out`` (resolved) that is, contains or lies inside a training run
    directory (:func:`robustclip.checkpoint.is_run_dir`; of the folders inside ``out``
    only its own entries are looked at) or the data root of ``data_dir``
    (:func:`robustclip.data.data_root`): one line, before anything is written."""
    from robustclip.checkpoint import is_run_dir
    from robustclip.data import data_root

    runs = [folder for folder in (out, *out.parents) if is_run_dir(folder)]
    if out.is_dir():
        runs += [entry for entry in sorted(out.iterdir()) if entry.is_dir() and is_run_dir(entry)]
    places = [(run, "the training run directory") for run in runs]
    places.append((data_root(data_dir).resolve(), "the data root"))
    for folder, what in places:
        relation = _overlap(out, folder)
        if relation:
            raise RobustclipError(f"--out {out} {relation} {what} {folder}; give the results "
                                  f"a folder of their own")


def _open_results(out: Path, overwrite: bool, stack: ExitStack, resume: bool = False,
                  data_dir: str | Path | None = None) -> Path:
    """Check ``out`` (:func:`_check_place`), lock it (on ``stack``), check what it holds,
    make the fresh sibling to write into."""
    if out.exists() and not out.is_dir():
        raise RobustclipError(f"--out {out} exists and is not a directory")
    try:
        _check_place(out, data_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(locked(out, "results directory --out"))
        for left in out.parent.glob(f"{_WORK}{out.name}.*"):  # of a killed command
            shutil.rmtree(left, ignore_errors=True)
        journal = out / JOURNAL
        if resume and not journal.is_dir():
            raise RobustclipError(f"--resume {out}: no interrupted evaluation there (no {JOURNAL} folder)")
        if journal.is_dir() and not (resume or overwrite):
            raise RobustclipError(f"--out {out} holds an interrupted evaluation: continue it with "
                                  f"--resume {out}, or start again with --overwrite")
        if out.is_dir() and any(out.iterdir()):
            if not (overwrite or resume):
                raise RobustclipError(f"--out {out} is not empty; pass --overwrite to replace its results")
            _check_replaceable(out, "move them, or give another --out")
        work = Path(tempfile.mkdtemp(prefix=f"{_WORK}{out.name}.", dir=out.parent))
        stack.callback(shutil.rmtree, work, ignore_errors=True)  # unless swapped into place
        # mkdtemp makes 0700: give the mode a plain mkdir (or the old out) has
        os.chmod(work, (out.stat().st_mode & 0o7777) if out.is_dir() else 0o777 & ~umask())
    except OSError as err:
        raise RobustclipError(f"cannot write --out {out}: {describe(err)}") from None
    return prepare_out_dir(work, overwrite=False)


def _swap(work: Path, out: Path) -> None:
    """Put ``work`` where ``out`` is (an old ``out`` removed once the new one is in place).

    An ``out`` that came to hold files robustclip did not write while the command ran is
    refused (:func:`_check_replaceable`) and left as it was, its journal included."""
    old = work.with_name(work.name + ".old")
    if out.is_dir() and any(out.iterdir()):
        _check_replaceable(out, "the results are not put in place; move them and run the "
                                "command again (attack: --resume reuses the finished batches)")
    try:
        if out.is_dir() and any(out.iterdir()):
            os.rename(out, old)
        os.replace(work, out)  # over a missing or empty directory
    except OSError as err:
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise RobustclipError(f"cannot put the results in place at {out}: {describe(err)}") from None
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def results_dir(out: str | Path | None, overwrite: bool,
                resume: bool = False, data_dir: str | Path | None = None) -> Iterator[Path | None]:
    """The directory to write a command's results into, for the whole command.

    Refuses an ``out`` that is, contains or lies inside a training run directory or the
    data root of ``data_dir`` (:func:`_check_place`).  Takes the lock of ``out``
    (robustclip.locks), refuses a non-empty ``out`` unless ``overwrite``, and one that
    holds anything but the files robustclip writes into a results directory
    (:data:`RESULT_FILES`) in any case; checks that it is writable, and yields a fresh
    sibling directory; when the block succeeds it replaces ``out`` whole (no file of
    earlier results survives), and when it fails ``out`` is left as it was.  ``out``
    None yields None.  Under a process group rank 0 alone locks and swaps; every rank
    gets the same path.

    An evaluation journals its finished batches in ``out``/:data:`JOURNAL`
    (:func:`journal_dir`), which the final swap removes.  ``resume`` continues such an
    interrupted evaluation (its journal is required); a journal without ``resume`` is
    refused unless ``overwrite`` (the new evaluation removes it when it starts journaling,
    ``commands.evaluate_and_write``: a command refused before that leaves it whole).
    """
    from robustclip.distributed import current, on_main

    if out is None:
        yield None
        return
    out, ctx = Path(out).resolve(), current()
    with ExitStack() as stack:
        work = on_main(ctx, lambda: _open_results(out, overwrite, stack, resume, data_dir))
        _FINAL[work] = out
        stack.callback(_FINAL.pop, work, None)
        yield work
        if ctx.main:
            _swap(work, out)


_FINAL: dict[Path, Path] = {}
"""Directory being written (a :func:`results_dir`) -> where it goes at the end."""


def journal_dir(work: str | Path) -> Path:
    """The journal folder of the results directory being written into ``work``."""
    return _FINAL.get(Path(work), Path(work)) / JOURNAL


def _final(paths: list[Path]) -> list[Path]:
    """Where ``paths`` (written into a :func:`results_dir`) will be once it is in place."""
    out = []
    for p in paths:
        work = next((parent for parent in p.parents if parent in _FINAL), None)
        out.append(p if work is None else _FINAL[work] / p.relative_to(work))
    return out


T = TypeVar("T")


def writes_results(command: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run ``command`` (with parameters ``out``, ``overwrite`` and optionally
    ``resume`` and ``data_dir``) inside :func:`results_dir`, its ``out`` replaced by the
    directory to write into."""
    signature = inspect.signature(command)

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> T:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with results_dir(bound.arguments["out"], bool(bound.arguments["overwrite"]),
                         bool(bound.arguments.get("resume", False)),
                         bound.arguments.get("data_dir")) as work:
            bound.arguments["out"] = None if work is None else str(work)
            return command(*bound.args, **bound.kwargs)
    return run


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``table`` (numbers to 4 significant digits)."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_table(out: Path, table: pd.DataFrame, warnings: Sequence[SanityWarning],
                title: str, notes: Sequence[str] = (),
                device: torch.device | str | None = None) -> list[Path]:
    """results.csv, results.json (list of row objects, each with its 'warnings'), results.md
    and environment.json (``device``: where the models ran; None leaves it out).

    The write functions return the paths the files have once the command's
    :func:`results_dir` is in place."""
    from robustclip.distributed import current

    rows = [dict(r) | {"warnings": row_warnings(r, warnings)} for r in table.to_dict("records")]
    csv = table.assign(params=[json.dumps(_jsonable(p), sort_keys=True) for p in table["params"]],
                       warnings=[" | ".join(r["warnings"]) for r in rows])
    written = [
        atomic_write(out / "results.csv", lambda tmp: csv.to_csv(tmp, index=False)),
        write_text(out / "results.json", json.dumps(_jsonable(rows), indent=1, allow_nan=False) + "\n"),
    ]
    md = [f"# {title}", "", markdown(table.assign(params=csv["params"])), ""]
    md += ["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []
    md += ["## Warnings", "", *([f"- {w}" for w in warnings] or ["none"]), ""]
    written.append(write_text(out / "results.md", "\n".join(md)))
    written.append(write_environment(out, device, current().world_size))
    return _final(written)


def write_results(out: Path, table: pd.DataFrame, warnings: Sequence[SanityWarning],
                  notes: Sequence[str] = (), device: torch.device | str | None = None) -> list[Path]:
    """Table files (:func:`write_table`) plus the plots robust_vs_eps_<norm>.png and
    robust_vs_lipschitz.png."""
    written = write_table(out, table, warnings, "Robustness results", notes, device)
    for norm, part in table.groupby("norm"):
        written.append(atomic_write(out / f"robust_vs_eps_{norm}.png",
                               lambda tmp, p=part, n=norm: plot_robust_vs_eps(p, n, tmp)))
    if table["lipschitz_bound"].notna().any():
        written.append(atomic_write(out / "robust_vs_lipschitz.png",
                               lambda tmp: plot_robust_vs_lipschitz(table, tmp)))
    return _final(written)


SAMPLE_COLUMNS = ["model", "attack", "norm", "eps", "index", "label", "clean", "robust",
                  "certified", "broken_by", "distance"]


def _breakers(result: AttackResult, results: Sequence[AttackResult]) -> list[AttackResult]:
    """The rows whose attacks stand behind ``result``, in the order they ran: a cascade's
    stages (up to ``result`` for a stage row), a suite's attacks, or the row itself."""
    same = [r for r in results if (r.model, r.norm, r.eps) == (result.model, result.norm, result.eps)]
    if result.name == "cascade":
        return [r for r in same if r.cascade == result.attack]
    if result.cascade:
        stages = [r for r in same if r.cascade == result.cascade]
        return stages[:next(i for i, r in enumerate(stages) if r is result) + 1]
    if result.name == "suite":
        return [r for r in same if not r.cascade and r.attack in result.params.get("attacks", [])]
    return [result]


def samples_table(results: Sequence[AttackResult], labels: Any) -> pd.DataFrame:
    """One row per (result row, test sample) with :data:`SAMPLE_COLUMNS`.

    labels: the samples' labels (n,).  index: the sample's position in the evaluated set;
    clean / robust: bool; certified: bool, or empty where no sound bound certifies;
    broken_by: the attack that broke the sample first ('' where the sample stayed robust
    or was misclassified clean); distance: the norm of that perturbation (in the row's
    norm, pixel units; empty where not broken).
    """
    parts = []
    labels = pd.Series(labels.cpu().numpy() if hasattr(labels, "cpu") else labels)
    for r in results:
        n = len(r.clean)
        broken_by = pd.Series([""] * n, dtype=object)
        for member in reversed(_breakers(r, results)):  # the first to break wins
            broke = (r.clean & ~member.robust).numpy()
            broken_by[broke] = member.attack
        broken_by[r.robust.numpy()] = ""
        parts.append(pd.DataFrame({
            "model": r.model, "attack": r.attack, "norm": r.norm, "eps": r.eps,
            "index": range(n), "label": labels[:n].to_numpy(), "clean": r.clean.numpy(),
            "robust": r.robust.numpy(),
            "certified": (pd.array([pd.NA] * n, dtype="boolean") if r.certified is None
                          else r.certified.numpy()),
            "broken_by": broken_by.to_numpy(),
            "distance": (r.distance.numpy() if r.distance is not None else math.nan),
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SAMPLE_COLUMNS)


def write_samples(out: Path, samples: pd.DataFrame) -> list[Path]:
    """samples.csv: the per-sample results (:func:`samples_table`)."""
    return _final([atomic_write(out / "samples.csv", lambda tmp: samples.to_csv(tmp, index=False))])


def _file_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def adversarial_names(models: Sequence[str]) -> dict[str, str]:
    """Model label -> its file name under adversarial/ (without ``.pt``): the label with
    each character other than letters, digits and ``._-`` made ``_``; where labels come
    out the same that way, or differ only in case (one file on a case-insensitive disk),
    each of them with ``-`` and 8 hex digits of the label's sha256 added.  Names that
    still collide raise RobustclipError."""
    names = {model: _file_name(model) for model in models}
    count = Counter(name.casefold() for name in names.values())
    names = {model: name if count[name.casefold()] == 1 else
             f"{name}-{hashlib.sha256(model.encode()).hexdigest()[:8]}" for model, name in names.items()}
    if len({name.casefold() for name in names.values()}) < len(names):
        raise RobustclipError(f"models {', '.join(names)} need distinct names for adversarial/")
    return names


def write_adversarial(out: Path, results: Sequence[AttackResult], labels: Any,
                      names: Mapping[str, str] | None = None) -> list[Path]:
    """adversarial/<name>.pt per model (``torch.load(weights_only=True)`` reads it): a dict
    with the model's label, labels (n,) and rows, each {attack, norm, eps, robust (n,),
    x_adv (n, C, H, W)}: the examples each row scored (x itself where its attack left a
    sample alone).  ``names``: model label -> file name (default
    :func:`adversarial_names` of the models of ``results``; give those of every model of
    the command when it writes in several calls)."""
    import torch

    by_model: dict[str, list[dict]] = {}
    for r in results:
        if r.adversarial is not None:
            by_model.setdefault(r.model, []).append(
                {"attack": r.attack, "norm": r.norm, "eps": r.eps, "robust": r.robust,
                 "x_adv": r.adversarial})
    names = adversarial_names(list(by_model)) if names is None else names
    written = []
    for model, rows in by_model.items():
        payload = {"model": model, "labels": labels[:len(rows[0]["robust"])].cpu(), "rows": rows}

        def save(tmp: Path, payload: dict = payload) -> None:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
        path = out / "adversarial" / f"{names[model]}.pt"
        path.parent.mkdir(exist_ok=True)
        written.append(atomic_write(path, save))
    return _final(written)


def write_lipschitz(out: Path, summary: pd.DataFrame, layers: pd.DataFrame,
                    device: torch.device | str | None = None) -> list[Path]:
    """lipschitz.csv (per model: bound, bound_kind, empirical ratio), layers.csv (per
    operator of each model) and environment.json."""
    written = [atomic_write(out / name, lambda tmp, t=t: t.to_csv(tmp, index=False))
               for name, t in (("lipschitz.csv", summary), ("layers.csv", layers))]
    written.append(write_environment(out, device))
    return _final(written)


def _worst(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, norm, eps): the lowest robust accuracy over attacks and suites."""
    return table.loc[table.groupby(["model", "norm", "eps"])["robust_acc"].idxmin()]


_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def plot_robust_vs_eps(table: pd.DataFrame, norm: str, path: str) -> None:
    """Robust accuracy against eps: a colour per model, a line style and a marker per
    attack (cascade stages, '<cascade>:<attack>', are left out: their cascade's line is
    the worst case); each line starts at eps 0 with the model's clean accuracy.  The
    legend sits outside the axes."""
    table = table[~table["attack"].str.contains(":", regex=False)]
    models = list(dict.fromkeys(table["model"]))
    attacks = list(dict.fromkeys(table["attack"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    for (model, attack), part in table.groupby(["model", "attack"], sort=False):
        part = part.sort_values("eps")
        eps = [0.0, *part["eps"]] if part["eps"].min() > 0 else list(part["eps"])
        acc = [part["clean_acc"].iloc[0], *part["robust_acc"]] if part["eps"].min() > 0 \
            else list(part["robust_acc"])
        k = attacks.index(attack)
        ax.plot(eps, acc, marker=_MARKERS[k % len(_MARKERS)], ms=4,
                color=colours(models.index(model) % colours.N), ls=_STYLES[k % len(_STYLES)],
                label=f"{model} / {attack}")
    ax.set(xlabel=f"eps ({norm}, pixel units; 0: clean)", ylabel="robust accuracy",
           ylim=(-0.02, 1.02), title=f"Robust accuracy vs {norm} eps")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              ncol=1 if len(models) * len(attacks) <= 20 else 2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_robust_vs_lipschitz(table: pd.DataFrame, path: str) -> None:
    """Worst-case robust accuracy against each model's Lipschitz bound, one series per
    (norm, eps); each model is named once, at its highest point (no overprinting where
    the series meet at 0)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    worst = _worst(table[table["lipschitz_bound"].notna()])
    for (norm, eps), part in worst.groupby(["norm", "eps"]):
        part = part.sort_values("lipschitz_bound")
        ax.plot(part["lipschitz_bound"], part["robust_acc"], marker="o", label=f"{norm} eps={eps:g}")
    rightmost = worst["lipschitz_bound"].max()
    for model, part in worst.groupby("model", sort=False):
        top = part.loc[part["robust_acc"].idxmax()]
        left = top["lipschitz_bound"] == rightmost  # alone, a model sits right of centre too
        ax.annotate(model, (top["lipschitz_bound"], top["robust_acc"]), fontsize="x-small",
                    xytext=(-3, 4) if left else (3, 4), textcoords="offset points",
                    ha="right" if left else "left")  # the rightmost name inside the frame
    ax.set(xscale="log", xlabel="Lipschitz bound (L2, logits)", ylabel="robust accuracy (worst attack)",
           ylim=(-0.02, 1.08), title="Robust accuracy vs Lipschitz bound")  # room for names at 1.0
    ax.xaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(0, 0)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # plain numbers, no crowded minor labels
    bounds = sorted(worst["lipschitz_bound"].unique())
    if bounds and bounds[-1] < 10 * bounds[0]:  # within a decade no power of 10 is in view:
        ax.set_xticks(bounds, [f"{b:.4g}" for b in bounds])  # label the models' bounds
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_transfer(out: Path, table: pd.DataFrame, warnings: Sequence[SanityWarning],
                   device: torch.device | str | None = None) -> list[Path]:
    """Transfer table files (:func:`write_table`) plus one heatmap
    transfer_<attack>_<eps>.png per matrix."""
    written = write_table(out, table, warnings, "Transfer results",
                          ["accuracy: target correct on x and on x_adv crafted on source; "
                           "diagonal = white-box; 'surrogate': crafted on all other models"], device)
    for (attack, norm, eps), part in table[table.kind != "surrogate"].groupby(
            ["attack", "norm", "eps"], sort=False):
        order = list(dict.fromkeys(part["source"]))  # the models in the order given
        matrix = part.pivot(index="source", columns="target", values="accuracy").loc[order, order]
        name = f"transfer_{attack}_{eps:g}.png".replace("/", "-").replace(" ", "")
        written.append(atomic_write(out / name, lambda tmp, m=matrix, a=attack, n=norm, e=eps:
                                    plot_matrix(m, f"{a}, {n} eps={e:g}", tmp)))
    return _final(written)


def plot_matrix(matrix: pd.DataFrame, title: str, path: str) -> None:
    """Heatmap of a transfer matrix (rows: source, columns: target)."""
    fig, ax = plt.subplots(figsize=(1.2 * len(matrix.columns) + 2, 1.0 * len(matrix) + 1.5))
    im = ax.imshow(matrix.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
    ax.set(xticks=range(len(matrix.columns)), yticks=range(len(matrix)), xlabel="target",
           ylabel="source (crafted on)", title=f"Transfer accuracy, {title}")
    ax.set_xticklabels(matrix.columns, rotation=45, ha="right")
    ax.set_yticklabels(matrix.index)
    for i in range(len(matrix)):
        for j in range(len(matrix.columns)):
            ax.text(j, i, f"{matrix.iat[i, j]:.2f}", ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
