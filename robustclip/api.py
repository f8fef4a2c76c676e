"""The Python API for your own models: evaluate, clip, bound.

::

    import robustclip
    model = robustclip.clip_model(MyNet(), "fastclip", clip=1.0)   # before training
    table = robustclip.evaluate(model, (images, labels), eps=0.3)   # the standard evaluation
    bound = robustclip.lipschitz(model, (1, 28, 28))

Models take images in [0, 1] of shape (n, C, H, W) (any normalisation inside the model)
and return logits (n, classes).  ``evaluate`` returns the table ``robustclip attack``
prints, one row per (model, attack, norm, eps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from robustclip.bounds import lipschitz_report
from robustclip.clip import SpectralClip
from robustclip.errors import RobustclipError
from robustclip.files import parse_fraction
from robustclip.models import apply_method
from robustclip.report import results_dir


def clip_model(model: nn.Module, method: str = "fastclip", **method_args: Any) -> nn.Module:
    """Wrap, in place, every conv and dense layer of ``model`` (and conv+BN composites for
    'fastclip-composite') with a spectral-norm method: 'none', 'fastclip',
    'fastclip-composite', 'miyato' or 'gouk'.  ``method_args``: keywords of
    :class:`robustclip.SpectralClip` (clip, k, iters_per_step, ...).  Returns ``model``.

    A model that is clipped already (by an earlier call, ``robustclip.load`` or torch's
    ``spectral_norm``) raises RobustclipError: a second method would wrap the first."""
    _check_unclipped(model)
    return apply_method(model, method, method_args)


def _check_unclipped(model: nn.Module) -> None:
    """Refuse a model holding SpectralClip wrappers or torch's spectral-norm
    parametrizations (RobustclipError naming the first layers)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _SpectralNorm

    wrapped = [name for name, m in model.named_modules() if isinstance(m, SpectralClip)]
    normed = [name for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")
              and any(isinstance(p, _SpectralNorm) for p in m.parametrizations.weight)]
    clipped = [name or "the model itself" for name in wrapped or normed]
    if clipped:
        more = f" and {len(clipped) - 3} more" if len(clipped) > 3 else ""
        raise RobustclipError(f"the model is already clipped (layers wrapped: "
                              f"{', '.join(clipped[:3])}{more}); clip_model wraps a plain model "
                              f"once: build a fresh one to clip it another way")


class Lipschitz(NamedTuple):
    """A network's L2 Lipschitz bound (logits per input unit), whether it is guaranteed
    ('upper') or rests on a PowerQR estimate somewhere ('estimate'), and one row per
    operator (``bounds.lipschitz_report``)."""

    bound: float
    kind: str
    layers: pd.DataFrame


def lipschitz(model: nn.Module, input_shape: Sequence[int], **kwargs: Any) -> Lipschitz:
    """The Lipschitz bound of ``model`` for inputs of ``input_shape`` (no batch dim, e.g.
    (1, 28, 28)); ``kwargs`` go to :func:`robustclip.bounds.lipschitz_report` (tol, iters,
    exact_max_dim, progress)."""
    bound, rows = lipschitz_report(model, input_shape, **kwargs)
    return Lipschitz(bound, rows.attrs["bound_kind"], rows)


def _tensors(data: Any, limit: int | None, data_dir: str | None) -> tuple[Tensor, Tensor]:
    """(images, labels) from a dataset name, a pair of tensors, a Dataset or a DataLoader."""
    from robustclip.data import test_set

    if isinstance(data, str):
        return test_set(data, limit, data_dir)
    if isinstance(data, DataLoader):
        pairs = [(x, y) for x, y in data]
    elif isinstance(data, Dataset):
        pairs = [(x.unsqueeze(0), torch.as_tensor(y).view(1))
                 for x, y in (data[i] for i in range(len(data) if limit is None else min(limit, len(data))))]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        pairs = [tuple(data)]
    else:
        raise RobustclipError("data must be a dataset name ('mnist'), an (images, labels) pair "
                              f"of tensors, a Dataset or a DataLoader; got {type(data).__name__}")
    images = torch.cat([torch.as_tensor(x) for x, _ in pairs])
    labels = torch.cat([torch.as_tensor(y).view(-1) for _, y in pairs])
    if limit is not None:
        if limit < 1:
            raise RobustclipError(f"limit must be >= 1, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return images, labels


def evaluate(model: nn.Module | Mapping[str, nn.Module], data: Any,
             eps: float | str | Sequence[float | str] = (), *, norm: str | None = None,
             attacks: str | Sequence[str] = (), suite: str | Path | None = None,
             quick: bool = False, steps: int | None = None, n_restarts: int | None = None,
             limit: int | None = None, batch_size: int = 256, seed: int = 0,
             device: str | torch.device | None = None, out: str | Path | None = None,
             overwrite: bool = False, resume: bool = False, save_adversarial: bool = False,
             bounds: bool | Mapping[str, float] = True, data_dir: str | None = None,
             progress: bool = False) -> pd.DataFrame:
    """Attack ``model`` (or label -> model) on ``data``; the table ``robustclip attack`` makes.

    data: a dataset name ('mnist', 'fashion-mnist', 'cifar10': its test split), an
        (images (n, C, H, W) in [0, 1], labels (n,)) pair, a Dataset or a DataLoader.
    eps: one budget or several, numbers or fractions ('8/255'), in pixel units.
    norm / attacks / suite / quick / steps / n_restarts: as the CLI's options; the default
        is the standard evaluation (AutoAttack's cascade) in ``norm`` (default Linf).
    device: move the models there first (default: where they are).
    bounds: True measures each model's Lipschitz bound (certificates need a guaranteed
        one); a mapping label -> bound gives them; False skips bounds and certificates.
    out: also write results.csv/.json/.md, samples.csv and plots there, journaling every
        finished batch; ``resume=True`` continues an interrupted call with the same out.
    Returns a DataFrame with the columns of ``report.COLUMNS``; ``table.attrs['warnings']``
    holds the sanity warnings in plain words.
    """
    from robustclip.commands import attack_specs, evaluate_and_write
    from robustclip.schema import seed as checked_seed

    seed = checked_seed(seed)
    models = {"model": model} if isinstance(model, nn.Module) else \
        dict(model) if isinstance(model, Mapping) else {}
    if not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise RobustclipError("model must be an nn.Module or a mapping of labels to nn.Modules")
    if device is not None:
        models = {k: m.to(device) for k, m in models.items()}
    eps_list = [eps] if isinstance(eps, (int, float, str)) else list(eps)
    try:
        eps_values = [parse_fraction(e) for e in eps_list]
    except ValueError as err:
        raise RobustclipError(f"eps: {err}") from None
    attack_list = [attacks] if isinstance(attacks, str) else list(attacks)
    specs, suite_name = attack_specs(eps_values, attack_list, None if suite is None else str(suite),
                                     norm, "quick" if quick else "standard",
                                     {"steps": steps, "n_restarts": n_restarts})
    images, labels = _tensors(data, limit, data_dir)
    with results_dir(out, overwrite, resume, data_dir) as work:
        return evaluate_and_write({"data": models}, {"data": (images, labels)}, specs, suite_name,
                                  batch_size=batch_size, seed=seed, ensemble_output=None,
                                  out=None if work is None else str(work), resume=resume,
                                  save_adversarial=save_adversarial, bounds=bounds, echo=progress)
