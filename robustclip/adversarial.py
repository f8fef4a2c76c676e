"""Adversarial examples for training: the inner step of adversarial training.

* FGSM with a random start (Wong et al. 2020, "Fast is better than free"): a uniform
  random start in the Linf ball of radius eps, one signed-gradient step (1.25 eps by
  default), projection onto the ball and [0, 1];
* N-FGSM (de Jorge et al. 2022, "Make some noise"): a uniform random start of twice the
  radius (2 eps), one signed-gradient step of eps, and no projection onto the eps ball
  (only onto [0, 1]): the training perturbation may reach 3 eps in Linf.  Proposed to
  avoid FGSM-RS's catastrophic overfitting at the same cost; on MNIST at eps 0.3 it
  overfit too (results/FINDINGS.md);
* PGD (Madry et al. 2018): a uniform random start, then ``steps`` signed-gradient steps,
  each projected;
* the objective is the cross-entropy, or for TRADES (Zhang et al. 2019) the KL
  divergence KL(p(x) || p(x_adv)) from the clean predictions (held fixed while crafting).

Crafting runs the model under :func:`passive`: every module in eval mode, so the spectral
wrappers are pass-throughs (no tracking step, no clip event, no step count) and Miyato's
parametrization runs no power iteration; BatchNorm normalises by the running statistics
(``bn_mode`` "eval") or by the batch's without updating the running ones ("train").
Crafting takes gradients with respect to the input only (``torch.autograd.grad``): no
``.grad`` is touched, and it makes no host synchronisation.

:class:`OverfittingMonitor` measures FGSM-RS and APGD-CE (or PGD) accuracy on a fixed
held-out batch each epoch and flags catastrophic overfitting (Wong et al. 2020, Section
5.3; Andriushchenko & Flammarion 2020).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torch import Tensor

from robustclip.distributed import Context, all_reduce_sum, part
from robustclip.evaluation.craft import seeded
from robustclip.spectral import _BATCHNORMS

log = logging.getLogger(__name__)

#: (attack, default step size / eps): Wong et al.'s 1.25 for FGSM-RS; de Jorge et al.'s 1
#: for N-FGSM (its noise: 2 eps); Madry's 2.5 / steps.
FGSM_STEP = 1.25
N_FGSM_STEP = 1.0
N_FGSM_NOISE = 2.0
PGD_STEP_TIMES_STEPS = 2.5


@contextlib.contextmanager
def passive(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """The model as crafting sees it, for the block: every module in eval mode, except,
    with ``bn_mode`` "train", the BatchNorms, which then use the batch's statistics and
    leave their running statistics (and ``num_batches_tracked``) alone.  No module's
    state changes in a forward pass; the modes and flags are restored on exit."""
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, _BATCHNORMS):
                m.training, m.track_running_stats = True, False
    try:
        yield model
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


def step_ratio(attack: str, steps: int, step_size: float, eps: float) -> float:
    """The step size of ``attack`` as a multiple of eps: ``step_size`` / eps where it is
    set (non-zero), else the default (FGSM-RS: 1.25; N-FGSM: 1; PGD: 2.5 / steps)."""
    if step_size:
        return step_size / eps
    return {"fgsm-rs": FGSM_STEP, "n-fgsm": N_FGSM_STEP}.get(attack, PGD_STEP_TIMES_STEPS / steps)


def craft(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, *, eps: float,
          step_size: float, steps: int, clean_probs: Tensor | None = None,
          noise_scale: float = 1.0, project: bool = True, clip_start: bool = True) -> Tensor:
    """Adversarial examples of x (N, C, H, W) in [0, 1] within the Linf ball of radius
    ``eps`` (pixel units) and [0, 1].

    noise: (N, C, H, W) uniform in [-1, 1]: the random start x + noise_scale * eps *
    noise.  steps signed-gradient steps of ``step_size`` (1 for FGSM-RS and N-FGSM).
    clean_probs: (N, classes) softmax of the clean logits for TRADES' KL objective; None:
    cross-entropy with y.  project: False keeps only [0, 1] (N-FGSM: no eps ball).
    clip_start: False takes the first gradient at the raw random start, which may leave
    [0, 1] (Wong et al.'s MNIST code; their CIFAR code clips it); every step's result is
    clipped either way.  Run the model under :func:`passive`.  Returns x_adv, detached.
    """
    if clean_probs is None:
        objective: Callable[[Tensor], Tensor] = lambda out: F.cross_entropy(out, y, reduction="sum")  # noqa: E731
    else:
        objective = lambda out: F.kl_div(F.log_softmax(out, 1), clean_probs, reduction="sum")  # noqa: E731
    if project:
        low, high = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    else:
        low, high = torch.zeros_like(x), torch.ones_like(x)
    x_adv = x + (noise_scale * eps) * noise
    if clip_start:
        x_adv = torch.min(torch.max(x_adv, low), high)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(model(x_adv)), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), low), high)
    return x_adv.detach()


def uniform_noise(shape: tuple[int, ...], generator: torch.Generator, share: slice = slice(None),
                  total: int | None = None) -> Tensor:
    """Uniform noise in [-1, 1] of ``shape`` (N, ...), on the generator's device.

    Drawn for a batch of ``total`` rows (default N) of which this rank holds ``share``:
    a rank's share of a global batch gets what a single process gives those rows."""
    total = shape[0] if total is None else total
    draw = torch.rand((total, *shape[1:]), generator=generator, device=generator.device)
    return draw[share] * 2 - 1


class OverfittingMonitor:
    """FGSM-RS accuracy and a multi-step attack's on a fixed held-out batch, each epoch;
    flags catastrophic overfitting.

    x, y: the held-out samples (the last ``monitor_samples`` of the test split); under
    torchrun each rank attacks its share and the counts are all-reduced.  Both attacks run
    at the configured (full) eps whatever the warm-up, BatchNorm in eval mode, seeded by
    ``seed`` alone: every epoch attacks the same points from the same start, so a change
    measures the model.  FGSM-RS: one step of ``fgsm_step`` eps (the training attack's)
    from a uniform random start.  The multi-step ``attack``: "apgd-ce" (torchattacks'
    APGD, cross-entropy, ``steps`` iterations, one restart: AutoAttack's first stage; under
    torchrun each rank draws its share's start, so the count is not bit for bit one
    process's) or "pgd" (``steps`` steps of 2.5 eps / steps from the FGSM-RS start).
    APGD is the default because PGD-10 overstates an overfitting model (measured on the
    256 held-out points of the wide smallcnn FGSM-RS-trained for 20 epochs: PGD-10 63.7%,
    APGD-CE-10 41.8%, FGSM-RS 93.4%, so the gap rule below fires with APGD and not with
    PGD; on the healthy 10-epoch run, 88.7% and 87.9%; results/monitor-attacks), at about
    the same cost per step.
    Its accuracy is ``key`` ("apgd_acc" or "pgd_acc") in the epoch's metrics.

    Two rules, each an epoch of catastrophic overfitting:

    * drop (after Wong et al. 2020, whose early stopping fires when the PGD accuracy of a
      training minibatch falls by more than 0.2): the monitor attack's accuracy more than
      ``drop`` below that of the most robust earlier epoch, not only the previous one
      (measured: the wide smallcnn FGSM-RS-trained for 20 epochs slid from 86.7% to 63.7%
      under PGD-10 over ten epochs, never 0.2 in one, and ended at 14.5% under the
      standard evaluation);
    * gap (Andriushchenko & Flammarion 2020): FGSM-RS accuracy more than ``gap`` above the
      monitor attack's on the same points.  A model that overfits to the single-step attack from
      its first epochs never has a PGD accuracy to lose; what shows is the gap (measured:
      lipnet FGSM-RS-trained at 0.3 spent three epochs at 91-95% on its training
      examples and 0-5.5% under PGD-10, the drop rule silent).
    """

    def __init__(self, x: Tensor, y: Tensor, eps: float, steps: int, drop: float, seed: int,
                 ctx: Context, gap: float = 0.3, fgsm_step: float = FGSM_STEP,
                 attack: str = "apgd-ce") -> None:
        rows = part(len(x), ctx)
        self.x, self.y = x[rows].to(ctx.device), y[rows].to(ctx.device)
        self.total, self.eps, self.steps, self.drop, self.ctx = len(x), eps, steps, drop, ctx
        self.gap, self.fgsm_step, self.attack = gap, fgsm_step, attack
        self.rows, self.seed = rows, seed
        self.key = "apgd_acc" if attack == "apgd-ce" else "pgd_acc"
        self.label = f"{'APGD-CE' if attack == 'apgd-ce' else 'PGD'}-{steps}"

    def accuracy(self, model: nn.Module) -> dict[str, float]:
        """{"fgsm_acc", key}: fractions of all ranks' held-out samples; one host sync."""
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.seed)
        noise = uniform_noise(tuple(self.x.shape), gen, self.rows, self.total)
        with passive(model, "eval"):
            examples = [craft(model, self.x, self.y, noise, eps=self.eps,
                              step_size=self.fgsm_step * self.eps, steps=1)]
            if self.attack == "apgd-ce":
                with seeded(self.seed, self.x.device):  # APGD reseeds torch's RNG: fork it
                    examples.append(torchattacks.APGD(model, norm="Linf", eps=self.eps, steps=self.steps,
                                                      n_restarts=1, seed=self.seed, loss="ce")(self.x, self.y))
            else:
                examples.append(craft(model, self.x, self.y, noise, eps=self.eps, steps=self.steps,
                                      step_size=PGD_STEP_TIMES_STEPS * self.eps / self.steps))
            with torch.no_grad():
                counts = torch.stack([(model(x_adv).argmax(1) == self.y).sum().double() for x_adv in examples])
        fgsm, strong = (float(c) / self.total for c in all_reduce_sum(counts, self.ctx))
        return {"fgsm_acc": fgsm, self.key: strong}

    def check(self, epoch: int, measured: dict[str, float], best: tuple[int, float] | None) -> bool:
        """Whether this epoch's ``measured`` accuracies break a rule (``best``: the epoch
        and monitor-attack accuracy of the most robust earlier epoch); rank 0 logs a
        warning for each rule broken."""
        strong, fgsm = measured[self.key], measured["fgsm_acc"]
        dropped = best is not None and strong < best[1] - self.drop
        gapped = fgsm > strong + self.gap
        if self.ctx.main and dropped:
            log.warning("epoch %d: %s accuracy at eps %g on %d held-out test samples fell from "
                        "%.3f (epoch %d) to %.3f: catastrophic overfitting (Wong et al. 2020); the "
                        "model of epoch %d was more robust: consider stopping there, a smaller "
                        "train.adversarial.step_size or a longer warm-up", epoch, self.label,
                        self.eps, self.total, best[1], best[0], strong, best[0])
        if self.ctx.main and gapped:
            log.warning("epoch %d: on %d held-out test samples at eps %g, FGSM-RS leaves %.3f "
                        "accurate and %s %.3f: catastrophic overfitting (the model resists "
                        "the single step it trains against, not the attack); consider "
                        "train.adversarial.attack = \"pgd\", a smaller step_size or a longer "
                        "warm-up", epoch, self.total, self.eps, fgsm, self.label, strong)
        return dropped or gapped
