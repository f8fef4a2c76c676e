"""L2 certificates from a Lipschitz bound (Tsuzuku et al. 2018): a logit margin above
sqrt(2) * L * r means no perturbation of L2 norm <= r changes the prediction."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def certified(logits: Tensor, labels: Tensor, L: float, radius: float) -> Tensor:
    """Per sample (bool, shape (n,)): correct AND margin > sqrt(2) * L * radius.

    logits: (n, classes); margin = top logit - runner-up (Tsuzuku et al. 2018); L: the L2
    Lipschitz bound of the logits; radius: L2 radius in input units.  For an Linf eps
    pass ``linf_to_l2(eps, d)``.  NaN L certifies nothing.
    """
    top2 = logits.topk(2, dim=1).values
    correct = logits.argmax(dim=1) == labels
    if math.isnan(L):
        return torch.zeros_like(correct)
    return correct & (top2[:, 0] - top2[:, 1] > math.sqrt(2) * L * radius)


def linf_to_l2(eps: float, d: int) -> float:
    """L2 radius of the ball holding the Linf ball of radius ``eps`` in dimension ``d``."""
    return eps * math.sqrt(d)
