"""`make demo` / `robustclip demo`: the clipped-versus-baseline comparison, in minutes on a CPU.

Trains the tutorial's simpleconv on MNIST with ``none`` and with ``fastclip`` for a short
schedule (embedded configs below, the tutorial's hyper-parameters but for the schedule
and an ``init_delay`` of 100 steps so that clipping acts within it), then attacks both
with FGSM and PGD (Linf) at eps 0.1, 0.2 and 0.3 on the first ``limit`` test images, and
prints the table with Lipschitz bounds and certified accuracy.  Everything goes to a new
directory ``<out>/<timestamp>/``: nothing earlier is overwritten.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from robustclip.config import from_dict
from robustclip.data import fetch
from robustclip.commands import attack_command
from robustclip.train import train

log = logging.getLogger(__name__)

METHODS = ("none", "fastclip")
EPS = (0.1, 0.2, 0.3)
ATTACKS = ("fgsm", "pgd")


def demo_config(method: str, epochs: int) -> dict:
    """The embedded training config of the demo for ``method`` (a plain dict, TOML layout)."""
    config = {
        "model": {"name": "simpleconv"},
        "data": {"dataset": "mnist"},
        "method": {"name": method},
        "train": {"epochs": epochs, "batch_size": 128, "lr": 0.001, "momentum": 0.9,
                  "weight_decay": 0.0, "step_size": 40, "gamma": 0.1, "seed": 1},
    }
    if method != "none":
        config["method"].update(clip=1.0, clip_steps=50, init_delay=100)
    return config


def run_demo(out: str | Path = "demo-out", epochs: int = 2, limit: int = 1000,
             data_dir: str | Path | None = None, device: str | None = None) -> tuple[Path, pd.DataFrame]:
    """Train both models, attack them, write everything below a new ``out/<timestamp>``.

    Returns (the output directory, the results table).
    """
    root = Path(out) / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=False)
    fetch("mnist", data_dir)
    runs = []
    for method in METHODS:
        log.info("training simpleconv with %s for %d epochs", method, epochs)
        runs.append(str(train(from_dict(demo_config(method, epochs)), root / "runs" / method,
                              device=device, data_dir=data_dir)))
    table = attack_command(runs, eps=list(EPS), attacks=list(ATTACKS), suite=None, limit=limit,
                           batch_size=250, seed=0, device=device, ensemble=False,
                           ensemble_output="softmax", out=str(root / "attack"), overwrite=False,
                           data_dir=data_dir)
    return root, table
