"""Training throughput (images/s) of each spectral method relative to plain training.

Variants: every method of ``robustclip.models.METHODS`` (``none`` and ``miyato`` with
their tracking-only wrappers: PowerQR tracking, no clip events), plus ``plain`` (no
wrappers at all: the baseline).  Goal (issue 2): none (tracking) and fastclip within 1.10
of plain.  Every variant trains the tutorial's model (``simpleconv``; ``fastclip-composite`` needs
its composite variant ``simpleconv-composite``) with SGD on synthetic MNIST-shaped
batches, in the same process, on the same device.  Methods are timed in interleaved
rounds (a round: ``--steps`` steps of each method in turn) and the median per method is
reported, which evens out drifts in machine load.  Clip events are included: with
``init_delay = 0`` each round of 2 x clip_steps steps holds two of them.

    python bench/train_throughput.py [--steps 100] [--rounds 3] [--batch-size 128]
                                     [--clip-steps 50] [--device auto] [--threads N]
"""
from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F

from robustclip.data import synthetic
from robustclip.models import METHODS, build_model

import common  # bench/common.py, beside this file

log = logging.getLogger("bench.train_throughput")



def _steps(model, optimizer, batches, n: int, device: torch.device) -> float:
    """Run ``n`` training steps over ``batches`` (list of (x, y) on device); return images/s."""
    common.sync(device)
    start = time.perf_counter()
    images = 0
    for i in range(n):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(y)
    common.sync(device)
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the table; return the median images/s per method."""
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per method per round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--clip-steps", type=int, default=50)
    args = parser.parse_args(argv)
    device = common.setup(args)
    x, y = synthetic(8 * args.batch_size).tensors
    batches = [(xb.to(device), yb.to(device)) for xb, yb in
               zip(x.split(args.batch_size), y.split(args.batch_size))]
    method_args = {"clip": 1.0, "clip_steps": args.clip_steps, "init_delay": 0}
    variants = {"plain": ("none", False)} | {m: (m, True) for m in METHODS}
    runs = {}
    for label, (method, track) in variants.items():
        name = "simpleconv-composite" if method == "fastclip-composite" else "simpleconv"
        model = build_model(name, "mnist", method, method_args, track=track).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        _steps(model, optimizer, batches, 3, device)  # warm-up: first-step initialisation
        runs[label] = (name, model, optimizer)
    rates: dict[str, list[float]] = {m: [] for m in runs}
    for r in range(args.rounds):
        for method, (_, model, optimizer) in runs.items():
            rates[method].append(_steps(model, optimizer, batches, args.steps, device))
        log.info("round %d/%d done", r + 1, args.rounds)
    median = {m: statistics.median(v) for m, v in rates.items()}
    print(f"device {device}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps, "
          f"clip every {args.clip_steps} steps, {torch.get_num_threads()} threads")
    print(f"{'method':<20} {'model':<22} {'images/s':>10} {'vs plain':>8} {'step cost':>10}")
    for method, (name, _, _) in runs.items():
        ratio = median[method] / median["plain"]
        print(f"{method:<20} {name:<22} {median[method]:>10.0f} {ratio:>8.3f} {1 / ratio:>9.2f}x")
    return median


if __name__ == "__main__":
    main()
