"""L2 certificates from a Lipschitz bound (Tsuzuku et al. 2018): a logit margin above
sqrt(2) * L * r means no perturbation of L2 norm <= r changes the prediction."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def predicted_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """Per sample (bool, shape (n,)): the top logit is the label's and every logit of the
    row is finite.  A row holding NaN or an infinity is wrong: +inf on the label would
    otherwise count as correct whatever the input, and its loss gradient (NaN) stops
    every gradient attack."""
    return (logits.argmax(dim=1) == labels) & logits.isfinite().all(dim=1)


def certified(logits: Tensor, labels: Tensor, L: float, radius: float) -> Tensor:
    """Per sample (bool, shape (n,)): correct (:func:`predicted_correct`, so finite) AND
    margin > sqrt(2) * L * radius.

    logits: (n, classes); margin = top logit - runner-up (Tsuzuku et al. 2018); L: the L2
    Lipschitz bound of the logits; radius: L2 radius in input units.  For an Linf eps
    pass ``linf_to_l2(eps, d)``.  NaN L certifies nothing.
    """
    top2 = logits.topk(2, dim=1).values
    correct = predicted_correct(logits, labels)
    if math.isnan(L):
        return torch.zeros_like(correct)
    return correct & (top2[:, 0] - top2[:, 1] > math.sqrt(2) * L * radius)


def linf_to_l2(eps: float, d: int) -> float:
    """L2 radius of the ball holding the Linf ball of radius ``eps`` in dimension ``d``."""
    return eps * math.sqrt(d)
