"""The overfitting monitor's attacks on trained FGSM-RS runs: what PGD and APGD-CE leave.

For each run directory (its ``last.pt`` and ``config.toml``), builds the monitor exactly
as its training did (the last ``monitor_samples`` test images, the run's seed and
FGSM-RS step, BatchNorm in eval mode) once per multi-step attack and step count, and
records FGSM-RS's and the attack's accuracy on those points, with the seconds the
monitor took (one CPU thread); writes monitor.csv and environment.json to ``--out``.

    .venv/bin/python results/monitor_attacks.py runs/smallcnn/wide-none-fgsm-rawstart-e20-s1 \
        runs/smallcnn/wide-none-fgsm-rawstart-s1 --out results/monitor-attacks
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from robustclip.checkpoint import load
from robustclip.config import load_config, override
from robustclip.data import load as load_data
from robustclip.distributed import Context
from robustclip.train import _monitor

from tables import save_tables  # results/tables.py, beside this file

ATTACKS = [("pgd", 10), ("apgd-ce", 10), ("apgd-ce", 20), ("apgd-ce", 50)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    test = load_data("mnist", "test")
    rows = []
    for run in map(Path, args.runs):
        model, config = load(run), load_config(run / "config.toml")
        for attack, steps in ATTACKS:
            monitor = _monitor(override(config, [f"train.adversarial.monitor_attack={attack}",
                                                 f"train.adversarial.monitor_steps={steps}"]),
                               test, Context())
            start = time.perf_counter()
            measured = monitor.accuracy(model)
            rows.append({"run": run.name, "attack": monitor.label, "points": monitor.total,
                         "fgsm_acc": measured["fgsm_acc"], "attack_acc": measured[monitor.key],
                         "seconds": time.perf_counter() - start})
    save_tables(args.out, {"monitor.csv": rows})


if __name__ == "__main__":
    main()
