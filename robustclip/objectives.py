"""The loss of one training step, as the config chooses it.

* ``train.loss = "cross-entropy"`` with ``train.adversarial.attack = "none"``: the
  cross-entropy of the batch;
* adversarial training (``train.adversarial``, robustclip.adversarial): examples crafted
  against the model under ``passive`` (the spectral wrappers take no step), then
  ``loss = "adversarial"``: the cross-entropy of the adversarial examples alone, or
  ``loss = "trades"``: CE(clean) + beta * KL(p(x) || p(x_adv)) per sample, the examples
  maximising that KL from the clean predictions.  TRADES takes ONE training-mode forward
  of the clean and adversarial batch together, so that the wrappers take one tracking
  step (and clip event) per optimiser step as in any run; BatchNorm's batch and running
  statistics are then those of the 2N images (TRADES' reference code runs two forwards);
* ``train.loss = "lipschitz-margin"`` (robustclip.margin): the cross-entropy of the
  logits with sqrt(2) * L * eps_cert added to every logit but the true one, times
  ``train.margin_temperature`` (Béthune et al. 2022: a Lipschitz network's logits span
  a bounded range, and a plain cross-entropy keeps pushing margins it cannot afford).

The random starts are drawn from a generator on the training device seeded by
(train.seed, global step), for the whole global batch (a rank takes its rows): they are
a function of the step, so a resumed run draws what the uninterrupted one draws, on any
number of ranks, and no generator state needs saving.
"""
from __future__ import annotations

import logging
import zlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from robustclip.adversarial import N_FGSM_NOISE, craft, passive, step_ratio, uniform_noise
from robustclip.config import Config
from robustclip.distributed import Context
from robustclip.margin import TrainingBound, margin_logits

log = logging.getLogger(__name__)


class Objective:
    """``objective(x, y, rows, total, step)`` -> (logits, per-sample losses (N,)).

    net: the model as trained (DDP-wrapped under torchrun): the one training-mode forward
    per step goes through it; model: the plain model, which crafting and the margin's L
    use.  x, y: this rank's share ``rows`` of a global batch of ``total`` images (on the
    device); step: the 0-based global step.  The logits are those accuracy is scored on:
    the adversarial examples' for ``loss = "adversarial"``, the clean ones otherwise.
    steps_per_epoch: global batches per epoch (the eps warm-up's unit).
    """

    def __init__(self, config: Config, net: nn.Module, model: nn.Module, ctx: Context,
                 input_shape: Sequence[int], steps_per_epoch: int) -> None:
        tc = config.train
        self.net, self.model, self.seed = net, model, tc.seed
        self.adv, self.eps_cert, self.temperature = tc.adversarial, tc.eps_cert, tc.margin_temperature
        self.bound = (TrainingBound(model, input_shape, sound=tc.margin_bound == "sound")
                      if tc.loss == "lipschitz-margin" else None)
        if self.bound is not None:
            log.info("lipschitz-margin loss, eps_cert %g: %s", tc.eps_cert, self.bound.describe())
        self.adversarial = self.adv.attack != "none"
        if self.adversarial:
            self.generator = torch.Generator(device=ctx.device)
            self.steps = self.adv.steps if self.adv.attack == "pgd" else 1
            nfgsm = self.adv.attack == "n-fgsm"
            self.noise_scale, self.project = (N_FGSM_NOISE, False) if nfgsm else (1.0, True)
            self.step_ratio = step_ratio(self.adv.attack, self.adv.steps, self.adv.step_size, self.adv.eps)
            self.warmup_steps = self.adv.warmup_epochs * steps_per_epoch
            log.info("adversarial training: %s (%d step(s) of %g eps) at eps %g%s, %s loss, "
                     "BatchNorm in %s mode while crafting", self.adv.attack, self.steps,
                     self.step_ratio, self.adv.eps,
                     f" after a linear warm-up over {self.adv.warmup_epochs} epoch(s)"
                     if self.warmup_steps else "", self.adv.loss, self.adv.bn_mode)

    def eps(self, step: int) -> float:
        """The Linf radius (pixel units) at the 0-based global ``step``, warm-up included."""
        if not self.warmup_steps:
            return self.adv.eps
        return self.adv.eps * min(1.0, (step + 1) / self.warmup_steps)

    def __call__(self, x: Tensor, y: Tensor, rows: slice, total: int,
                 step: int) -> tuple[Tensor, Tensor]:
        if self.adversarial:
            return self._adversarial(x, y, rows, total, step)
        logits = self.net(x)
        if self.bound is None:
            return logits, F.cross_entropy(logits, y, reduction="none")
        shifted = margin_logits(logits, y, self.bound(), self.eps_cert)
        return logits, F.cross_entropy(self.temperature * shifted, y, reduction="none")

    def _adversarial(self, x: Tensor, y: Tensor, rows: slice, total: int,
                     step: int) -> tuple[Tensor, Tensor]:
        eps = self.eps(step)
        self.generator.manual_seed(zlib.crc32(f"adversarial/{self.seed}/{step}".encode()))
        noise = uniform_noise(tuple(x.shape), self.generator, rows, total)
        trades = self.adv.loss == "trades"
        with passive(self.model, self.adv.bn_mode):
            clean_probs = None
            if trades:
                with torch.no_grad():
                    clean_probs = F.softmax(self.model(x), 1)
            x_adv = craft(self.model, x, y, noise, eps=eps, step_size=self.step_ratio * eps,
                          steps=self.steps, clean_probs=clean_probs,
                          noise_scale=self.noise_scale, project=self.project,
                          clip_start=self.adv.clip_start)
        if not trades:
            logits = self.net(x_adv)
            return logits, F.cross_entropy(logits, y, reduction="none")
        clean, adv = self.net(torch.cat([x, x_adv])).split(len(x))
        kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="none").sum(1)
        return clean, F.cross_entropy(clean, y, reduction="none") + self.adv.beta * kl
