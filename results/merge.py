"""Merge the results folders of several `robustclip attack` runs (one model each, run side
by side on a 2-core machine) into one folder: the rows in the given order, each with the
warnings its own run gave it, and the same files and plots one command would write (and
their independent_l2.csv and independent_linf.csv of results/compare_l2.py and
compare_linf.py, joined).

    .venv/bin/python results/merge.py FOLDER... --out results/mnist-simpleconv

No number is computed here: rows are copied as their runs wrote them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from robustclip.files import atomic_write, write_text
from robustclip.report import markdown, plot_robust_vs_eps, plot_robust_vs_lipschitz


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for f in args.folders for r in json.loads((Path(f) / "results.json").read_text())]
    csv = pd.concat([pd.read_csv(Path(f) / "results.csv") for f in args.folders], ignore_index=True)
    atomic_write(out / "results.csv", lambda tmp: csv.to_csv(tmp, index=False))
    write_text(out / "results.json", json.dumps(rows, indent=1, allow_nan=False) + "\n")
    notes = [line for line in (Path(args.folders[0]) / "results.md").read_text().splitlines()
             if line.startswith("- ") and "## Warnings" not in line]
    warnings = sorted({w for r in rows for w in r["warnings"]})
    table = csv.drop(columns="warnings")
    md = ["# Robustness results", "", markdown(table), "",
          "## Notes", "", *dict.fromkeys(n for n in notes if n[2:] not in warnings), "",
          "## Warnings", "", *([f"- {w}" for w in warnings] or ["none"]), ""]
    write_text(out / "results.md", "\n".join(md))
    for norm, part in table.groupby("norm"):
        atomic_write(out / f"robust_vs_eps_{norm}.png",
                     lambda tmp, p=part, n=norm: plot_robust_vs_eps(p, n, tmp))
    atomic_write(out / "robust_vs_lipschitz.png", lambda tmp: plot_robust_vs_lipschitz(table, tmp))
    environments = [json.loads((Path(f) / "environment.json").read_text()) for f in args.folders
                    if (Path(f) / "environment.json").exists()]  # written by each run
    if environments:
        write_text(out / "environment.json", json.dumps(environments, indent=1) + "\n")
    for name in ("independent_l2.csv", "independent_linf.csv"):  # compare_l2.py, compare_linf.py
        independent = [Path(f) / name for f in args.folders if (Path(f) / name).exists()]
        if independent:  # the folders that have one
            joined = pd.concat([pd.read_csv(f) for f in independent], ignore_index=True)
            atomic_write(out / name, lambda tmp, j=joined: j.to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
