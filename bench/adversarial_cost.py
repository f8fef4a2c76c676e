"""Per-epoch cost of FGSM-RS adversarial training relative to normal training.

Trains the MNIST network of a config (default ``configs/mnist-lipnet-fastclip-fgsm.toml``:
lipnet, FastClip, FGSM-RS at eps 0.3) for one epoch of ``--steps`` steps on the real
MNIST, three times per round, through ``robustclip.train.train`` itself: as configured
(``fgsm-rs``), without the catastrophic-overfitting monitor (``fgsm-rs/nomon``:
``monitor_samples = 0``), and with ``train.adversarial.attack = "none"`` (``normal``,
everything else equal).  The cost is the epoch's ``wall_time`` in metrics.csv (training,
the test pass on ``--test`` samples and, with the monitor, PGD-10 on its held-out
samples).  Rounds alternate the variants and the medians are compared.  Goal (issue
14): FGSM-RS <= 2.5x normal.

    python bench/adversarial_cost.py [--config C] [--steps 200] [--test 1000] [--rounds 3]
                                     [--device auto] [--threads N]
"""
from __future__ import annotations

import csv
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from robustclip.config import load_config, override
from robustclip.train import train

import common  # bench/common.py, beside this file

log = logging.getLogger("bench.adversarial_cost")
ROOT = Path(__file__).resolve().parents[1]


def _epoch(config, out: Path) -> dict[str, float]:
    """Train one epoch into ``out``; its metrics.csv row."""
    train(config, out, overwrite=True)
    with open(out / "metrics.csv") as f:
        (row,) = csv.DictReader(f)
    return {k: float(v) for k, v in row.items() if not k.startswith("sigma/")}


def main(argv: list[str] | None = None) -> float:
    """Print the medians and the ratio; return the ratio."""
    parser = common.parser(__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs/mnist-lipnet-fastclip-fgsm.toml"))
    parser.add_argument("--steps", type=int, default=200, help="training steps in the timed epoch")
    parser.add_argument("--test", type=int, default=1000, help="test samples evaluated per epoch")
    args = parser.parse_args(argv)
    device = common.setup(args)
    base = load_config(args.config)
    settings = [f"train.limit_train={args.steps * base.train.batch_size}", f"train.limit_test={args.test}",
                "train.epochs=1", f"train.device={device}", "log.progress=false", "log.tensorboard=false"]
    variants = {"fgsm-rs": override(base, settings),
                "fgsm-rs/nomon": override(base, [*settings, "train.adversarial.monitor_samples=0"]),
                "normal": override(base, [*settings, "train.adversarial.attack=none"])}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, config in variants.items():
                row = _epoch(config, Path(tmp) / name.replace("/", "-"))
                times[name].append(row["wall_time"])
                log.info("round %d %-13s %.1f s  train acc %.3f  test acc %.3f%s", r + 1, name,
                         row["wall_time"], row["train_acc"], row["test_acc"],
                         "".join(f"  {k} {row[k]:.3f}" for k in ("apgd_acc", "pgd_acc") if k in row))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["fgsm-rs"] / median["normal"]
    print(f"{base.model.name} + {base.method.name}, {args.steps} steps of {base.train.batch_size}, "
          f"{args.test} test samples, device {device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    for name in ("normal", "fgsm-rs/nomon", "fgsm-rs"):
        print(f"{name:<13} {median[name]:.2f} s per epoch (median), "
              f"{median[name] / median['normal']:.2f} x normal")
    print(f"ratio fgsm-rs / normal {ratio:.2f}  (goal <= 2.5)")
    return ratio


if __name__ == "__main__":
    main()
