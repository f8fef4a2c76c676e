"""Every table in results/ is internally consistent (and the check itself can fail)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "results"
TABLES = sorted(RESULTS.rglob("results.json"))


def transfer_inconsistencies(rows: list[dict]) -> list[str]:
    """Transfer tables: 0 <= accuracy <= clean (accuracy counts samples correct on x and x_adv).

    "White-box at least as strong as transfer" is a heuristic (PGD is not optimal): the
    harness reports it as a warning in the table, it is not asserted here.
    """
    problems = []
    for i, r in enumerate(rows):
        where = f"row {i} ({r['source']} -> {r['target']}, {r['attack']} eps={r['eps']})"
        if not 0.0 <= r["accuracy"] <= r["clean_acc"] + 1e-12:
            problems.append(f"{where}: accuracy {r['accuracy']} outside [0, clean {r['clean_acc']}]")
    return problems


def inconsistencies(rows: list[dict]) -> list[str]:
    """Plain-words problems of a results table: certified <= robust <= clean, bound >= empirical."""
    if rows and "source" in rows[0]:
        return transfer_inconsistencies(rows)
    problems = []
    for i, row in enumerate(rows):
        where = f"row {i} ({row.get('model')}, {row.get('attack')}, {row.get('norm')} eps={row.get('eps')})"
        clean, robust, cert = row["clean_acc"], row["robust_acc"], row["certified_acc"]
        fractions = (("clean_acc", clean), ("robust_acc", robust)) + \
            ((("certified_acc", cert),) if cert is not None else ())  # None: no bound, no certificate
        bad = [name for name, value in fractions
               if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0)]
        problems += [f"{where}: {name} {row[name]!r} is not a fraction in [0, 1]" for name in bad]
        if bad:
            continue
        if not robust <= clean + 1e-12:
            problems.append(f"{where}: robust {robust} > clean {clean}")
        if cert is not None and not (isinstance(cert, float) and math.isnan(cert)) and not cert <= robust + 1e-12:
            problems.append(f"{where}: certified {cert} > robust {robust}")
        bound, empirical = row.get("lipschitz_bound"), row.get("lipschitz_empirical")
        if all(isinstance(v, (int, float)) and not math.isnan(v) for v in (bound, empirical)):
            if not bound >= empirical:
                problems.append(f"{where}: Lipschitz bound {bound} < empirical {empirical}")
        if row.get("n", 0) <= 0:
            problems.append(f"{where}: no samples")
        kind = row.get("bound_kind")
        if kind is not None and kind not in ("exact", "upper", "given") and cert:
            problems.append(f"{where}: certified {cert} from a bound that is only an {kind}")
    return problems


def weaker_than_reference(rows: list[dict]) -> list[str]:
    """Cells where the standard evaluation leaves more robust than PGD at the same model,
    norm and eps and the table does not say so (the harness's ``cascade_missed`` warning
    on the standard row: the cascade is not a per-sample worst case, and a point it missed
    must be reported, never hidden)."""
    if rows and "source" in rows[0]:
        return []  # a transfer table
    problems = []
    standard = {(r["model"], r["norm"], r["eps"]): r for r in rows if r["attack"] == "standard"}
    for r in rows:
        key = (r["model"], r["norm"], r["eps"])
        if r["attack"].startswith("pgd") and key in standard \
                and standard[key]["robust_acc"] > r["robust_acc"] + 1e-12:
            said = f"survived the standard cascade but fell to {r['attack']}"
            if not any(said in w for w in standard[key].get("warnings", [])):
                problems.append(f"{key}: standard {standard[key]['robust_acc']} > {r['attack']} "
                                f"{r['robust_acc']}, and the table does not say so")
    return problems


def test_checker_catches_each_kind_of_inconsistency():
    good = {"model": "m", "attack": "pgd", "norm": "Linf", "eps": 0.1, "n": 10, "clean_acc": 0.9,
            "robust_acc": 0.5, "certified_acc": 0.2, "lipschitz_bound": 3.0, "lipschitz_empirical": 1.0}
    assert inconsistencies([good]) == []
    assert inconsistencies([{**good, "certified_acc": None, "lipschitz_bound": None}]) == []
    for change in ({"robust_acc": 0.95}, {"certified_acc": 0.6}, {"lipschitz_bound": 0.5},
                   {"clean_acc": 1.2}, {"n": 0}, {"certified_acc": 1.5}, {"robust_acc": None}):
        assert inconsistencies([{**good, **change}]), change
    wb = {"attack": "pgd", "eps": 0.3, "source": "a", "target": "a", "kind": "white-box",
          "accuracy": 0.1, "clean_acc": 0.9}
    tr = {**wb, "source": "b", "kind": "transfer", "accuracy": 0.5}
    assert inconsistencies([wb, tr]) == []
    assert inconsistencies([wb, {**tr, "accuracy": 0.95}])
    assert inconsistencies([wb, {**tr, "accuracy": -0.1}])
    assert inconsistencies([{**good, "bound_kind": "estimate"}])
    assert inconsistencies([{**good, "bound_kind": "estimate", "certified_acc": 0.0}]) == []
    std = {**good, "attack": "standard", "robust_acc": 0.3}
    assert weaker_than_reference([std, {**good, "attack": "pgd-50", "robust_acc": 0.3}]) == []
    assert weaker_than_reference([std, {**good, "attack": "pgd-50", "robust_acc": 0.2}])
    said = {**std, "warnings": ["[m standard eps=0.1] 3 of 10 points survived the standard "
                                "cascade but fell to pgd-50: ..."]}
    assert weaker_than_reference([said, {**good, "attack": "pgd-50", "robust_acc": 0.2}]) == []


HARD_WARNINGS = ("pixel range", "farther than eps", "NaN", "not deterministic", "training mode",
                 "certified yet the attack broke them")


@pytest.mark.parametrize("path", TABLES, ids=[str(p.relative_to(RESULTS)) for p in TABLES])
def test_results_table_is_consistent(path):
    rows = json.loads(path.read_text())
    assert rows, f"{path} is empty"
    assert inconsistencies(rows) == []
    hard = [w for r in rows for w in r.get("warnings", []) if any(h in str(w) for h in HARD_WARNINGS)]
    assert hard == [], f"{path}: sanity checks failed: {hard[:3]}"
    assert (path.parent / "command.txt").exists(), f"{path.parent} lacks command.txt: how was it made?"
    recorded = [n for n in ("environment.json", "machine.txt") if (path.parent / n).exists()]
    assert recorded, f"{path.parent} records no environment: where was it made?"
    assert weaker_than_reference(rows) == []


INDEPENDENT = sorted(RESULTS.rglob("independent_*.csv"))


@pytest.mark.parametrize("path", INDEPENDENT, ids=[str(p.relative_to(RESULTS)) for p in INDEPENDENT])
def test_standard_is_not_above_independent_attacks(path):
    """No cell of the standard evaluation is more than 0.5 points above what foolbox's FMN
    (200 steps) and PGD (100 steps) leave on the same images (independent_l2.csv of
    results/compare_l2.py, independent_linf.csv of compare_linf.py)."""
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows
    for r in rows:
        attacks = [k for k in r if k.startswith(("fmn_", "pgd_"))]
        assert len(attacks) == 2, r
        best = min(float(r[k]) for k in attacks)
        assert float(r["standard"]) <= best + 0.005, r


def test_results_readme_is_what_summarize_renders():
    """results/README.md is generated, never edited by hand: it must equal a fresh render."""
    spec = importlib.util.spec_from_file_location("summarize", RESULTS / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    assert (RESULTS / "README.md").read_text() == summarize.render(), \
        "results/README.md differs from what results/summarize.py renders: rerun it"
