"""Harness overhead: ``robustclip.evaluation.evaluate`` against a bare torchattacks PGD loop.

Both run PGD (Linf, step eps/10, random start) on the same model (the tutorial's
``simpleconv``) and the same synthetic MNIST-shaped samples, in the same process, in
interleaved rounds; the median per side is reported.  The bare loop is what a user would
write: ``torchattacks.PGD`` per batch, then the accuracy on x_adv.  The harness adds the
clean pass (with a determinism spot check), per-batch seeding, sanity checks, empirical
Lipschitz ratios and per-sample bookkeeping; the Lipschitz bound (a once-per-model cost)
is timed separately.  Goal: overhead <= 5%.

    python bench/harness_overhead.py [--samples 512] [--batch-size 256] [--steps 20]
                                     [--rounds 3] [--eps 0.1] [--device auto] [--threads N]
"""
from __future__ import annotations

import logging
import time

import torch
import torchattacks

from robustclip import evaluation as harness
from robustclip.bounds import lipschitz_report
from robustclip.data import synthetic
from robustclip.models import build_model

import common  # bench/common.py, beside this file

log = logging.getLogger("bench.harness_overhead")



def bare_loop(model, x, y, eps: float, steps: int, batch_size: int, device) -> tuple[float, float]:
    """(seconds, robust accuracy) of a plain torchattacks PGD loop."""
    common.sync(device)
    start = time.perf_counter()
    attack = torchattacks.PGD(model, eps=eps, alpha=eps / 10, steps=steps, random_start=True)
    accuracy = common.bare_accuracy(model, attack, x, y, batch_size, device)
    return time.perf_counter() - start, accuracy


def harness_run(model, x, y, eps: float, steps: int, batch_size: int, device) -> tuple[float, float]:
    """(seconds, robust accuracy) of the harness on the same work, bounds excluded."""
    spec = harness.make_spec("pgd", eps, steps=steps, rel_stepsize=0.1, random_start=True)
    common.sync(device)
    start = time.perf_counter()
    ev = harness.evaluate({"simpleconv": model}, x, y, [spec], batch_size=batch_size,
                          bounds=False)
    return time.perf_counter() - start, float(ev.results[0].robust.float().mean())


def main(argv: list[str] | None = None) -> float:
    """Print the timings; return the median harness / bare time ratio."""
    parser = common.parser(__doc__)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args(argv)
    device = common.setup(args)
    model = build_model("simpleconv", "mnist").to(device).eval()
    x, y = synthetic(args.samples).tensors
    work = (model, x, y, args.eps, args.steps, args.batch_size, device)
    bare_loop(*work)  # warm-up (allocator, cuDNN autotuning)
    harness_run(*work)
    median = common.interleaved({"bare": bare_loop, "harness": harness_run}, work,
                                args.rounds, log)
    start = time.perf_counter()
    lipschitz_report(model, x.shape[1:])
    bound_seconds = time.perf_counter() - start
    print(f"device {device}, {args.samples} samples, batch {args.batch_size}, PGD-{args.steps}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")
    ratio = common.print_ratio(median, "harness", "bare", {"bare": "bare torchattacks loop",
                                                           "harness": "robustclip harness"})
    print(f"Lipschitz bound (once per model, not in the ratio): {bound_seconds:.2f} s")
    return ratio


if __name__ == "__main__":
    main()
