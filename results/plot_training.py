"""Plot per-epoch test accuracy and tracked per-layer sigma of the runs behind results/.

    .venv/bin/python results/plot_training.py RUNS_DIR OUT_DIR

Reads every RUNS_DIR/*/metrics.csv (written by robustclip train) and writes
OUT_DIR/sigma_over_training.png, OUT_DIR/test_acc.png and OUT_DIR/final_epoch.csv (the
last row of each run), plus command.txt.  Nothing is edited by hand.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def main(runs: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = {p.parent.name: pd.read_csv(p) for p in sorted(runs.glob("*/metrics.csv"))}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, df in metrics.items():
        for col in [c for c in df.columns if c.startswith("sigma/") and c.count("/") == 1]:
            ax.plot(df.epoch + 1, df[col], marker="o", label=f"{name} {col[6:]}")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set(xlabel="epoch", ylabel="tracked sigma_1 (end of epoch)", title="Per-layer spectral norm during training")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "sigma_over_training.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, df in metrics.items():
        ax.plot(df.epoch + 1, df.test_acc, marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="test accuracy", title="MNIST simpleconv, tutorial hyper-parameters")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "test_acc.png", dpi=120)
    last = pd.DataFrame([{"run": n, **df.iloc[-1].to_dict()} for n, df in metrics.items()])
    last.to_csv(out / "final_epoch.csv", index=False, float_format="%.6g")
    (out / "command.txt").write_text(" ".join([".venv/bin/python", *sys.argv]) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
