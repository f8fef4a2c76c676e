"""Write results/README.md from the files the runs produced (no number is typed by hand).

    .venv/bin/python results/summarize.py

Reads results/mnist-simpleconv/results.json, results/training/{final_epoch,by_method}.csv,
results/seeds-composite/results.json, results/transfer/results.csv,
results/ensemble-*/results.json, results/lipnet-fgsm/ (results.json and the runs'
training/*.metrics.csv), results/lipnet-fgsm-l2/results.json,
results/lipnet-gain/{network,layer}_gain.csv, results/lipnet-rescale-probe/probe.csv
and results/FINDINGS.md (the prose, written by a person
from these tables).  ``tests/test_results.py`` checks that README.md is what this renders.
"""
import json
from pathlib import Path

import pandas as pd

from robustclip.report import markdown

HERE = Path(__file__).resolve().parent
TUTORIAL = {"fastclip": "95.8% after 60 epochs (92.3% after epoch 0)",
            "fastclip-composite": "about 82% after 80 epochs (unstable)"}


def pct(v: float) -> str:
    return "-" if pd.isna(v) else f"{100 * v:.1f}%"


def num(v: float) -> str:
    return "-" if pd.isna(v) else f"{v:.2f}"


def headline(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per model: clean, the standard evaluation's robust accuracy per (norm, eps),
    bound and its kind, empirical ratio, best certified accuracy."""
    out = []
    for model, part in rows.groupby("model", sort=False):
        line = {"model": model, "clean": pct(part.clean_acc.iloc[0])}
        for _, r in part[part.attack == "standard"].iterrows():
            line[f"{r.norm} {r.eps:g}"] = pct(r.robust_acc)
        line["Lipschitz bound"] = num(part.lipschitz_bound.iloc[0])
        line["bound kind"] = part.bound_kind.iloc[0]
        line["empirical"] = num(part.lipschitz_empirical.iloc[0])
        line["certified (best eps)"] = pct(part.certified_acc.max())
        out.append(line)
    return pd.DataFrame(out)


def stages(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model and (norm, eps): the points each stage of the cascade broke, the points
    left, the reference attacks' robust accuracy beside the standard's, and (where the
    table has the suite's row) the per-sample worst case over all of them."""
    out = []
    for (model, norm, eps), part in rows.groupby(["model", "norm", "eps"], sort=False):
        by = part.set_index("attack")
        line = {"model": model, "budget": f"{norm} {eps:g}", "clean": int(round(by.clean_acc.iloc[0] * by.n.iloc[0]))}
        for attack in [a for a in part.attack if a.startswith("standard:")]:
            line[f"broken by {attack.split(':', 1)[1]}"] = int(by.loc[attack, "broken"])
        line["standard"] = pct(by.loc["standard", "robust_acc"])
        ref = "pgd-50" if norm == "Linf" else "pgdl2-100"
        line["PGD (50 Linf / 100 L2)"] = pct(by.loc[ref, "robust_acc"])
        suite = [a for a in part.attack if a not in ("standard", ref) and not a.startswith("standard:")]
        if suite:  # the suite's row: per sample, the worst case over every attack
            line["worst of all, per sample"] = pct(by.loc[suite[0], "robust_acc"])
        out.append(line)
    return pd.DataFrame(out)


def robust_by_eps(rows: pd.DataFrame) -> pd.DataFrame:
    """model x eps table of robust accuracy, plus clean accuracy and bound."""
    table = rows.pivot_table(index="model", columns="eps", values="robust_acc", sort=False)
    table.columns = [f"{rows.attack.iloc[0]} {rows.norm.iloc[0]} {e:g}" for e in table.columns]
    table = table.map(pct)
    first = rows.groupby("model", sort=False).first()
    table.insert(0, "clean", first.clean_acc.map(pct))
    table["Lipschitz bound"] = first.lipschitz_bound.map(num)
    table["certified (best eps)"] = rows.groupby("model", sort=False).certified_acc.max().map(pct)
    return table.reset_index()


def _main_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the standard evaluation where a table has it (not its stages, not the
    PGD reference), else all."""
    standard = rows[rows.attack == "standard"]
    return standard if len(standard) else rows


def _evaluation(rows: pd.DataFrame) -> str:
    """What a table's robust accuracies come from, for a title."""
    return "the standard evaluation" if (rows.attack == "standard").any() else "PGD-50"


def sigma_table(final: pd.DataFrame, sigma_cols: list[str]) -> pd.DataFrame:
    """Seed-1 runs: final test accuracy and each layer's tracked sigma ('-': not tracked)."""
    table = final[final.run.str.endswith("-s1")][["run", "test_acc"] + sigma_cols].dropna(axis=1, how="all")
    table["test_acc"] = table.test_acc.map(pct)
    for c in table.columns[2:]:
        table[c] = table[c].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
    return table


def epochs_table(m: pd.DataFrame) -> pd.DataFrame:
    """One line per epoch of a run's metrics.csv: the eps it trained at and the PGD monitor
    (adversarial training), clean test accuracy, the largest tracked sigma, minutes."""
    shown = {"epoch": m.epoch + 1}
    if "adv_eps" in m:
        shown["training eps at the epoch's end"] = m.adv_eps.map(lambda v: f"{v:.2f}")
    shown["test acc (clean)"] = m.test_acc.map(pct)
    for key, label in (("apgd_acc", "APGD-CE-10"), ("pgd_acc", "PGD-10")):
        if key in m:
            shown[f"{label} acc at 0.3 (monitor)"] = m[key].map(pct)
            shown["catastrophic overfitting"] = m.catastrophic_overfitting.map(lambda v: "yes" if v else "no")
    sigmas = m[[c for c in m.columns if c.startswith("sigma/")]]
    if len(sigmas.columns):
        shown["largest tracked sigma"] = sigmas.max(axis=1).map(lambda v: f"{v:.3f}")
    shown["minutes"] = (m.wall_time / 60).map(lambda v: f"{v:.0f}")
    return pd.DataFrame(shown)


def certified_by_budget(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model and budget: clean, the standard evaluation's robust accuracy, certified."""
    std = rows[rows.attack == "standard"]
    return pd.DataFrame({"model": std.model, "budget": [f"{n} {e:g}" for n, e in zip(std.norm, std.eps)],
                         "clean": std.clean_acc.map(pct), "standard": std.robust_acc.map(pct),
                         "certified": std.certified_acc.map(pct)})


def trained_section(folder: Path, title: str, part: str, script: str, training: bool = True
                    ) -> list[str]:
    """A table of the runs of ``script`` (results/train_lipnet.sh, train_smallcnn.sh): the
    standard evaluation per model and budget with certified accuracy, its stages, the
    independent attacks, and (``training``) each run's epochs; ``part``: the part of
    results/attack.sh that made it."""
    rows = pd.DataFrame(json.loads((folder / "results.json").read_text()))
    runs = (f" (each run's config and metrics in `{folder.name}/training/`)" if training else "")
    parts = [f"## {title} (the standard evaluation, first {int(rows.n.iloc[0])} test images)", "",
             f"Commands: `{script}`{runs}, `bash results/attack.sh {part}`.", "",
             markdown(certified_by_budget(rows)), "",
             "Lipschitz bounds (kind, empirical ratio): " + "; ".join(
                 f"{m} {p.lipschitz_bound.iloc[0]:.3f} ({p.bound_kind.iloc[0]}, {p.lipschitz_empirical.iloc[0]:.3f})"
                 for m, p in rows.groupby("model", sort=False)) + ".", "",
             markdown(stages(rows)), "", *independent(folder)]
    for metrics in sorted((folder / "training").glob("*.metrics.csv")) if training else []:
        parts += [f"Training of {metrics.name.split('.')[0]}:", "",
                  markdown(epochs_table(pd.read_csv(metrics))), ""]
    return parts


def whole_test_set_section(folder: Path) -> list[str]:
    """Certified accuracy on the whole test set (a cheap attack's run: the certificate
    needs only the clean logits and the sound bound), beside that attack's accuracy."""
    rows = pd.DataFrame(json.loads((folder / "results.json").read_text()))
    shown = pd.DataFrame({"model": rows.model, "budget": [f"{n} {e:g}" for n, e in zip(rows.norm, rows.eps)],
                          "clean": rows.clean_acc.map(pct), "certified": rows.certified_acc.map(pct),
                          rows.attack.iloc[0]: rows.robust_acc.map(pct),
                          "bound (kind)": [f"{b:.4f} ({k})" for b, k in zip(rows.lipschitz_bound, rows.bound_kind)]})
    return [f"The same runs on the whole test set ({int(rows.n.iloc[0])} images; "
            f"`{folder.name}/command.txt`): certified accuracy from the sound bound, with "
            f"{rows.attack.iloc[0]} beside it (an upper bound of robust accuracy, weaker than "
            "the standard evaluation above):", "", markdown(shown), ""]


INDEPENDENT = {"l2": ("L2", "FMN-L2", "L2 PGD", "results/compare_l2.py"),
               "linf": ("Linf", "FMN-Linf", "Linf PGD", "results/compare_linf.py")}


def independent(folder: Path) -> list[str]:
    """The tables of results/compare_l2.py and compare_linf.py in a folder, those it has."""
    parts = []
    for suffix, (norm, fmn, pgd, script) in INDEPENDENT.items():
        if not (folder / f"independent_{suffix}.csv").exists():
            continue
        ind = pd.read_csv(folder / f"independent_{suffix}.csv")
        attacks = [c for c in ind.columns if c.startswith(("fmn_", "pgd_"))]
        shown = ind.drop(columns="standard_minus_best")
        shown = shown.assign(**{c: ind[c].map(pct) for c in ("standard", *attacks)})
        parts += [f"Independent {norm} attacks on the same images (foolbox's {fmn}, 200 steps, "
                  f"and {pgd}, 100 steps; `{script}`):", "", markdown(shown), ""]
    return parts


def gain_section(folder: Path) -> list[str]:
    """results/layer_gain.py's tables: how much of its Lipschitz budget each lipnet uses."""
    net = pd.read_csv(folder / "network_gain.csv")
    layers = pd.read_csv(folder / "layer_gain.csv")
    shown = pd.DataFrame({
        "model": net.model, "bound (kinds)": [f"{b:.3f} ({k})" for b, k in zip(net.bound, net.bound_kinds)],
        "network gain (median)": net.median_network_gain.map(lambda v: f"{v:.3f}"),
        "product of layer gains": net.product_of_layer_gains.map(lambda v: f"{v:.3f}"),
        "logit gap (median)": net.median_logit_gap.map(lambda v: f"{v:.2f}"),
        "gap a certificate at L2 1.58 needs": net["gap_needed_at_1.58"].map(lambda v: f"{v:.2f}"),
        "points with that gap": net.fraction_with_that_gap.map(pct)})
    per_layer = layers.pivot(index="layer", columns="model", values="gain_over_sigma")
    per_layer = per_layer.reindex(index=list(dict.fromkeys(layers.layer)), columns=list(net.model))
    n = int(net.pairs.iloc[0])
    return [f"## How much of their Lipschitz budget the lipnets use (first {n} test images)", "",
            f"Command: `bash results/attack.sh gain` (`{folder.name}/command.txt`). Pairs of test "
            "images of different classes; a layer's gain is ||L(u) - L(u')|| / ||u - u'|| on its "
            "inputs for the pair, the network's ||f(x) - f(x')|| / ||x - x'||; medians over the "
            f"{n} pairs. fastclip-margin-s1 is the stopped margin run of "
            "`lipnet-margin-stopped/` (its last checkpoint, epoch 4).", "",
            markdown(shown), "",
            "Each layer's median gain as a fraction of its sigma_1 (PowerQR estimate):", "",
            markdown(per_layer.map(lambda v: f"{v:.2f}").reset_index()), ""]


def probe_section(folder: Path) -> list[str]:
    """results/rescale_probe.py's table: ways of holding lipnet's layers at their target."""
    probe = pd.read_csv(folder / "probe.csv")
    held = [f"clip events every {c}" + (" + per-step rescale" if r else "")
            for r, c in zip(probe.per_step_rescale, probe.clip_steps)]
    shown = pd.DataFrame({
        "holding the layers at 1": held, "step": probe.step,
        "test acc (first 2000)": probe.test_acc.map(pct),
        "largest tracked sigma": probe.largest_tracked_sigma.map(lambda v: f"{v:.3f}"),
        "network gain (median)": probe.network_gain.map(lambda v: f"{v:.3f}")})
    return ["## Clip events against the per-step rescale: short lipnet + fastclip trainings", "",
            f"Command: `{folder.name}/command.txt` (`results/rescale_probe.py`: cross-entropy of "
            f"4 x logits, SGD lr 0.005, momentum 0.9, the same start and batches for all "
            f"{len(set(held))} variants).", "", markdown(shown), ""]


def monitor_section(folder: Path) -> list[str]:
    """results/monitor_attacks.py's table: the overfitting monitor's attacks on trained runs."""
    m = pd.read_csv(folder / "monitor.csv")
    shown = pd.DataFrame({"run": m.run, "attack": m.attack, "FGSM-RS": m.fgsm_acc.map(pct),
                          "attack's accuracy": m.attack_acc.map(pct),
                          "gap (flagged above 0.3)": (m.fgsm_acc - m.attack_acc).map(lambda v: f"{v:.3f}"),
                          "seconds": m.seconds.map(lambda v: f"{v:.1f}")})
    return ["## The overfitting monitor's attack: PGD against APGD-CE", "",
            f"Command: `{folder.name}/command.txt` (`results/monitor_attacks.py`: the monitor "
            f"of each run's own training, its {int(m.points.iloc[0])} held-out test images and "
            "seed, on its last checkpoint, one CPU thread).", "", markdown(shown), ""]


def render() -> str:
    main_rows = pd.DataFrame(json.loads((HERE / "mnist-simpleconv/results.json").read_text()))
    final = pd.read_csv(HERE / "training/final_epoch.csv")
    by_method = pd.read_csv(HERE / "training/by_method.csv")
    epochs = sorted(set(by_method.epochs))
    epochs_text = " / ".join(map(str, epochs))
    by_method_text = by_method.assign(**{
        "final test acc (mean)": by_method.test_acc_mean.map(pct),
        "std": by_method.test_acc_std.map(lambda v: "-" if pd.isna(v) else pct(v)),
        "min .. max": [f"{pct(a)} .. {pct(b)}" for a, b in zip(by_method.test_acc_min, by_method.test_acc_max)],
        "minutes per run": by_method.minutes_per_run.map(lambda v: f"{v:.0f}"),
    })[["method", "seeds", "epochs", "final test acc (mean)", "std", "min .. max", "minutes per run"]]
    sigma_cols = [c for c in final.columns if c.startswith("sigma/")]
    parts = ["# Results: MNIST simpleconv, clipped against baselines", "",
             "Generated by `results/summarize.py` from the files beside it; every table below "
             "comes from a real run whose exact command is in `command.txt` of its folder "
             "(with `environment.json`, or for older tables `machine.txt`: where it ran), and whose training command is in `results/train.sh`.", "",
             f"## Headline: the standard evaluation on the first {int(main_rows.n.iloc[0])} "
             "MNIST test images (seed 1)", "",
             "Suite `attacks/mnist-results.toml`: the standard cascade (AutoAttack's APGD-CE, "
             "APGD-T, FAB-T, Square, each on the points still robust; robust accuracy is the "
             "per-sample worst case) at Linf 0.1/0.2/0.3 and L2 1.0/1.58/2.0. Each model "
             f"trained {epochs_text} epochs at the tutorial's hyper-parameters (SGD lr 1e-3, "
             "momentum 0.9, batch 128), seed 1.", "",
             markdown(headline(main_rows)), "",
             "Lipschitz bound: product of per-operator spectral norms along the graph, input "
             "normalisation included; bound kind 'upper': every factor is exact or a "
             "guaranteed upper bound (robustclip/upper_bounds.py), so the bound is one too. "
             "Empirical: the largest ||f(x)-f(x')|| / ||x-x'|| seen over test and adversarial "
             "pairs, measured in float64 (a lower bound). Certified: margin > sqrt(2) * bound "
             "* radius.", "",
             "Which stage broke how many points, and PGD beside the standard (the standard "
             "must never be above it):", "",
             markdown(stages(main_rows)), ""]
    parts += independent(HERE / "mnist-simpleconv")
    parts += ["![robust vs eps](mnist-simpleconv/robust_vs_eps_Linf.png) "
              "![robust vs eps](mnist-simpleconv/robust_vs_eps_L2.png)", ""]
    seeds = HERE / "seeds-composite/results.json"
    if seeds.exists():
        s = pd.DataFrame(json.loads(seeds.read_text()))
        parts += [f"## fastclip-composite on its other seeds ({_evaluation(s)}, Linf)", "",
                  markdown(robust_by_eps(_main_rows(s))), ""]
    parts += [f"## Training ({epochs_text} epochs)", "",
              markdown(by_method_text), "",
              "Tracked sigma at the end of training (seed 1; PowerQR's estimate, per layer):", "",
              markdown(sigma_table(final, sigma_cols)), "",
              "Tutorial reference (method.md section 6): " +
              "; ".join(f"{k}: {v}" for k, v in TUTORIAL.items()) + ".", "",
              "![sigma](training/sigma_over_training.png) ![accuracy](training/test_acc.png)", ""]
    transfer = HERE / "transfer/results.csv"
    if transfer.exists():
        t = pd.read_csv(transfer)
        parts += ["## Transfer among seeds (PGD-50: accuracy of the column model on examples "
                  "crafted on the row model; diagonal = white-box)", ""]
        for (attack, eps), part in t[t.kind != "surrogate"].groupby(["attack", "eps"]):
            m = part.pivot(index="source", columns="target", values="accuracy").map(pct)
            parts += [f"{attack} eps {eps:g}:", "", markdown(m.reset_index()), ""]
    for ens in sorted(HERE.glob("ensemble-*/results.json")):
        e = pd.DataFrame(json.loads(ens.read_text()))
        title = _evaluation(e)
        parts += [f"## {title[0].upper()}{title[1:]}, white-box, on {ens.parent.name}: its members "
                  f"and their ensemble (first {int(e.n.iloc[0])} test images)", "",
                  markdown(robust_by_eps(_main_rows(e))), ""]
    for name, part, title in [
            ("smallcnn-fgsm", "smallcnn", "Adversarial training: smallcnn (Wong et al.'s recipe), "
             "FGSM-RS at Linf 0.3"),
            ("smallcnn-fgsm-rawstart", "smallcnn_rawstart", "Adversarial training: smallcnn, FGSM-RS "
             "at Linf 0.3 from the raw random start (Wong et al.'s MNIST code)"),
            ("smallcnn-wide-fgsm-rawstart", "smallcnn_wide", "Adversarial training: smallcnn twice as "
             "wide, dense 1024, FGSM-RS at Linf 0.3 from the raw random start"),
            ("smallcnn-wide-fgsm-rawstart-l2", "smallcnn_wide_l2", "The wide smallcnn at L2"),
            ("smallcnn-wide-fgsm-rawstart-e20", "smallcnn_wide_e20", "Adversarial training: the wide "
             "smallcnn for 20 epochs, FGSM-RS at Linf 0.3 from the raw random start"),
            ("smallcnn-baselines-fgsm-rawstart", "smallcnn_baselines", "Adversarial training: "
             "smallcnn with miyato and gouk, FGSM-RS at Linf 0.3 from the raw random start"),
            ("smallcnn-baselines-fgsm-rawstart-l2", "smallcnn_baselines_l2", "smallcnn with miyato "
             "and gouk at L2")]:
        if (HERE / f"{name}/results.json").exists():
            parts += trained_section(HERE / name, title, part, "results/train_smallcnn.sh",
                                     training=not name.endswith("-l2"))
    for name, part, title in [("lipnet-certified", "certified", "Certified training: lipnet, Lipschitz "
                               "margin at L2 1.58 against its sound bound"),
                              ("lipnet-certified-long", "certified_long", "Certified training for 16 "
                               "epochs: lipnet + none, Lipschitz margin at L2 1.58"),
                              ("lipnet-certified-e24", "certified_e24", "Certified training for 24 "
                               "epochs: lipnet + none, Lipschitz margin at L2 1.58"),
                              ("lipnet-certified-composite", "certified_composite", "Certified "
                               "training: lipnet-composite + fastclip-composite, Lipschitz margin "
                               "at L2 1.58"),
                              ("lipnet-certified-gouk", "certified_gouk", "Certified training: "
                               "lipnet + gouk, Lipschitz margin at L2 1.58"),
                              ("lipnet-certified-miyato", "certified_miyato", "Certified training: "
                               "lipnet + miyato, Lipschitz margin at L2 1.58")]:
        if (HERE / f"{name}/results.json").exists():
            parts += trained_section(HERE / name, title, part, "results/train_certified.sh")
            parts += whole_test_set_section(HERE / f"{name}-full")
    for name, part, title, script, training in [
            ("lipnet-certified-e24-budgets", "certified_e24_budgets", "The 24-epoch certified lipnet "
             "at the other budgets", "results/train_certified.sh", False),
            ("lipnet-fgsm", "lipnet", "Adversarial training: lipnet, FGSM-RS at Linf 0.3",
             "results/train_lipnet.sh", True),
            ("lipnet-composite-fgsm", "lipnet_composite", "Adversarial training: lipnet-composite "
             "+ fastclip-composite, FGSM-RS at Linf 0.3", "results/train_lipnet.sh", True),
            ("lipnet-composite-fgsm-l2", "lipnet_composite_l2", "The same lipnet-composite at L2",
             "results/train_lipnet.sh", False),
            ("lipnet-fgsm-l2", "lipnet_l2", "The same lipnets at L2", "results/train_lipnet.sh", False)]:
        if (HERE / f"{name}/results.json").exists():
            parts += trained_section(HERE / name, title, part, script, training=training)
    if (HERE / "lipnet-gain/network_gain.csv").exists():
        parts += gain_section(HERE / "lipnet-gain")
    if (HERE / "monitor-attacks/monitor.csv").exists():
        parts += monitor_section(HERE / "monitor-attacks")
    if (HERE / "lipnet-rescale-probe/probe.csv").exists():
        parts += probe_section(HERE / "lipnet-rescale-probe")
    parts += ["## What the numbers say", "", (HERE / "FINDINGS.md").read_text()]
    return "\n".join(parts)


def main() -> None:
    (HERE / "README.md").write_text(render())


if __name__ == "__main__":
    main()
