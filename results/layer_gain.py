"""How much of each layer's spectral-norm budget a trained model uses on real data.

For pairs of test images of different classes (each image with the next one of another
class), every conv and dense layer's gain on the pair's difference,
||L(u) - L(u')|| / ||u - u'|| for the layer's inputs u, u' (the layer is affine, so this
is ||A (u - u')|| / ||u - u'|| <= sigma_1(A)), and the whole network's,
||f(x) - f(x')|| / ||x - x'||, beside the network's sound Lipschitz bound.  A margin
certificate at L2 radius r needs a logit gap of sqrt(2) * bound * r; the network can
only open gaps of the order of its data gain times ||x - x'||.

    .venv/bin/python results/layer_gain.py RUN... --limit 1000 --out results/lipnet-gain

Writes layer_gain.csv (model, layer, sigma_1 estimate, median gain, median gain /
sigma_1) and network_gain.csv (model, pairs, bound, median network gain, the product of the
layers' median gains, median clean logit gap, the gap a certificate at 1.58 needs, the
fraction of points with that gap), and environment.json.
"""
from __future__ import annotations

import argparse
import math

import pandas as pd
import torch
import torch.nn as nn

from robustclip.bounds import lipschitz_report
from robustclip.checkpoint import load_runs
from robustclip.data import data_source, test_set
from robustclip.models import wrappers
from robustclip.spectral import singular_values

from tables import save_tables  # results/tables.py, beside this file

RADIUS = 1.58


def different_class_pairs(y: torch.Tensor) -> torch.Tensor:
    """For each i, the index of the next sample (cyclically) whose label differs from y_i."""
    n = len(y)
    partner = torch.empty(n, dtype=torch.long)
    for i in range(n):
        j = (i + 1) % n
        while y[j] == y[i]:
            j = (j + 1) % n
        partner[i] = j
    return partner


def _layer_io(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (input, output) of every spectral wrapper's layer for the batch x."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [w.register_forward_hook(lambda m, i, o: seen.__setitem__(m.name, (i[0], o)))
             for w in wrappers(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def pair_gain(u: torch.Tensor, out: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Per pair: ||out_i - out_j|| / ||u_i - u_j||."""
    return ((out - out[partner]).flatten(1).norm(dim=1)
            / (u - u[partner]).flatten(1).norm(dim=1).clamp_min(1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    layers, networks = [], []
    for name, model in load_runs(args.runs).items():
        x, y = test_set(data_source(model.robustclip_meta), args.limit)
        partner = different_class_pairs(y)
        io = _layer_io(model, x)
        product = 1.0
        for w in wrappers(model):
            u, out = io[w.name]
            sigma = float(singular_values(w.module, tuple(u.shape[1:]))[0])
            gain = float(pair_gain(u, out, partner).median())
            product *= gain
            layers.append({"model": name, "layer": w.name, "sigma_1": sigma, "median_gain": gain,
                           "gain_over_sigma": gain / sigma})
        with torch.no_grad():
            z = model(x)
        bound, rows = lipschitz_report(model, tuple(x.shape[1:]))
        kinds = sorted(set(rows.bound_kind))
        true = z.gather(1, y[:, None])[:, 0]
        gap = true - z.scatter(1, y[:, None], -math.inf).max(1).values
        needed = math.sqrt(2) * bound * RADIUS
        networks.append({"model": name, "pairs": len(y), "bound": bound, "bound_kinds": "+".join(kinds),
                         "median_network_gain": float(pair_gain(x, z, partner).median()),
                         "product_of_layer_gains": product,
                         "median_logit_gap": float(gap.median()),
                         "gap_needed_at_1.58": needed,
                         "fraction_with_that_gap": float((gap >= needed).float().mean())})
        print(pd.DataFrame([r for r in layers if r["model"] == name]).to_string(index=False))
        print(networks[-1], flush=True)
    save_tables(args.out, {"layer_gain.csv": layers, "network_gain.csv": networks})


if __name__ == "__main__":
    main()
