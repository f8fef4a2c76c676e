"""Independent Linf attacks on the models of results/: foolbox's FMN-Linf (200 steps) and
Linf PGD (100 steps, step 0.01 / 0.3 of eps, random start) on the same images as the
headline table, beside the standard evaluation's robust accuracy from that table.

    .venv/bin/python results/compare_linf.py RUN... --limit 1000 --out results/smallcnn-fgsm

Writes independent_linf.csv: model, eps, standard (from results.json), fmn_linf_200,
pgd_linf_100 (foolbox), and standard minus the lower of the two.  tests/test_results.py
checks that no standard cell is more than 0.5 points above either.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import torch

from compare_l2 import foolbox, robust
from robustclip.checkpoint import load_runs
from robustclip.data import test_set
from robustclip.files import atomic_write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--out", required=True, help="the headline folder (its results.json)")
    args = p.parse_args()
    torch.manual_seed(0)
    table = pd.DataFrame(json.loads((Path(args.out) / "results.json").read_text()))
    rows = []
    for name, model in load_runs(args.runs).items():
        for param in model.parameters():
            param.requires_grad_(False)
        x, y = test_set(model.robustclip_meta["dataset"], args.limit)
        for eps in sorted(table[table.norm == "Linf"].eps.unique()):
            standard = table[(table.model == name) & (table.attack == "standard") & (table.eps == eps)]
            fmn = robust(model, foolbox.attacks.LInfFMNAttack(steps=200), x, y, eps, p=math.inf)
            pgd = robust(model, foolbox.attacks.LinfPGD(steps=100), x, y, eps, p=math.inf)
            s = float(standard.robust_acc.iloc[0])
            rows.append({"model": name, "eps": eps, "standard": s, "fmn_linf_200": fmn,
                         "pgd_linf_100": pgd, "standard_minus_best": s - min(fmn, pgd)})
            print(rows[-1], flush=True)
    out = pd.DataFrame(rows)
    atomic_write(Path(args.out) / "independent_linf.csv", lambda tmp: out.to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
