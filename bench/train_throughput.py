"""Training cost of each spectral method relative to plain training: time and operators.

Variants: every method of ``robustclip.models.METHODS`` (``none`` and ``miyato`` with
their tracking-only wrappers: PowerQR tracking, no clip events), plus ``plain`` (no
wrappers at all: the baseline).  Ratios are printed against ``plain`` and against ``none``.

Models (``--model``): ``simpleconv``, the tutorial's model on MNIST-shaped data (1x28x28;
``fastclip-composite`` needs its composite variant ``simpleconv-composite``), or
``resnet18``, robustclip's CIFAR ResNet-18 on CIFAR-10-shaped data (3x32x32; its convs
are ConvBN composites, so every method, the composite one included, trains it as is).
Every variant trains with SGD (momentum 0.9) on synthetic batches, in the same process, on
the same device.

Time: methods are timed in interleaved rounds (a round: ``--steps`` steps of each method
in turn) and the median images/s per method is reported, which evens out drifts in
machine load.  Clip events are included: with ``init_delay = 0`` a round of 2 x
clip_steps steps holds two of them.

Operators: the steady-state training step (forward, loss, backward, optimiser step, and
the per-step tracking and rescaling of the wrappers; no clip event) is run
``--profile-steps`` times under ``torch.profiler`` after a warm-up, and the mean count
per step is reported (``bench/common.py: operator_counts``): ``ops``, the aten operators
dispatched by Python or by the autograd engine, and ``kernels``, the aten ops at the
bottom of the call tree that compute something (views and bare allocations left out;
about one kernel launch each on a GPU).  Both are exact and deterministic on the CPU.

    python bench/train_throughput.py [--model simpleconv|resnet18] [--steps N]
        [--rounds 3] [--profile-steps 3] [--batch-size 128] [--clip-steps 50]
        [--device auto] [--threads N]

``--rounds 0`` counts operators only (no timing).
"""
from __future__ import annotations

import logging
import math
import statistics
import time

import torch
import torch.nn.functional as F

from robustclip.data import dataset_info, synthetic
from robustclip.models import METHODS, build_model, wrappers

import common  # bench/common.py, beside this file

log = logging.getLogger("bench.train_throughput")

#: per --model: dataset, the model each method trains, default --steps
SETUPS = {
    "simpleconv": ("mnist", {"fastclip-composite": "simpleconv-composite"}, 100),
    "resnet18": ("cifar10", {}, 4),
}


def _step(model, optimizer, x, y) -> None:
    """One training step as a user writes it."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _steps(model, optimizer, batches, n: int, device: torch.device) -> float:
    """Run ``n`` training steps over ``batches`` (list of (x, y) on device); return images/s."""
    common.sync(device)
    start = time.perf_counter()
    images = 0
    for i in range(n):
        x, y = batches[i % len(batches)]
        _step(model, optimizer, x, y)
        images += len(y)
    common.sync(device)
    return images / (time.perf_counter() - start)


def _clip_event_within(model, n: int) -> bool:
    """Whether one of the next ``n`` steps of ``model`` holds a clip event."""
    for w in wrappers(model):
        if w.clip is not None and w.clip_events:
            for count in range(w._count + 1, w._count + n + 1):
                if count > w.init_delay and (count - w.init_delay) % w.clip_steps == 0:
                    return True
    return False


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """Print the table; return (median images/s, ops, kernels) per method."""
    parser = common.parser(__doc__)
    parser.add_argument("--model", choices=sorted(SETUPS), default="simpleconv")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per method per round (default: 100 for simpleconv, 4 for resnet18)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steady-state steps profiled per method")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--clip-steps", type=int, default=50)
    args = parser.parse_args(argv)
    device = common.setup(args)
    dataset, model_of, default_steps = SETUPS[args.model]
    steps = args.steps or default_steps
    info = dataset_info(dataset)
    x, y = synthetic(4 * args.batch_size, info.shape, info.num_classes).tensors
    batches = [(xb.to(device), yb.to(device)) for xb, yb in
               zip(x.split(args.batch_size), y.split(args.batch_size))]
    method_args = {"clip": 1.0, "clip_steps": args.clip_steps, "init_delay": 0}
    variants = {"plain": ("none", False)} | {m: (m, True) for m in METHODS}
    runs, counts = {}, {}
    for label, (method, track) in variants.items():
        name = model_of.get(method, args.model)
        torch.manual_seed(0)
        model = build_model(name, dataset, method, method_args, track=track).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        _steps(model, optimizer, batches, 2, device)  # warm-up: first-step initialisation
        if _clip_event_within(model, args.profile_steps):
            raise SystemExit(f"--profile-steps {args.profile_steps} would profile a clip event; "
                             f"use fewer than --clip-steps {args.clip_steps} - 2")
        xb, yb = batches[0]
        counts[label] = common.operator_counts(lambda: _step(model, optimizer, xb, yb),
                                               args.profile_steps)
        runs[label] = (name, model, optimizer)
        log.info("%s: %.1f ops, %.1f kernels per step", label, *counts[label])
    rates: dict[str, list[float]] = {m: [] for m in runs}
    for r in range(args.rounds):
        for method, (_, model, optimizer) in runs.items():
            rates[method].append(_steps(model, optimizer, batches, steps, device))
        log.info("round %d/%d done", r + 1, args.rounds)
    median = {m: statistics.median(v) if v else math.nan for m, v in rates.items()}  # --rounds 0: counts only
    print(f"{args.model} on {device}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.rounds} rounds x {steps} steps, clip every {args.clip_steps} steps, "
          f"{torch.get_num_threads()} threads; ops/kernels: mean of {args.profile_steps} "
          f"steady-state steps")
    print(f"{'method':<19} {'model':<21} {'images/s':>8} {'time/plain':>10} {'time/none':>9} "
          f"{'ops':>7} {'/plain':>6} {'/none':>6} {'kernels':>7} {'/plain':>6} {'/none':>6}")
    for method, (name, _, _) in runs.items():
        cost = {base: median[base] / median[method] for base in ("plain", "none")}
        ops, kernels = counts[method]
        print(f"{method:<19} {name:<21} {median[method]:>8.0f} {cost['plain']:>10.3f} "
              f"{cost['none']:>9.3f} {ops:>7.1f} {ops / counts['plain'][0]:>6.2f} "
              f"{ops / counts['none'][0]:>6.2f} {kernels:>7.1f} "
              f"{kernels / counts['plain'][1]:>6.2f} {kernels / counts['none'][1]:>6.2f}")
    return {m: (median[m], *counts[m]) for m in runs}


if __name__ == "__main__":
    main()
