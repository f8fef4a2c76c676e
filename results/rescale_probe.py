"""Short lipnet + fastclip trainings that tell ways of holding a layer at its clip target
apart, on the same start, data and optimiser: clip events alone (FastClip's descent,
which moves the top singular directions only) every 50 steps, the same plus the per-step
rescale (``method.rescale_every_step``: the whole weight times min(1, c / sigma) after
every step), and clip events alone every 5 steps.

Each variant trains ``--steps`` steps of 128 MNIST training images with SGD (momentum
0.9) on the cross-entropy of ``--temperature`` x logits (the logits of a network with
every layer at sigma <= 1 are small), and prints, every 50 steps, the test accuracy on
the first 2000 test images, the largest tracked sigma and the median network gain
||f(x) - f(x')|| / ||x - x'|| over pairs of those test images of different classes (as
results/layer_gain.py); writes them to probe.csv, with environment.json.

    .venv/bin/python results/rescale_probe.py --out results/lipnet-rescale-probe
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from robustclip.data import load
from robustclip.models import build_model, wrappers

import layer_gain  # results/layer_gain.py, beside this file
from tables import save_tables  # results/tables.py


#: (per-step rescale, clip_steps) of each variant
VARIANTS = [(False, 50), (True, 50), (False, 5)]


def train(rescale: bool, clip_steps: int, steps: int, lr: float, temperature: float,
          x, y, xt, yt) -> list[dict]:
    torch.manual_seed(1)
    model = build_model("lipnet", "mnist", "fastclip", {
        "clip": 1.0, "clip_steps": clip_steps, "init_delay": 0, "rescale_every_step": rescale}).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    rows = []
    partner = layer_gain.different_class_pairs(yt)
    for step, (xb, yb) in enumerate(zip(x.split(128), y.split(128)), start=1):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(temperature * model(xb), yb).backward()
        optimizer.step()
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                z = model(xt)
            model.train()
            rows.append({"per_step_rescale": rescale, "clip_steps": clip_steps, "step": step,
                         "test_acc": float((z.argmax(1) == yt).float().mean()),
                         "largest_tracked_sigma": max(float(w.sigmas[0]) for w in wrappers(model)),
                         "network_gain": float(layer_gain.pair_gain(xt, z, partner).median())})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y = load("mnist", "train", limit=128 * args.steps).tensors
    xt, yt = load("mnist", "test", limit=2000).tensors
    rows = [r for rescale, clip_steps in VARIANTS
            for r in train(rescale, clip_steps, args.steps, args.lr, args.temperature, x, y, xt, yt)]
    save_tables(args.out, {"probe.csv": rows})


if __name__ == "__main__":
    main()
