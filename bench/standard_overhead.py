"""Standard evaluation overhead: robustclip's standard cascade against a bare torchattacks loop.

Both run AutoAttack's standard version (APGD-CE and APGD-T at 100 steps, FAB-T at 100
steps with 9 targets, Square with 5000 queries, one restart each; torchattacks'
``AutoAttack`` class builds its members with 10 steps, so the bare side is the same
``MultiAttack`` of the same members at the standard's settings) on the same model and
images, in interleaved rounds; the median per side is reported.  The bare loop is what a
user would write: ``MultiAttack`` per batch (it too runs each attack only on the points
still robust), then the accuracy on x_adv.  robustclip adds the clean pass with its
start-point checks, per-batch seeding, per-stage rows, sanity checks and empirical
Lipschitz ratios; bounds are off (a once-per-model cost).  Goal: ratio <= 1.05 on CPU.

    python bench/standard_overhead.py [--run RUN_DIR] [--samples 256] [--batch-size 256]
                                      [--eps 0.1] [--norm Linf] [--rounds 3] [--threads N]

With ``--run`` (a trained robustclip run) the first ``--samples`` test images of its
dataset are attacked: attacks then work on surviving points, as in a real evaluation.
Without it, an untrained simpleconv on synthetic MNIST-shaped images.
"""
from __future__ import annotations

import logging
import time

import torch
import torchattacks

import robustclip
from robustclip import evaluation
from robustclip.data import synthetic, test_set
from robustclip.models import build_model

import common  # bench/common.py, beside this file

log = logging.getLogger("bench.standard_overhead")


def bare_loop(model, x, y, eps: float, norm: str, batch_size: int, device) -> tuple[float, float]:
    """(seconds, robust accuracy) of torchattacks' MultiAttack of the standard members."""
    common.sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        n_classes = model(x[:1].to(device)).shape[1]
    attack = torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=norm, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        torchattacks.APGDT(model, norm=norm, eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=0),
        torchattacks.FAB(model, norm=norm, eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                         n_classes=n_classes, seed=0),
        torchattacks.Square(model, norm=norm, eps=eps, n_queries=5000, n_restarts=1, seed=0),
    ])
    accuracy = common.bare_accuracy(model, attack, x, y, batch_size, device)
    return time.perf_counter() - start, accuracy


def robustclip_run(model, x, y, eps: float, norm: str, batch_size: int, device) -> tuple[float, float]:
    """(seconds, robust accuracy) of ``evaluate`` with the standard cascade, bounds off."""
    cascade = evaluation.make_cascade("standard", eps, norm)
    common.sync(device)
    start = time.perf_counter()
    ev = evaluation.evaluate({"model": model}, x, y, [cascade], batch_size=batch_size, bounds=False)
    return time.perf_counter() - start, float(ev.results[-1].robust.double().mean())


def main(argv: list[str] | None = None) -> float:
    """Print the timings; return the median robustclip / bare time ratio."""
    parser = common.parser(__doc__)
    parser.add_argument("--run", default=None, help="a trained robustclip run (default: untrained)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--norm", choices=["Linf", "L2"], default="Linf")
    args = parser.parse_args(argv)
    device = common.setup(args)
    if args.run:
        model = robustclip.load(args.run, device=device).eval()
        x, y = test_set(model.robustclip_meta["dataset"], args.samples)
    else:
        model = build_model("simpleconv", "mnist").to(device).eval()
        x, y = synthetic(args.samples).tensors
    for p in model.parameters():
        p.requires_grad_(False)
    work = (model, x, y, args.eps, args.norm, args.batch_size, device)
    median = common.interleaved({"bare": bare_loop, "robustclip": robustclip_run}, work,
                                args.rounds, log)
    print(f"device {device}, {args.run or 'untrained simpleconv'}, {args.samples} samples, "
          f"batch {args.batch_size}, standard {args.norm} eps {args.eps:g}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    return common.print_ratio(median, "robustclip", "bare",
                              {"bare": "bare torchattacks MultiAttack",
                               "robustclip": "robustclip standard cascade"})


if __name__ == "__main__":
    main()
