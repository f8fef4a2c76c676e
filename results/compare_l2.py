"""Independent L2 attacks on the models of results/: foolbox's FMN-L2 (200 steps) and
L2 PGD (100 steps) on the same images as the headline table, beside the standard
evaluation's robust accuracy from that table.

    .venv/bin/python results/compare_l2.py RUN... --limit 100 --out results/mnist-simpleconv

Writes independent_l2.csv: model, eps, standard (from results.json), fmn_l2_200,
pgd_l2_100 (foolbox), and standard minus the lower of the two.  tests/test_results.py
checks that no standard cell is more than 0.5 points above either.  compare_linf.py runs
the same at Linf (``main("Linf")``).
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import pandas as pd
import torch

from robustclip.checkpoint import load_runs
from robustclip.data import test_set
from robustclip.files import atomic_write

with warnings.catch_warnings():  # foolbox imports a deprecated scipy module
    warnings.simplefilter("ignore", DeprecationWarning)
    import foolbox


def robust(model, attack, x, y, eps: float, batch: int = 250, p: float = 2) -> float:
    """Fraction of x correct and not fooled by foolbox ``attack`` within ``eps`` in the
    L``p`` norm (2 or inf)."""
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    kept = 0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        with torch.no_grad():
            correct = model(xb).argmax(1) == yb
        _, adv, success = attack(fmodel, xb, yb, epsilons=eps)
        assert float((adv - xb).flatten(1).norm(p=p, dim=1).max()) <= eps * 1.001
        kept += int((correct & ~success).sum())
    return kept / len(x)


#: Per norm: the p of its distance, and the foolbox attacks run, by their column names.
ATTACKS = {"L2": (2, {"fmn_l2_200": lambda: foolbox.attacks.L2FMNAttack(steps=200),
                      "pgd_l2_100": lambda: foolbox.attacks.L2PGD(steps=100)}),
           "Linf": (math.inf, {"fmn_linf_200": lambda: foolbox.attacks.LInfFMNAttack(steps=200),
                               "pgd_linf_100": lambda: foolbox.attacks.LinfPGD(steps=100)})}


def main(norm: str = "L2") -> None:
    """The command line of this script (``norm`` L2) and of compare_linf.py (Linf)."""
    p = argparse.ArgumentParser(description=f"Independent {norm} attacks (foolbox) on the models "
                                "of results/, beside the standard evaluation of their headline table")
    p.add_argument("runs", nargs="+")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--out", required=True, help="the headline folder (its results.json)")
    args = p.parse_args()
    torch.manual_seed(0)
    table = pd.DataFrame(json.loads((Path(args.out) / "results.json").read_text()))
    order, attacks = ATTACKS[norm]
    rows = []
    for name, model in load_runs(args.runs).items():
        for param in model.parameters():
            param.requires_grad_(False)
        x, y = test_set(model.robustclip_meta["dataset"], args.limit)
        for eps in sorted(table[table.norm == norm].eps.unique()):
            standard = table[(table.model == name) & (table.attack == "standard") & (table.eps == eps)]
            left = {label: robust(model, make(), x, y, eps, p=order) for label, make in attacks.items()}
            s = float(standard.robust_acc.iloc[0])
            rows.append({"model": name, "eps": eps, "standard": s, **left,
                         "standard_minus_best": s - min(left.values())})
            print(rows[-1], flush=True)
    out = pd.DataFrame(rows)
    atomic_write(Path(args.out) / f"independent_{norm.lower()}.csv", lambda tmp: out.to_csv(tmp, index=False))


if __name__ == "__main__":
    main()
