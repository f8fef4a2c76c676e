"""Results tables: terminal text, CSV / JSON / Markdown files and PNG plots.

One row per (model or ensemble, attack or suite, norm, eps); accuracies are fractions in
[0, 1].  Files are written atomically (temporary file in the out dir, then rename).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import pandas as pd  # noqa: E402

from robustclip.errors import RobustclipError  # noqa: E402
from robustclip.harness import CW_EPS_NOTE as CW_NOTE, AttackResult, SanityWarning  # noqa: E402

COLUMNS = ["model", "method", "attack", "norm", "eps", "n", "clean_acc", "robust_acc",
           "certified_acc", "lipschitz_bound", "lipschitz_empirical", "seconds", "seed",
           "ensemble_output", "params"]


def results_table(results: Sequence[AttackResult]) -> pd.DataFrame:
    """The rows of an evaluation as a DataFrame with :data:`COLUMNS` (params: a dict)."""
    rows = []
    for r in results:
        rows.append({
            "model": r.model, "method": r.method, "attack": r.attack, "norm": r.norm,
            "eps": r.eps, "n": len(r.clean), "clean_acc": float(r.clean.double().mean()),
            "robust_acc": float(r.robust.double().mean()),
            "certified_acc": math.nan if r.certified is None else float(r.certified.double().mean()),
            "lipschitz_bound": r.lipschitz_bound, "lipschitz_empirical": r.lipschitz_empirical,
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
    """Create ``out``; refuse an existing non-empty directory unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RobustclipError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RobustclipError(f"--out {out} is not empty; pass --overwrite to replace its results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _atomic(path: Path, write: Callable[[str], Any]) -> Path:
    """Call ``write`` with a temporary path beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _text(path: Path, text: str) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


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
                title: str, notes: Sequence[str] = ()) -> list[Path]:
    """results.csv, results.json (list of row objects, each with its 'warnings'), results.md."""
    rows = [dict(r) | {"warnings": row_warnings(r, warnings)} for r in table.to_dict("records")]
    csv = table.assign(params=[json.dumps(_jsonable(p), sort_keys=True) for p in table["params"]],
                       warnings=[" | ".join(r["warnings"]) for r in rows])
    written = [
        _atomic(out / "results.csv", lambda tmp: csv.to_csv(tmp, index=False)),
        _text(out / "results.json", json.dumps(_jsonable(rows), indent=1, allow_nan=False) + "\n"),
    ]
    md = [f"# {title}", "", markdown(table.assign(params=csv["params"])), ""]
    md += ["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []
    md += ["## Warnings", "", *([f"- {w}" for w in warnings] or ["none"]), ""]
    written.append(_text(out / "results.md", "\n".join(md)))
    return written


def write_results(out: Path, table: pd.DataFrame, warnings: Sequence[SanityWarning],
                  notes: Sequence[str] = ()) -> list[Path]:
    """Table files plus the plots robust_vs_eps_<norm>.png and robust_vs_lipschitz.png."""
    written = write_table(out, table, warnings, "Robustness results", notes)
    for norm, part in table.groupby("norm"):
        written.append(_atomic(out / f"robust_vs_eps_{norm}.png",
                               lambda tmp, p=part, n=norm: plot_robust_vs_eps(p, n, tmp)))
    if table["lipschitz_bound"].notna().any():
        written.append(_atomic(out / "robust_vs_lipschitz.png",
                               lambda tmp: plot_robust_vs_lipschitz(table, tmp)))
    return written


def _worst(table: pd.DataFrame) -> pd.DataFrame:
    """Per (model, norm, eps): the lowest robust accuracy over attacks and suites."""
    return table.loc[table.groupby(["model", "norm", "eps"])["robust_acc"].idxmin()]


def plot_robust_vs_eps(table: pd.DataFrame, norm: str, path: str) -> None:
    """Robust accuracy against eps: a colour per model, a line style per attack; each line
    starts at eps 0 with the model's clean accuracy."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = list(dict.fromkeys(table["model"]))
    attacks = list(dict.fromkeys(table["attack"]))
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for (model, attack), part in table.groupby(["model", "attack"], sort=False):
        part = part.sort_values("eps")
        eps = [0.0, *part["eps"]] if part["eps"].min() > 0 else list(part["eps"])
        acc = [part["clean_acc"].iloc[0], *part["robust_acc"]] if part["eps"].min() > 0 \
            else list(part["robust_acc"])
        ax.plot(eps, acc, marker="o", ms=3, color=colours(models.index(model) % colours.N),
                ls=styles[attacks.index(attack) % len(styles)], label=f"{model} / {attack}")
    ax.set(xlabel=f"eps ({norm}, pixel units; 0: clean)", ylabel="robust accuracy",
           ylim=(-0.02, 1.02), title=f"Robust accuracy vs {norm} eps")
    ax.legend(fontsize="x-small", loc="upper right", ncol=1 if len(models) * len(attacks) <= 12 else 2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_robust_vs_lipschitz(table: pd.DataFrame, path: str) -> None:
    """Worst-case robust accuracy against each model's Lipschitz bound, one series per eps."""
    fig, ax = plt.subplots(figsize=(6, 4))
    worst = _worst(table[table["lipschitz_bound"].notna()])
    for (norm, eps), part in worst.groupby(["norm", "eps"]):
        part = part.sort_values("lipschitz_bound")
        ax.plot(part["lipschitz_bound"], part["robust_acc"], marker="o", label=f"{norm} eps={eps:g}")
        for _, r in part.iterrows():
            ax.annotate(r["model"], (r["lipschitz_bound"], r["robust_acc"]), fontsize="x-small")
    ax.set(xscale="log", xlabel="Lipschitz bound (L2, logits)", ylabel="robust accuracy (worst attack)",
           ylim=(-0.02, 1.02), title="Robust accuracy vs Lipschitz bound")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_transfer(out: Path, table: pd.DataFrame, warnings: Sequence[SanityWarning]) -> list[Path]:
    """Transfer table files plus one heatmap transfer_<attack>_<eps>.png per matrix."""
    written = write_table(out, table, warnings, "Transfer results",
                          ["accuracy: target correct on x and on x_adv crafted on source; "
                           "diagonal = white-box; 'surrogate': crafted on all other models"])
    for (attack, eps), part in table[table.kind != "surrogate"].groupby(["attack", "eps"]):
        matrix = part.pivot(index="source", columns="target", values="accuracy")
        name = f"transfer_{attack}_{eps:g}.png".replace("/", "-").replace(" ", "")
        written.append(_atomic(out / name, lambda tmp, m=matrix, a=attack, e=eps:
                               plot_matrix(m, f"{a} eps={e:g}", tmp)))
    return written


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


# ============================================================== the commands


def _echo(text: str = "") -> None:
    """Print on stdout; under torchrun on rank 0 only."""
    import click

    from robustclip.distributed import current

    if current().main:
        click.echo(text)


def _specs(eps: Sequence[float], attacks: Sequence[str], suite: str | None) -> tuple[list, str | None]:
    from robustclip.harness import load_suite, specs_for

    if suite:
        loaded = load_suite(suite, list(eps) or None, list(attacks) or None)
        return list(loaded.specs), loaded.name
    if not eps:
        raise RobustclipError("give --eps (one or more) or a --suite")
    return specs_for(list(attacks) or ["pgd"], list(eps)), None


def _echo_warnings(warnings: Sequence[SanityWarning]) -> None:
    if warnings:
        _echo(f"\nwarnings ({len(warnings)}):")
        for w in warnings:
            _echo(f"  - {w}")


def attack_command(runs: Sequence[str], eps: Sequence[float], attacks: Sequence[str],
                   suite: str | None, limit: int | None, batch_size: int, seed: int,
                   device: str | None, ensemble: bool, ensemble_output: str,
                   out: str | None, overwrite: bool, data_dir: str | None) -> pd.DataFrame:
    """``robustclip attack``: white-box attacks on each run (and their ensemble), per dataset."""
    from robustclip.distributed import current, on_main
    from robustclip.harness import (Ensemble, Evaluation, check_one_dataset, evaluate,
                                    load_runs, test_set)

    specs, suite_name = _specs(eps, attacks, suite)
    out_dir = on_main(current(), lambda: prepare_out_dir(out, overwrite)) if out else None
    out_dir = out_dir if current().main else None  # under torchrun rank 0 alone writes
    models = load_runs(runs, device)
    if ensemble:
        check_one_dataset(list(models.values()))
        models[f"ensemble({','.join(models)};{ensemble_output})"] = Ensemble(
            list(models.values()), ensemble_output)
    by_dataset: dict[str, dict] = {}
    for label, model in models.items():
        by_dataset.setdefault(model.robustclip_meta["dataset"], {})[label] = model
    total = Evaluation([])
    data = {ds: test_set(ds, limit, data_dir) for ds in by_dataset}  # bad --limit fails early
    for ds, group in by_dataset.items():
        part = evaluate(group, *data[ds], specs, suite=suite_name, batch_size=batch_size,
                        seed=seed, progress=True)
        total.results += part.results
        total.warnings += part.warnings
    table = results_table(total.results)
    _echo(format_table(table))
    _echo_warnings(total.warnings)
    notes = ["accuracies are fractions; robust = correct on x and on x_adv; a suite row is "
             "the per-sample worst case over its attacks"]
    if any(s.name == "cw" for s in specs):
        notes.append(f"CW eps: {CW_NOTE}")
    if ensemble:
        notes.append(f"ensemble output: {ensemble_output} ('softmax': log of the mean member "
                     "softmax, used for the loss; 'logits': mean of member logits)")
    if out_dir:
        for path in write_results(out_dir, table, total.warnings, notes):
            _echo(f"wrote {path}")
    return table


def transfer_command(runs: Sequence[str], eps: Sequence[float], attacks: Sequence[str],
                     suite: str | None, limit: int | None, batch_size: int, seed: int,
                     device: str | None, ensemble_output: str, out: str | None,
                     overwrite: bool, data_dir: str | None, surrogates: bool = True) -> pd.DataFrame:
    """``robustclip transfer``: N x N transfer matrices and surrogate-ensemble rows."""
    from robustclip.harness import check_one_dataset, load_runs, test_set, transfer

    specs, _ = _specs(eps, attacks, suite)
    out_dir = prepare_out_dir(out, overwrite) if out else None
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
        for path in write_transfer(out_dir, table, result.warnings):
            _echo(f"wrote {path}")
    return table


def lipschitz_command(runs: Sequence[str], limit: int | None, batch_size: int, seed: int,
                      device: str | None, tol: float, data_dir: str | None) -> pd.DataFrame:
    """``robustclip lipschitz``: per-layer sigmas, the network bound, the empirical ratio."""
    from robustclip.harness import lipschitz_summary, load_runs, test_set

    models = load_runs(runs, device)
    rows = []
    for label, model in models.items():
        images, labels = test_set(model.robustclip_meta["dataset"], limit or 256, data_dir)
        summary, layers = lipschitz_summary({label: model}, images, labels,
                                            batch_size=batch_size, seed=seed, tol=tol)
        _echo(f"\n{label}:")
        _echo(format_table(layers[label]))
        rows.append(summary)
    summary = pd.concat(rows, ignore_index=True)
    _echo("\nbound: product/sum of layer sigmas (an upper bound); empirical: largest "
          "||f(x)-f(x')|| / ||x-x'|| over test pairs and PGD-L2 pairs (a lower bound)")
    _echo(format_table(summary))
    return summary
