"""What per-step tracking's Gershgorin bound costs in accuracy, against exact Ritz values.

simpleconv-composite with fastclip-composite (clip 1, clip events every 50 steps from
step 50, the composite rescaled after every step) trains on the first ``--steps`` x 128
MNIST training images (SGD, momentum 0.9), twice from the same start:

* ``bound``: as robustclip trains (``spectral.tracking_steps``: the block unrotated, its
  top value the Gershgorin bound of its Rayleigh-Ritz matrix);
* ``exact``: the same step with the block rotated to its Ritz vectors and the exact Ritz
  values (``spectral.power_qr_step``, LAPACK), as per-step tracking did before.

Printed per variant and ``--lr``: the per-step top value over the block's exact top Ritz
value (median, max; 1 for ``exact``), and the composite's true sigma_1 (dense SVD of the
eval-mode conv+BN) after every ``--every`` steps (median, max, and the max from step
``--settled`` on).

    python bench/tracking_bound.py [--lr 0.01 0.05] [--steps 300] [--every 10] [--settled 60]
"""
from __future__ import annotations

import statistics
from unittest import mock

import torch
import torch.nn.functional as F

from robustclip import clip as clip_module
from robustclip import spectral
from robustclip.data import load
from robustclip.models import build_model, wrappers

import common  # bench/common.py, beside this file


def _exact_steps(steps):
    return [spectral.power_qr_step(A, x) for A, x in steps]


def run(lr: float, variant: str, x: torch.Tensor, y: torch.Tensor, every: int,
        device: torch.device) -> tuple[list[float], list[tuple[int, float]]]:
    """(top value / exact top Ritz value per composite step, [(step, true sigma_1)])."""
    torch.manual_seed(0)
    model = build_model("simpleconv-composite", "mnist", "fastclip-composite",
                        {"clip": 1.0, "clip_steps": 50, "init_delay": 0}).to(device).train()
    composite = next(w for w in wrappers(model) if w.track_extra)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ratios: list[float] = []
    inner = _exact_steps if variant == "exact" else spectral.tracking_steps

    def recording(steps):
        exact = [spectral.power_qr_step(A, v)[0] for A, v in steps]
        out = inner(steps)
        ratios.extend(float(values[0] / ritz[0]) for (values, v), ritz in zip(out, exact) if len(v) > 1)
        return out

    true = []
    with mock.patch.object(clip_module, "tracking_steps", recording):
        for step, (xb, yb) in enumerate(zip(x.split(128), y.split(128)), start=1):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
            optimizer.step()
            if step % every == 0:
                true.append((step, float(spectral.dense_singular_values(
                    composite.module, composite._shape, 1)[0])))
    return ratios, true


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--settled", type=int, default=60)
    args = p.parse_args()
    device = common.setup(args)
    x, y = load("mnist", "train", limit=128 * args.steps).tensors
    print(f"simpleconv-composite on {device}, torch {torch.__version__}, {args.steps} steps, "
          f"true sigma_1 every {args.every} steps")
    print(f"{'lr':>6} {'variant':<7} {'top/Ritz median':>15} {'max':>7} "
          f"{'sigma_1 median':>14} {'max':>7} {f'max from {args.settled}':>13}")
    for lr in args.lr:
        for variant in ("exact", "bound"):
            ratios, true = run(lr, variant, x, y, args.every, device)
            sigmas = [s for _, s in true]
            settled = [s for step, s in true if step >= args.settled]
            print(f"{lr:>6g} {variant:<7} {statistics.median(ratios):>15.4f} {max(ratios):>7.4f} "
                  f"{statistics.median(sigmas):>14.4f} {max(sigmas):>7.4f} {max(settled):>13.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
