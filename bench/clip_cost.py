"""Training-step time of the tutorial's ConvModel under each spectral method.

    .venv/bin/python bench/clip_cost.py [--steps 200] [--rounds 3] [--device cpu]

(a) no wrapper, (b) tracking only, (c) FastClip every 50 steps, (d) torch's
spectral_norm parametrization (Miyato), (e) Gouk: power iteration + rescale every step.
Prints ms/step and the ratio to (a), all measured in this run, rounds interleaved so
that machine noise hits every variant alike; the median round is reported.
Goal (issue 2): (b) and (c) within 1.10 of (a) on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from robustclip import SpectralClip


def conv_model(method: str) -> nn.Module:
    """Conv 1->64 3x3 + BN + ReLU + dense, as in the tutorial, wrapped per ``method``."""
    conv, bn, fc = nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Linear(64 * 28 * 28, 10)
    if method == "tracking":
        conv, fc = SpectralClip(conv, None), SpectralClip(fc, None)
    elif method == "fastclip":
        conv, fc = SpectralClip(conv, 1.0, clip_steps=50), SpectralClip(fc, 1.0, clip_steps=50)
    elif method == "miyato":
        conv, fc = spectral_norm(conv), spectral_norm(fc)
    elif method == "gouk":
        conv, fc = (SpectralClip(m, 1.0, rescale_every_step=True, clip_events=False) for m in (conv, fc))
    return nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), fc)


def time_steps(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds per SGD step (forward, backward, step) over ``batches``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if batches[0][0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(args.batch_size, 1, 28, 28, generator=gen).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=gen).to(device))
               for _ in range(args.steps)]
    methods = ["none", "tracking", "fastclip", "miyato", "gouk"]
    models = {}
    for m in methods:
        torch.manual_seed(0)
        models[m] = conv_model(m).to(device)
        time_steps(models[m], batches[:5])  # warm-up: first-call initialisation, allocator
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            times[m].append(time_steps(models[m], batches))
    base = statistics.median(times["none"])
    print(f"device={device} threads={torch.get_num_threads()} steps={args.steps} rounds={args.rounds} "
          f"batch={args.batch_size}")
    print(f"{'method':<10} {'ms/step':>8} {'ratio':>6}")
    for m in methods:
        t = statistics.median(times[m])
        print(f"{m:<10} {t * 1e3:8.2f} {t / base:6.3f}")


if __name__ == "__main__":
    main()
