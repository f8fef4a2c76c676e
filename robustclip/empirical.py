"""Empirical Lipschitz ratios: ||f(x) - f(x')|| / ||x - x'|| over pairs of inputs, a LOWER
bound of the Lipschitz constant, measured exactly (in float64 on a copy of the model)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from robustclip.errors import RobustclipError
from robustclip.spectral import float64_twin


def pair_ratios(fx_: Tensor, fx_other: Tensor, x: Tensor, x_other: Tensor) -> Tensor:
    """Per pair ||f(x) - f(x')|| / ||x - x'|| (L2), shape (n,); pairs with x = x' give 0.

    The quotient is only as good as the precision of f: in float32, rounding noise of
    about 1e-6 |f| over a distance of 1e-7 (e.g. CW's tanh round trip) gives a ratio far
    above the true one.  :func:`~robustclip.spectral.float64_twin` and
    :func:`exact_pair_ratios` avoid that.
    """
    num = (fx_ - fx_other).flatten(1).norm(dim=1)
    den = (x - x_other).flatten(1).norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.zeros_like(num))


def exact_pair_ratios(twin: nn.Module, x: Tensor, x_other: Tensor) -> Tensor:
    """Per pair ||f(x) - f(x')|| / ||x - x'||, shape (n,), evaluated in float64 on
    ``twin`` (a :func:`~robustclip.spectral.float64_twin`): a true lower bound of f's L2
    Lipschitz constant even for pairs a float32 ulp apart.  Returned in float64, on the
    inputs' device."""
    xd, od = x.to(torch.float64), x_other.to(torch.float64)
    with torch.no_grad():
        return pair_ratios(twin(xd), twin(od), xd, od)


def screened_ratio(twin: nn.Module, x: Tensor, x_other: Tensor, fx_: Tensor, fx_other: Tensor,
                   *, top: int = 8, floor: float = 1e-3) -> Tensor:
    """Largest exact pair ratio (float64 scalar) over the ``top`` most promising pairs.

    fx_, fx_other: the model's own (float32) outputs on x, x_other, which rank the pairs
    by ||f(x) - f(x')|| / max(||x - x'||, floor): pairs closer than ``floor`` (L2, input
    units), whose float32 quotient is mostly rounding, do not crowd out the others.  The
    chosen pairs are then measured on ``twin`` (:func:`exact_pair_ratios`), so the result
    is an exact ratio of real pairs, a lower bound of the Lipschitz constant, at the cost
    of 2 x ``top`` float64 samples.
    """
    num = (fx_ - fx_other).flatten(1).norm(dim=1)
    den = (x - x_other).flatten(1).norm(dim=1)
    pick = (num / den.clamp_min(floor)).topk(min(top, len(x))).indices
    return exact_pair_ratios(twin, x[pick], x_other[pick]).max()


def empirical_lipschitz(model: nn.Module, x: Tensor, x_other: Tensor) -> float:
    """Largest ||f(x_i) - f(x'_i)|| / ||x_i - x'_i|| over the pairs (x_i, x'_i), shape (n, ...).

    A lower bound of the Lipschitz constant (e.g. over test pairs and adversarial pairs),
    computed in float64 on a copy of the model (see :func:`pair_ratios`).
    """
    if x.shape != x_other.shape:
        raise RobustclipError(f"pairs need equal shapes, got {tuple(x.shape)} and {tuple(x_other.shape)}")
    ratios = exact_pair_ratios(float64_twin(model), x, x_other)
    return float(ratios.max()) if ratios.numel() else 0.0
