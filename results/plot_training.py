"""Plot per-epoch test accuracy and tracked per-layer sigma of the runs behind results/.

    .venv/bin/python results/plot_training.py RUNS_DIR OUT_DIR

Reads every RUNS_DIR/<method>-s<seed>/metrics.csv (written by robustclip train) and
writes to OUT_DIR: sigma_over_training.png (seed 1 of each method, per logged step, from
the run's TensorBoard scalars), test_acc.png (per
method: mean over seeds, band from the lowest to the highest seed), final_epoch.csv (the
last row of each run, and its training minutes), by_method.csv (final test accuracy
over seeds, minutes per run), command.txt.
Nothing is edited by hand.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def method_of(run: str) -> str:
    return run.rsplit("-s", 1)[0]


def step_sigmas(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer -> (steps, tracked sigma_1) from the run's TensorBoard scalars ``sigma/<layer>``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag[6:]: (np.array([e.step for e in events.Scalars(tag)]),
                      np.array([e.value for e in events.Scalars(tag)]))
            for tag in events.Tags()["scalars"] if tag.startswith("sigma/") and tag.count("/") == 1}


def main(runs: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = {p.parent.name: pd.read_csv(p) for p in sorted(runs.glob("*/metrics.csv"))}
    metrics = {name: df for name, df in metrics.items() if len(df)}  # not yet through epoch 0
    traces = {name: step_sigmas(runs / name) for name in metrics if name.endswith("-s1")}
    fig, (full, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for name, per_layer in traces.items():
        for layer, (steps, values) in per_layer.items():
            line, = full.plot(steps, values, lw=0.8, label=f"{method_of(name)} {layer}")
            last = steps >= steps.max() - 500
            tail.plot(steps[last], values[last], lw=0.8, color=line.get_color())
    for ax in (full, tail):
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
    full.set(xlabel="training step", ylabel="tracked sigma_1", yscale="log",
             title="Per-layer spectral norm during training (seed 1)")
    tail.set(xlabel="training step", title="the last 500 steps (clip events every 50)")
    full.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "sigma_over_training.png", dpi=120)
    long = pd.concat([df.assign(run=n, method=method_of(n)) for n, df in metrics.items()])
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, part in long.groupby("method", sort=False):
        acc = part.groupby("epoch").test_acc
        seeds = part.run.nunique()
        line, = ax.plot(acc.mean().index + 1, acc.mean(), marker="o", ms=3,
                        label=f"{method} ({seeds} seed{'s' if seeds > 1 else ''})")
        ax.fill_between(acc.mean().index + 1, acc.min(), acc.max(), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel="test accuracy", title="MNIST simpleconv, tutorial hyper-parameters")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "test_acc.png", dpi=120)
    last = pd.DataFrame([{"run": n, **df.iloc[-1].to_dict(), "train_minutes": df.wall_time.sum() / 60}
                         for n, df in metrics.items()])
    last.to_csv(out / "final_epoch.csv", index=False, float_format="%.6g")
    last["method"] = last.run.map(method_of)
    by_method = last.groupby("method", sort=False).agg(
        seeds=("run", "count"), epochs=("epoch", lambda e: int(e.max()) + 1),
        test_acc_mean=("test_acc", "mean"), test_acc_std=("test_acc", "std"),
        test_acc_min=("test_acc", "min"), test_acc_max=("test_acc", "max"),
        minutes_per_run=("train_minutes", "mean"))
    by_method.reset_index().to_csv(out / "by_method.csv", index=False, float_format="%.6g")
    (out / "command.txt").write_text(" ".join([".venv/bin/python", *sys.argv]) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
