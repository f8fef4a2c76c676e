"""The network Lipschitz bound of each model against the empirical ratio it reaches."""
from __future__ import annotations

import math
import time
from typing import Any, Mapping

import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from robustclip.bounds import lipschitz_report
from robustclip.empirical import exact_pair_ratios
from robustclip.evaluation.attacks import make_spec
from robustclip.evaluation.craft import adversarial, evaluating
from robustclip.evaluation.evaluate import batches_of, clean_pass
from robustclip.spectral import float64_twin, module_device


def lipschitz_summary(models: Mapping[str, nn.Module], images: Tensor, labels: Tensor, *,
                      batch_size: int = 256, seed: int = 0, l2_eps: float = 1.0,
                      **bound_kwargs: Any) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Per model: Lipschitz bound against the empirical ratio over neighbouring test pairs
    and (x, x_adv) pairs of a 10-step PGD-L2 at ``l2_eps``.

    Returns (summary with model, bound, bound_kind, empirical, bound_over_empirical, seconds;
    label -> per-layer DataFrame from ``lipschitz_report``).
    """
    spec = make_spec("pgdl2", l2_eps, steps=10)
    batches = batches_of(images, labels, batch_size)
    rows, layers = [], {}
    for name, model in models.items():
        start = time.perf_counter()
        bound, layers[name] = lipschitz_report(model, tuple(images.shape[1:]), **bound_kwargs)
        with evaluating(model):
            twin = float64_twin(model)
            ratio = clean_pass(model, name, batches, [], twin).ratio
            device = module_device(model)
            for b, (x, y) in enumerate(batches):
                x, y = x.to(device), y.to(device)
                x_adv = adversarial(model, [spec], x, y, seed, b)[spec]
                ratio = torch.maximum(ratio, exact_pair_ratios(twin, x_adv, x).max())  # all pairs
        rows.append({"model": name, "bound": bound,
                     "bound_kind": layers[name].attrs.get("bound_kind", "estimate"),
                     "empirical": float(ratio),
                     "bound_over_empirical": bound / float(ratio) if float(ratio) > 0 else math.nan,
                     "seconds": time.perf_counter() - start})
    return pd.DataFrame(rows), layers
